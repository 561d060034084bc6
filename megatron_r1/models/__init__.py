"""Model specs on Megatron-Core GPTModel: DeepSeek-V3 (MLA + DeepSeekMoE + MTP) and dense Llama / Qwen2."""
from megatron_r1.models.builder import build_model, build_transformer_config, padded_vocab_size
from megatron_r1.models.presets import PRESETS, get_preset

__all__ = ["build_model", "build_transformer_config", "padded_vocab_size", "PRESETS", "get_preset"]
