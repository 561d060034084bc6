"""Pure-torch modules for Megatron-Core specs when Transformer Engine is absent (CPU, or GPUs without TE).

Megatron's local `DotProductAttention` assumes equal K and V head sizes, which MLA breaks, and its torch norm
refuses sequence parallelism, which MoE with TP requires; these two modules fill those gaps (docs/mcore_cpu.md 8, 9).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_r1.models.prefix_attention import PrefixAttentionTarget, block_attention, calls, dense_mask


class SDPACoreAttention(PrefixAttentionTarget, MegatronModule):
    """Causal attention over Megatron's [s, b, heads, dim] layout with torch's `scaled_dot_product_attention`.

    Accepts K/V head sizes that differ (MLA) and grouped KV heads (GQA). `attention_mask`, when given, follows
    Megatron's convention (True = masked) and is used instead of the causal mask (packed samples); shared-prefix rows
    pass their O(S) segment mask, which runs per block while its `PrefixLayout` is active and is expanded to the
    dense mask otherwise (`megatron_r1.models.prefix_attention`).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None,
                 **unused):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if packed_seq_params is not None:
            raise ValueError("SDPACoreAttention: packed_seq_params needs Transformer Engine; pass an attention mask")
        dk, dv = key.shape[-1], value.shape[-1]
        if dk > dv and value.device.type == "cpu":
            # torch's fused CPU attention kernel needs equal head sizes; without it SDPA takes its math path (~1.4x
            # the CPU time for MLA's 48/32 in the forward, ~1.1x with backward). Zero V columns give zero outputs.
            out = self._attend(query, key, F.pad(value, (0, dk - dv)), attention_mask)
            s, b = out.shape[:2]
            return out.view(s, b, -1, dk)[..., :dv].reshape(s, b, -1)
        return self._attend(query, key, value, attention_mask)

    def _attend(self, query, key, value, attention_mask):
        dropout = self.dropout if self.training else 0.0
        layout = self.prefix_layout
        if layout is not None and attention_mask is layout.mask:
            calls["blocks"] += 1
            return block_attention(query, key, value, layout, self.softmax_scale, dropout)
        calls["causal" if attention_mask is None else "dense_mask"] += 1
        attention_mask = dense_mask(attention_mask)  # a shared-prefix segment mask outside its layout: expanded
        sq, b, nq, _ = query.shape
        nkv = key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, heads, s, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if nq != nkv:
            k = k.repeat_interleave(nq // nkv, dim=1)
            v = v.repeat_interleave(nq // nkv, dim=1)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * v.shape[-1])


class RMSNorm(torch.nn.Module):
    """RMSNorm whose weight carries `sequence_parallel`, so Megatron all-reduces its gradient across TP ranks."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back to x's dtype (as TE's RMSNorm kernels
    do): the one RMSNorm of the local modules, the TE stand-in's fused norm and the generator."""
    dtype = x.dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(dtype)
