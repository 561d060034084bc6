"""What the functional forward reads from a GPTModel: every layer's weights, from either spec, or a refusal.

Megatron-Core builds the same architecture from two module layouts (specs). The local spec has a norm module in
front of each block: `input_layernorm`, `pre_mlp_layernorm`, MLA's `q_layernorm` / `kv_layernorm`. Transformer
Engine's spec fuses those norms into the linear that follows them (`TELayerNormColumnParallelLinear`, whose norm
weight is `layer_norm_weight`) and leaves the norm slot an `IdentityOp`:

    local                                   Transformer Engine
    input_layernorm.weight                  self_attention.linear_qkv.layer_norm_weight       (dense attention)
    input_layernorm.weight                  input_layernorm.weight (TENorm)                    (MLA: q/kv down
                                                                                                projections are
                                                                                                plain linears)
    self_attention.q_layernorm.weight       self_attention.linear_q_up_proj.layer_norm_weight  (MLA)
    self_attention.kv_layernorm.weight      self_attention.linear_kv_up_proj.layer_norm_weight (MLA)
    pre_mlp_layernorm.weight                mlp.linear_fc1.layer_norm_weight                   (dense MLP)
    pre_mlp_layernorm.weight                pre_mlp_layernorm.weight (TENorm)                  (MoE layers)

`read_model` walks the model once and returns plain records of the Parameter objects (held, not copied: an
optimizer step or DDP re-pointing `.data` is seen), whichever layout it finds. The contract's table
(`parity.py`: config fields and module types) and the walk refuse,
with a `ConfigError` naming the config field or the module path, everything the functional forward does not
reproduce (LayerNorm, other activations, biases, windowed attention, rope variants, router options, ...): a model
the generator cannot reproduce fails at engine construction instead of sampling from different log-probs than
the trainer computes. `canonical_name` maps TE parameter names to the local spec's, so weights move between
models of either layout (`megatron_r1.inference.weights`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_r1.errors import ConfigError
from megatron_r1.inference.parity import check_config, require_module

# TE name -> local name, applied to the tail of a parameter name (also inside MTP layers).
_TE_TO_LOCAL = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_(weight|bias)$"), r"input_layernorm.\1"),
    (re.compile(r"self_attention\.linear_q_up_proj\.layer_norm_(weight|bias)$"), r"self_attention.q_layernorm.\1"),
    (re.compile(r"self_attention\.linear_kv_up_proj\.layer_norm_(weight|bias)$"),
     r"self_attention.kv_layernorm.\1"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_(weight|bias)$"), r"pre_mlp_layernorm.\1"),
]


def canonical_name(name: str) -> str:
    """A parameter's name as the local spec names it (TE's fused norm weights renamed to their norm modules)."""
    for pattern, local in _TE_TO_LOCAL:
        if pattern.search(name):
            return pattern.sub(local, name)
    return name


# ----------------------------------------------------------------------------------------------- records
@dataclass
class Norm:
    """An RMSNorm: y = x * rsqrt(mean(x^2) + eps) * weight (in fp32, cast back)."""

    weight: torch.nn.Parameter
    eps: float
    where: str  # module path the weight was read from (messages, tests)


@dataclass
class DenseAttention:
    qkv_w: torch.Tensor  # Megatron's grouped layout: per KV group [q heads of the group; k; v]
    qkv_b: Optional[torch.Tensor]
    proj_w: torch.Tensor


@dataclass
class MLAttention:
    q_down_w: Optional[torch.Tensor]  # None without query compression (q_lora_rank None) ...
    q_norm: Optional[Norm]
    q_up_w: Optional[torch.Tensor]
    q_proj_w: Optional[torch.Tensor]  # ... which projects with this instead
    kv_down_w: torch.Tensor
    kv_norm: Optional[Norm]
    kv_up_w: torch.Tensor
    proj_w: torch.Tensor


@dataclass
class MLP:
    fc1_w: torch.Tensor  # SwiGLU: [gate; up]
    fc2_w: torch.Tensor


@dataclass
class MoE:
    router_w: torch.Tensor
    expert_bias: Optional[torch.Tensor]
    expert_ids: list[int]  # global index of each local expert
    experts: list[MLP]
    shared: Optional[MLP]


@dataclass
class Layer:
    in_norm: Optional[Norm]
    attn: Union[DenseAttention, MLAttention]
    mlp_norm: Optional[Norm]
    mlp: Union[MLP, MoE]


@dataclass
class ModelWeights:
    """One pipeline stage's weights: `embed_w` only on the first stage (`pre_process`), `final_norm` and `out_w`
    only on the last (`post_process`); `layer_numbers` the global 0-based index of each of `layers`."""

    layers: list[Layer]
    final_norm: Optional[Norm]
    embed_w: Optional[torch.Tensor]
    out_w: Optional[torch.Tensor]
    layer_numbers: list[int]

    def norms(self) -> list[Optional[Norm]]:
        out = []
        for lyr in self.layers:
            out += [lyr.in_norm, lyr.mlp_norm]
        return out + [self.final_norm]


# ----------------------------------------------------------------------------------------------- modules
def _kind(mod) -> str:
    return type(mod).__name__


def _bias(mod) -> Optional[torch.Tensor]:
    """A linear's bias, None when it has none (TE keeps an empty tensor for bias=False)."""
    b = getattr(mod, "bias", None)
    return b if isinstance(b, torch.Tensor) and b.numel() > 0 else None


def _norm(mod, where: str, cfg) -> Optional[Norm]:
    """The RMSNorm a norm module applies; None for IdentityOp; ConfigError for anything else (LayerNorm, L2Norm).
    A norm class that keeps no `eps` attribute was built (by Megatron's specs) with config.layernorm_epsilon."""
    if require_module(mod, "norm", where) == "IdentityOp":
        return None
    # our local RMSNorm, torch.nn.RMSNorm (Megatron's WrappedTorchNorm builds one), TE's RMSNorm (TENorm builds it)
    if isinstance(getattr(mod, "weight", None), torch.Tensor):
        if getattr(mod, "zero_centered_gamma", False):
            raise ConfigError(f"inference: {where}: zero-centred RMSNorm weights are not implemented")
        eps = getattr(mod, "eps", cfg.layernorm_epsilon)
        if eps is None:  # torch.nn.RMSNorm(eps=None) uses the dtype's machine epsilon
            eps = torch.finfo(mod.weight.dtype).eps
        return Norm(mod.weight, float(eps), where)
    raise ConfigError(f"inference: {where}: an RMSNorm without a weight tensor is not implemented")


def _fused_norm(linear, where: str) -> Optional[Norm]:
    """The norm a LayerNorm+linear module (TE's TELayerNormColumnParallelLinear or its CPU stand-in) applies to
    its input, None for a plain linear."""
    w = getattr(linear, "layer_norm_weight", None)
    if w is None:
        return None
    normalization = getattr(linear, "normalization", "RMSNorm")
    if normalization != "RMSNorm" or _bias_param(linear, "layer_norm_bias") is not None:
        raise ConfigError(f"inference: {where}: fused {normalization} is not implemented (only RMSNorm)")
    if getattr(linear, "zero_centered_gamma", False):
        raise ConfigError(f"inference: {where}: zero-centred RMSNorm weights are not implemented")
    eps = getattr(linear, "eps", None)
    return Norm(w, float(linear.config.layernorm_epsilon if eps is None else eps), f"{where}.layer_norm_weight")


def _bias_param(mod, name):
    b = getattr(mod, name, None)
    return b if isinstance(b, torch.Tensor) and b.numel() > 0 else None


def _one_norm(a: Optional[Norm], b: Optional[Norm], where: str) -> Optional[Norm]:
    if a is not None and b is not None:
        raise ConfigError(f"inference: {where}: both a norm module and a fused norm in the next linear "
                          f"({a.where}, {b.where}); a spec applies one of them")
    return a if a is not None else b


def _weight(linear, where: str, bias_ok: bool = False) -> torch.Tensor:
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ConfigError(f"inference: {where}: {_kind(linear)} has no single `weight` (not a linear layer the "
                          "generator can read)")
    if not bias_ok and _bias(linear) is not None:
        raise ConfigError(f"inference: {where}: a bias is not implemented for this linear")
    return w


def _mlp(mlp, where: str, fused_ok: bool) -> tuple[MLP, Optional[Norm]]:
    require_module(mlp, "mlp", where)
    norm = _fused_norm(mlp.linear_fc1, f"{where}.linear_fc1")
    if norm is not None and not fused_ok:
        raise ConfigError(f"inference: {where}.linear_fc1: a fused norm inside an expert is not implemented")
    return MLP(_weight(mlp.linear_fc1, f"{where}.linear_fc1"), _weight(mlp.linear_fc2, f"{where}.linear_fc2")), norm


def _moe(moe, where: str) -> MoE:
    require_module(moe, "moe", where)
    experts = moe.experts
    require_module(experts, "experts", f"{where}.experts")  # grouped-GEMM experts: moe_grouped_gemm=False
    local = [_mlp(e, f"{where}.experts.local_experts.{i}", False)[0] for i, e in enumerate(experts.local_experts)]
    shared = None
    if getattr(moe, "shared_experts", None) is not None:
        shared = _mlp(moe.shared_experts, f"{where}.shared_experts", False)[0]
    router = moe.router
    if _bias(router) is not None:
        raise ConfigError(f"inference: {where}.router: a router bias is not implemented")
    bias = getattr(router, "expert_bias", None) if getattr(router, "enable_expert_bias", False) else None
    return MoE(router.weight, bias, [int(i) for i in moe.local_expert_indices], local, shared)


def _attention(attn, where: str, cfg) -> tuple[Union[DenseAttention, MLAttention], Optional[Norm]]:
    kind = require_module(attn, "self_attention", where)
    if kind == "SelfAttention":
        for name in ("q_layernorm", "k_layernorm"):
            if getattr(attn, name, None) is not None and _kind(getattr(attn, name)) != "IdentityOp":
                raise ConfigError(f"inference: {where}.{name}: query/key norms of dense attention are not "
                                  "implemented")
        norm = _fused_norm(attn.linear_qkv, f"{where}.linear_qkv")
        return DenseAttention(_weight(attn.linear_qkv, f"{where}.linear_qkv", bias_ok=True),
                              _bias(attn.linear_qkv), _weight(attn.linear_proj, f"{where}.linear_proj")), norm
    if kind == "MLASelfAttention":  # (the table's other entry)
        if _fused_norm(attn.linear_kv_down_proj, f"{where}.linear_kv_down_proj") is not None:
            raise ConfigError(f"inference: {where}.linear_kv_down_proj: a fused input norm is not implemented")
        kv_norm = _one_norm(_norm(attn.kv_layernorm, f"{where}.kv_layernorm", cfg),
                            _fused_norm(attn.linear_kv_up_proj, f"{where}.linear_kv_up_proj"), where)
        if cfg.q_lora_rank is not None:
            q_norm = _one_norm(_norm(attn.q_layernorm, f"{where}.q_layernorm", cfg),
                               _fused_norm(attn.linear_q_up_proj, f"{where}.linear_q_up_proj"), where)
            q = dict(q_down_w=_weight(attn.linear_q_down_proj, f"{where}.linear_q_down_proj"), q_norm=q_norm,
                     q_up_w=_weight(attn.linear_q_up_proj, f"{where}.linear_q_up_proj"), q_proj_w=None)
        else:
            q = dict(q_down_w=None, q_norm=None, q_up_w=None,
                     q_proj_w=_weight(attn.linear_q_proj, f"{where}.linear_q_proj"))
        return MLAttention(**q, kv_down_w=_weight(attn.linear_kv_down_proj, f"{where}.linear_kv_down_proj"),
                           kv_norm=kv_norm, kv_up_w=_weight(attn.linear_kv_up_proj, f"{where}.linear_kv_up_proj"),
                           proj_w=_weight(attn.linear_proj, f"{where}.linear_proj")), None
    raise AssertionError(f"parity.MODULES['self_attention'] lists {kind}, which _attention does not read")


def _layer(layer, where: str, cfg) -> Layer:
    require_module(layer, "layer", where)
    for name in ("cross_attention", "pre_cross_attn_layernorm"):
        require_module(getattr(layer, name), "cross_attention", f"{where}.{name}")
    attn, fused_in = _attention(layer.self_attention, f"{where}.self_attention", cfg)
    in_norm = _one_norm(_norm(layer.input_layernorm, f"{where}.input_layernorm", cfg), fused_in, where)
    mlp = layer.mlp
    pre_mlp = _norm(layer.pre_mlp_layernorm, f"{where}.pre_mlp_layernorm", cfg)
    if hasattr(mlp, "router"):
        return Layer(in_norm, attn, pre_mlp, _moe(mlp, f"{where}.mlp"))
    dense, fused_mlp = _mlp(mlp, f"{where}.mlp", True)
    return Layer(in_norm, attn, _one_norm(pre_mlp, fused_mlp, where), dense)


def read_model(model) -> ModelWeights:
    """Every weight the functional forward reads, whichever spec built `model`; ConfigError for what it cannot."""
    check_config(model.config)
    mla = bool(getattr(model.config, "multi_latent_attention", False))
    pos = getattr(model, "position_embedding_type", None)
    if pos != ("none" if mla else "rope"):
        raise ConfigError(f"inference: GPTModel position_embedding_type {pos!r} is not implemented "
                          f"({'MLA applies its own rope' if mla else 'rope is'})")
    layers = [_layer(layer, f"decoder.layers.{i}", model.config) for i, layer in enumerate(model.decoder.layers)]
    numbers = [int(layer.layer_number) - 1 for layer in model.decoder.layers]
    # a pipeline stage holds the embedding only if it is the first (pre_process), the final norm and the output
    # layer only if it is the last (post_process)
    first, last = getattr(model, "pre_process", True), getattr(model, "post_process", True)
    final, out_w = None, None
    if last:
        if getattr(model.decoder, "final_layernorm", None) is None:
            raise ConfigError("inference: decoder.final_layernorm: a model without a final norm is not implemented")
        final = _norm(model.decoder.final_layernorm, "decoder.final_layernorm", model.config)
        out_w = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                 else _weight(model.output_layer, "output_layer"))
    embed_w = model.embedding.word_embeddings.weight if first else None
    return ModelWeights(layers, final, embed_w, out_w, numbers)
