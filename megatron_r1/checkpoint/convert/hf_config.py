"""HF `config.json` <-> our ModelConfig, for DeepSeek-V3, Qwen2 and Llama.

Anything HF can express that our model cannot run identically is an error here (naming the field), never a
silent approximation: a converted checkpoint either reproduces HF's logits or is refused.
"""
from __future__ import annotations

import struct
import warnings
from typing import Any

from megatron_r1.checkpoint.convert.mapping import HFOptions
from megatron_r1.config import ModelConfig
from megatron_r1.errors import CheckpointError

ARCHS = {"deepseek_v3": "DeepseekV3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def detect_arch(hf: dict, where: str) -> str:
    model_type = hf.get("model_type")
    if model_type in ARCHS:
        return model_type
    archs = hf.get("architectures") or []
    for name, cls in ARCHS.items():
        if cls in archs:
            return name
    raise CheckpointError(f"{where}: unknown architecture (model_type={model_type!r}, architectures={archs}); "
                          f"supported: {', '.join(ARCHS)}")


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either transformers-4 (`rope_scaling`) or 5 (`rope_parameters`)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or params.get("rope_type",
                                                                                       params.get("type"))
    if scaling is None and kind not in (None, "default"):
        scaling = params
    if scaling is not None and (scaling.get("rope_type", scaling.get("type")) in (None, "default")):
        scaling = None
    return float(theta), scaling


def _need(hf: dict, key: str, where: str) -> Any:
    if key not in hf:
        raise CheckpointError(f"{where}: config.json has no {key!r}")
    return hf[key]


def _refuse(cond: bool, where: str, msg: str) -> None:
    if cond:
        raise CheckpointError(f"{where}: {msg} (not supported by this converter)")


def model_config_from_hf(hf: dict, where: str = "config.json", has_mtp: bool = False) -> tuple[ModelConfig, HFOptions]:
    """Our ModelConfig (and the HF layout options) for an HF config; `has_mtp`: the weights hold the MTP layer."""
    arch = detect_arch(hf, where)
    if hf.get("quantization_config"):
        raise CheckpointError(f"{where}: quantized checkpoint ({hf['quantization_config'].get('quant_method', '?')}); "
                              f"dequantize to bf16 first")
    _refuse(hf.get("hidden_act", "silu") != "silu", where, f"hidden_act={hf.get('hidden_act')!r}")
    theta, scaling = _rope(hf)
    g = lambda k: _need(hf, k, where)  # noqa: E731
    common = dict(
        arch=arch, num_layers=g("num_hidden_layers"), hidden_size=g("hidden_size"),
        ffn_hidden_size=g("intermediate_size"), num_attention_heads=g("num_attention_heads"),
        vocab_size=g("vocab_size"), max_position_embeddings=g("max_position_embeddings"),
        seq_length=min(4096, g("max_position_embeddings")), norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        rotary_base=theta, untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    if arch == "deepseek_v3":
        _refuse(hf.get("attention_bias", False), where, "attention_bias=true")
        _refuse(hf.get("moe_layer_freq", 1) != 1, where, f"moe_layer_freq={hf.get('moe_layer_freq')}")
        _refuse(not hf.get("norm_topk_prob", True), where, "norm_topk_prob=false")
        _refuse(hf.get("topk_method", "noaux_tc") not in ("noaux_tc",), where, f"topk_method={hf.get('topk_method')!r}")
        _refuse(hf.get("scoring_func", "sigmoid") != "sigmoid", where, f"scoring_func={hf.get('scoring_func')!r}")
        n_group, topk_group, topk = hf.get("n_group", 1), hf.get("topk_group", 1), g("num_experts_per_tok")
        if n_group and n_group > 1 and topk // topk_group != 2:
            warnings.warn(f"{where}: HF scores a group by its top-2 experts, Megatron by its top-"
                          f"{topk // topk_group} (num_experts_per_tok / topk_group); routing may differ")
        shared = hf.get("n_shared_experts") or 0
        kw = dict(
            multi_latent_attention=True, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=g("kv_lora_rank"),
            qk_head_dim=g("qk_nope_head_dim"), qk_pos_emb_head_dim=g("qk_rope_head_dim"), v_head_dim=g("v_head_dim"),
            num_experts=g("n_routed_experts"), moe_ffn_hidden_size=g("moe_intermediate_size"),
            moe_shared_expert_intermediate_size=g("moe_intermediate_size") * shared if shared else None,
            moe_router_topk=topk, moe_router_num_groups=n_group if n_group and n_group > 1 else None,
            moe_router_group_topk=topk_group if n_group and n_group > 1 else None,
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            mtp_num_layers=(hf.get("num_nextn_predict_layers") or None) if has_mtp else None,
        )
        if scaling is None:
            kw.update(rope_type="rope", rotary_scaling_factor=1.0)
        else:
            kind = scaling.get("rope_type", scaling.get("type"))
            _refuse(kind != "yarn", where, f"rope scaling {kind!r} for deepseek_v3")
            kw.update(rope_type="yarn", rotary_scaling_factor=float(scaling["factor"]),
                      original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 4096)),
                      beta_fast=float(scaling.get("beta_fast", 32)), beta_slow=float(scaling.get("beta_slow", 1)),
                      mscale=float(scaling.get("mscale", 1.0)),
                      mscale_all_dim=float(scaling.get("mscale_all_dim", 0.0)))
        opts = HFOptions(rope_interleave=bool(hf.get("rope_interleave", True)))
    else:
        _refuse(scaling is not None, where, f"rope scaling {scaling}")
        _refuse(hf.get("mlp_bias", False), where, "mlp_bias=true")
        if arch == "llama":
            _refuse(hf.get("attention_bias", False), where, "attention_bias=true")
        else:
            _refuse(bool(hf.get("use_sliding_window", False)), where, "use_sliding_window=true")
        heads = common["num_attention_heads"]
        head_dim = hf.get("head_dim") or common["hidden_size"] // heads
        kw = dict(
            multi_latent_attention=False, q_lora_rank=None, num_experts=None, moe_shared_expert_intermediate_size=None,
            moe_router_num_groups=None, moe_router_group_topk=None, moe_router_enable_expert_bias=False,
            moe_router_topk_scaling_factor=None, first_k_dense_replace=0, rope_type="rope",
            num_query_groups=hf.get("num_key_value_heads") or heads,
            kv_channels=head_dim if head_dim * heads != common["hidden_size"] else None,
            add_qkv_bias=arch == "qwen2",
        )
        opts = HFOptions(rope_interleave=False)
    return ModelConfig(**common, **kw), opts


def _same_f32(a: float, b: float) -> bool:
    return struct.pack("<f", a) == struct.pack("<f", b)


def hf_config_from_model(m: ModelConfig, base: dict | None, dtype: str) -> dict:
    """config.json for `m`: the source's own config.json (`base`) updated with every field we model."""
    out = dict(base or {})
    out.update(architectures=[ARCHS[m.arch]], model_type=m.arch, num_hidden_layers=m.num_layers,
               hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
               num_attention_heads=m.num_attention_heads, vocab_size=m.vocab_size,
               max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
               tie_word_embeddings=not m.untie_embeddings_and_output_weights, hidden_act="silu",
               initializer_range=m.init_method_std)
    for key in ("rms_norm_eps", "initializer_range"):
        # The source's own spelling of a value we hold equal at float32 (e.g. a GGUF's 9.999999747378752e-06 for
        # the 1e-5 of a preset): the model computes the same, and config.json round-trips unchanged.
        if isinstance((base or {}).get(key), (int, float)) and _same_f32(base[key], out[key]):
            out[key] = base[key]
    out["torch_dtype" if "torch_dtype" in out or "dtype" not in out else "dtype"] = dtype
    theta = m.rotary_base if m.rotary_base != int(m.rotary_base) else int(m.rotary_base)
    if m.arch == "deepseek_v3":
        out.update(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_head_dim,
                   qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
                   # HF DeepseekV3 sizes its rotary embedding from head_dim: the rope part of each head
                   head_dim=m.qk_pos_emb_head_dim,
                   num_key_value_heads=m.num_attention_heads, n_routed_experts=m.num_experts,
                   moe_intermediate_size=m.moe_ffn_hidden_size,
                   n_shared_experts=(m.moe_shared_expert_intermediate_size or 0) // m.moe_ffn_hidden_size,
                   num_experts_per_tok=m.moe_router_topk, n_group=m.moe_router_num_groups or 1,
                   topk_group=m.moe_router_group_topk or 1, routed_scaling_factor=m.moe_router_topk_scaling_factor,
                   first_k_dense_replace=m.first_k_dense_replace, norm_topk_prob=True, scoring_func="sigmoid",
                   topk_method="noaux_tc", num_nextn_predict_layers=m.mtp_num_layers or 0)
        out.setdefault("rope_interleave", True)
        if m.rope_type == "yarn":
            scaling = dict(type="yarn", rope_type="yarn", factor=m.rotary_scaling_factor,
                           original_max_position_embeddings=m.original_max_position_embeddings,
                           beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale,
                           mscale_all_dim=m.mscale_all_dim)
        else:
            scaling = None
    else:
        heads = m.num_attention_heads
        out.update(num_key_value_heads=m.num_query_groups or heads,
                   head_dim=m.kv_channels or m.hidden_size // heads)
        if m.arch == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        scaling = None
    if "rope_parameters" in out:  # transformers >= 5 layout
        out["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
        out.pop("rope_scaling", None)
    else:
        out.update(rope_theta=theta, rope_scaling=scaling)
    return out
