"""The tiny DeepSeek-V3 the training, RL and multi-process tests build: the `deepseek_v3_tiny` preset's structure
(MLA with q/kv compression and decoupled rope, first layer dense, routed + shared experts) shrunk to 2 layers of
width 64, so a step takes well under a second on one CPU core. One place, so the tests cannot drift apart."""

TINY_DEEPSEEK_V3 = {
    "preset": "deepseek_v3_tiny", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
    "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8,
    "v_head_dim": 16, "moe_ffn_hidden_size": 64, "moe_shared_expert_intermediate_size": 64, "vocab_size": 384,
}


def tiny_deepseek_v3(**fields) -> dict:
    """The `model:` section of a config: the tiny DeepSeek-V3 with `fields` (sequence lengths, ...) set on it."""
    return {**TINY_DEEPSEEK_V3, **fields}


def as_overrides(model: dict) -> list[str]:
    """The same section as `model.<field>=<value>` command-line overrides (the preset first)."""
    return [f"model.{k}={v}" for k, v in model.items()]
