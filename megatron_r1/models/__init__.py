"""Model specs on Megatron-Core GPTModel: DeepSeek-V3 (MLA + DeepSeekMoE + MTP) and dense Llama / Qwen2.

The builder (which imports torch and Megatron) loads on first use, so reading a config or a preset stays cheap.
The presets are data in megatron_r1/presets.py; `get_preset` (megatron_r1.config) makes a ModelConfig of one.
"""
from megatron_r1.config import get_preset
from megatron_r1.presets import PRESETS

__all__ = ["build_model", "build_transformer_config", "padded_vocab_size", "PRESETS", "get_preset"]


def __getattr__(name):
    if name in ("build_model", "build_transformer_config", "padded_vocab_size"):
        from megatron_r1.models import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'megatron_r1.models' has no attribute {name!r}")
