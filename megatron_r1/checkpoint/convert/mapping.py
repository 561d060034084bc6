"""Which HF tensors make which Megatron tensor, and how: one `Rule` per Megatron parameter, each invertible.

Megatron names here are *global* names of a TP=1, PP=1, EP=1 model (global layer and expert numbers, unpadded
vocab); `placement.py` maps them onto one rank's shards. Transforms are exact (concatenation, reshapes, row
permutations), so HF -> Megatron -> HF gives back the same bits.

Layout facts the rules encode:
- SwiGLU `linear_fc1` is [gate; up] stacked on the output dim (HF: gate_proj, up_proj).
- Dense attention `linear_qkv` is grouped per query group g: [q heads of g, k_g, v_g] (Megatron's
  `SelfAttention.get_query_key_value_tensors`); the qkv bias (Qwen2) follows the same layout.
- DeepSeek-V3 stores the rotary rows of q_b_proj / kv_a_proj_with_mqa interleaved ([x0, y0, x1, y1, ...]);
  both HF (`rope_interleave=true`, `apply_rotary_pos_emb_interleave`) and Megatron's MLA
  (`_apply_rotary_pos_emb_bshd(multi_latent_attention=True)`) de-interleave at run time, so those rows copy as
  they are. An HF config with `rope_interleave=false` rotates halves: its rows are interleaved at conversion.
- The MTP layer is HF's `model.layers.{num_layers}` (DeepSeek-V3 release format: enorm, hnorm, eh_proj,
  shared_head.norm, plus copies of the embedding and output head that Megatron shares with the main model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from megatron_r1.config import ModelConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor made from `hf` tensors by `to_mcore`; `to_hf` inverts it."""

    mcore: str
    hf: tuple[str, ...]
    to_mcore: Callable[[Sequence[Tensor]], Tensor]
    to_hf: Callable[[Tensor], list[Tensor]]
    export_only: bool = False  # an HF copy of another tensor (MTP embedding/head): written, never read


@dataclass(frozen=True)
class HFOptions:
    """HF-side facts not in ModelConfig that change the weight layout."""

    rope_interleave: bool = True  # DeepSeek-V3: rotary rows stored interleaved (Megatron MLA's own layout)
    ignored: tuple[str, ...] = field(default=())  # HF tensors read by no rule (known copies / caches)


# ------------------------------------------------------------------------------------------ transforms
def _copy(ts):
    return ts[0]


def _uncopy(t):
    return [t]


def _cat(ts):
    return torch.cat(list(ts), dim=0)


def _split(sizes):
    return lambda t: [p.clone() for p in torch.split(t, sizes, dim=0)]


def _deinterleave_perm(n: int) -> Tensor:
    # interleaved index order [0, 1, 2, 3, ...] = [x0, y0, x1, y1, ...] -> halves [x0, x1, ..., y0, y1, ...]
    return torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])


def _rope_rows(heads: int, head_dim: int, rope_dim: int, interleaved: bool):
    """Permute the last `rope_dim` rows of each head (rows = heads × head_dim) from HF to Megatron order."""
    if interleaved:
        return _copy, _uncopy
    # Megatron takes rows[deinterleave] before rotating halves; HF rotates its rows as they are.
    inv = _deinterleave_perm(rope_dim)
    perm = torch.argsort(inv)
    nope = head_dim - rope_dim

    def apply(t, p):
        v = t.reshape(heads, head_dim, *t.shape[1:])
        out = torch.cat([v[:, :nope], v[:, nope:][:, p]], dim=1)
        return out.reshape(t.shape)

    return (lambda ts: apply(ts[0], perm)), (lambda t: [apply(t, inv)])


def _qkv(heads: int, groups: int, head_dim: int):
    """HF q, k, v (weights or biases) <-> Megatron's per-group [q..., k, v] layout."""
    per = heads // groups

    def to_mcore(ts):
        q, k, v = ts
        rest = q.shape[1:]
        q = q.reshape(groups, per * head_dim, *rest)
        k = k.reshape(groups, head_dim, *rest)
        v = v.reshape(groups, head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * head_dim, *rest)

    def to_hf(t):
        rest = t.shape[1:]
        g = t.reshape(groups, (per + 2) * head_dim, *rest)
        q, k, v = torch.split(g, [per * head_dim, head_dim, head_dim], dim=1)
        return [q.reshape(heads * head_dim, *rest).clone(), k.reshape(groups * head_dim, *rest).clone(),
                v.reshape(groups * head_dim, *rest).clone()]

    return to_mcore, to_hf


# ------------------------------------------------------------------------------------------ rules
def _r(mcore, hf, fwd=_copy, inv=_uncopy, export_only=False) -> Rule:
    return Rule(mcore, tuple(hf) if isinstance(hf, (list, tuple)) else (hf,), fwd, inv, export_only)


def _swiglu(mc: str, hf: str, width: int) -> list[Rule]:
    return [_r(f"{mc}linear_fc1.weight", [f"{hf}gate_proj.weight", f"{hf}up_proj.weight"], _cat,
               _split([width, width])),
            _r(f"{mc}linear_fc2.weight", f"{hf}down_proj.weight")]


def _layer_rules(m: ModelConfig, opts: HFOptions, mc: str, hf: str, moe: bool) -> list[Rule]:
    rules = [_r(f"{mc}input_layernorm.weight", f"{hf}input_layernorm.weight"),
             _r(f"{mc}pre_mlp_layernorm.weight", f"{hf}post_attention_layernorm.weight")]
    a, s = f"{mc}self_attention.", f"{hf}self_attn."
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        q_fwd, q_inv = _rope_rows(m.num_attention_heads, qk, m.qk_pos_emb_head_dim, opts.rope_interleave)
        kv_fwd, kv_inv = _rope_rows(1, m.kv_lora_rank + m.qk_pos_emb_head_dim, m.qk_pos_emb_head_dim,
                                    opts.rope_interleave)
        if m.q_lora_rank:
            rules += [_r(f"{a}linear_q_down_proj.weight", f"{s}q_a_proj.weight"),
                      _r(f"{a}q_layernorm.weight", f"{s}q_a_layernorm.weight"),
                      _r(f"{a}linear_q_up_proj.weight", f"{s}q_b_proj.weight", q_fwd, q_inv)]
        else:
            rules.append(_r(f"{a}linear_q_proj.weight", f"{s}q_proj.weight", q_fwd, q_inv))
        rules += [_r(f"{a}linear_kv_down_proj.weight", f"{s}kv_a_proj_with_mqa.weight", kv_fwd, kv_inv),
                  _r(f"{a}kv_layernorm.weight", f"{s}kv_a_layernorm.weight"),
                  _r(f"{a}linear_kv_up_proj.weight", f"{s}kv_b_proj.weight"),
                  _r(f"{a}linear_proj.weight", f"{s}o_proj.weight")]
    else:
        groups = m.num_query_groups or m.num_attention_heads
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        fwd, inv = _qkv(m.num_attention_heads, groups, head_dim)
        rules.append(_r(f"{a}linear_qkv.weight", [f"{s}{p}_proj.weight" for p in "qkv"], fwd, inv))
        if m.add_qkv_bias:
            rules.append(_r(f"{a}linear_qkv.bias", [f"{s}{p}_proj.bias" for p in "qkv"], fwd, inv))
        rules.append(_r(f"{a}linear_proj.weight", f"{s}o_proj.weight"))
    if moe:
        rules.append(_r(f"{mc}mlp.router.weight", f"{hf}mlp.gate.weight"))
        if m.moe_router_enable_expert_bias:
            rules.append(_r(f"{mc}mlp.router.expert_bias", f"{hf}mlp.gate.e_score_correction_bias"))
        for e in range(m.num_experts):
            rules += _swiglu(f"{mc}mlp.experts.local_experts.{e}.", f"{hf}mlp.experts.{e}.", m.moe_ffn_hidden_size)
        if m.moe_shared_expert_intermediate_size:
            rules += _swiglu(f"{mc}mlp.shared_experts.", f"{hf}mlp.shared_experts.",
                             m.moe_shared_expert_intermediate_size)
    else:
        rules += _swiglu(f"{mc}mlp.", f"{hf}mlp.", m.ffn_hidden_size)
    return rules


def build_rules(m: ModelConfig, opts: HFOptions = HFOptions()) -> list[Rule]:
    """Every rule of model `m`, in checkpoint order (embedding, layers, final norm, head, MTP)."""
    rules = [_r("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    for i in range(m.num_layers):
        moe = bool(m.num_experts) and i >= m.first_k_dense_replace
        rules += _layer_rules(m, opts, f"decoder.layers.{i}.", f"model.layers.{i}.", moe)
    rules.append(_r("decoder.final_layernorm.weight", "model.norm.weight"))
    if m.untie_embeddings_and_output_weights:
        rules.append(_r("output_layer.weight", "lm_head.weight"))
    for k in range(m.mtp_num_layers or 0):
        mc, hf = f"mtp.layers.{k}.", f"model.layers.{m.num_layers + k}."
        rules += [_r(f"{mc}enorm.weight", f"{hf}enorm.weight"), _r(f"{mc}hnorm.weight", f"{hf}hnorm.weight"),
                  _r(f"{mc}eh_proj.weight", f"{hf}eh_proj.weight"),
                  _r(f"{mc}final_layernorm.weight", f"{hf}shared_head.norm.weight")]
        rules += _layer_rules(m, opts, f"{mc}transformer_layer.", hf, bool(m.num_experts))
        # Megatron shares the main embedding and head with MTP; HF stores copies.
        rules.append(_r("embedding.word_embeddings.weight", f"{hf}embed_tokens.weight", export_only=True))
        head = "output_layer.weight" if m.untie_embeddings_and_output_weights else "embedding.word_embeddings.weight"
        rules.append(_r(head, f"{hf}shared_head.head.weight", export_only=True))
    return rules


VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
