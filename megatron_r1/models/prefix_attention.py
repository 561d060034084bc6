"""Attention for shared-prefix rows [prompt, answer_1, ..., answer_G, pad] computed per block instead of through a
dense [S, S] mask.

Why: in such a row each answer token sees only the prompt and its own past, yet a dense masked attention scores it
against all S = P + G·L columns (~G× the work needed, and G× the memory of the [S, S] scores). With a
`PrefixLayout` active (`with prefix_attention(model, layout):`), `SDPACoreAttention` computes instead
  (a) the prompts: causal attention over the first P_max columns of every row ([b, P_max]);
  (b) all answers at once: each answer's queries [L_max] against [its row's prompt K/V (P_max), its own K/V (L_max)],
      batched as [b·G, P_max + L_max] with a per-answer mask (a shorter prompt's tail masked, causal in the answer);
  (c) padding: its own V, as under the dense mask, where a padding token sees only itself;
and gathers the three back into Megatron's [s, b, ...] order with one index. Each real query sees exactly the keys
the dense mask allows, so outputs and gradients equal the dense path's up to summation order (~1 ulp).

The mask handed to the model for such rows is `segment_mask(segments)`: the rows' segment ids as a [b, 1, 1, S]
int64 tensor, O(S) memory where the dense [b, 1, S, S] mask is O(S²) (4 GB per row at S = 64k: R1-length answers).
The layout is matched to that mask by identity; a layer that activation recomputation re-runs outside the block
gets the dense mask built from it on the spot (`dense_mask`: same result, dense cost), and any other mask (or
none) takes the ordinary path. Padded query
slots (answers shorter than L_max) always see their row's prompt, so no softmax row is empty (no NaN); their
outputs are dropped.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

calls = collections.Counter()  # "blocks" / "dense_mask" / "causal": which path each core attention call took


def shared_prefix_mask(segments: torch.Tensor) -> torch.Tensor:
    """Dense attention mask [rows, 1, S, S] (True = masked) for rows [prompt, answer_1, ..., answer_G, pad].

    `segments` [rows, S]: 0 for prompt tokens, j for answer j's tokens, -1 for padding. A token sees earlier tokens
    of the prompt and of its own segment: the prompt is causal, each answer sees the whole prompt and its own past,
    never another answer. Padding sees only itself, so no softmax row is empty (no NaN) and nothing real sees it.
    """
    s = segments.shape[1]
    q, k = segments.unsqueeze(2), segments.unsqueeze(1)  # [rows, S, 1], [rows, 1, S]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & ((k == 0) | (k == q)) & (q >= 0)
    allowed |= torch.eye(s, dtype=torch.bool, device=segments.device)
    return (~allowed).unsqueeze(1)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """The attention mask of shared-prefix rows as the model receives it: the segments [rows, S] viewed as
    [rows, 1, 1, S] int64 (see the module docstring); `dense_mask` expands it where a dense mask is needed."""
    return segments.long().view(segments.shape[0], 1, 1, segments.shape[1])


def is_segment_mask(mask: Optional[torch.Tensor]) -> bool:
    return mask is not None and mask.dtype == torch.long and mask.dim() == 4 and mask.shape[1:3] == (1, 1)


def dense_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`mask` as a dense boolean mask (True = masked): a segment mask is expanded, anything else returned as is."""
    return shared_prefix_mask(mask[:, 0, 0]) if is_segment_mask(mask) else mask


@dataclass(frozen=True)
class PrefixLayout:
    """Gather indices of one micro-batch's shared-prefix rows, built once per forward and used by every layer.

    Flat token indices count Megatron's [s, b] order: column c of row r is c·b + r.
    """

    mask: torch.Tensor  # the attention mask this layout stands for (matched by identity): the segment mask
    rows: int  # b
    seq_len: int  # S
    prompt_len: int  # P_max: the prompt block covers columns 0..P_max-1 of every row
    answers: int  # G answer slots per row
    answer_len: int  # L_max: the longest answer's input tokens (0: no answer has any)
    query_index: torch.Tensor  # [b·G·L_max] flat index of each answer query slot (padded slots: any real token)
    kv_index: torch.Tensor  # [b·G·(P_max + L_max)] flat index of each answer's keys: its row's prompt, then itself
    answer_allowed: torch.Tensor  # [b·G, 1, L_max, P_max + L_max] bool, True = attend (SDPA's convention)
    pad_index: torch.Tensor  # [pads] flat index of each padding token
    out_index: torch.Tensor  # [S·b] where each token's output lies in cat(prompt [P_max·b], answers, padding)

    @staticmethod
    def from_segments(segments: torch.Tensor, answers: int, mask: torch.Tensor) -> "PrefixLayout":
        """`segments` [b, S]: 0 for prompt tokens (columns 0..P-1), j for answer j's tokens (contiguous, in order
        1..G), -1 for padding, as `megatron_r1.rl.batch.collate_shared_prefix` lays them out."""
        b, s = segments.shape
        dev = segments.device
        g = answers
        prompt = (segments == 0).sum(1)  # [b]
        lengths = (segments.unsqueeze(-1) == torch.arange(1, g + 1, device=dev)).sum(1)  # [b, G]
        starts = prompt.unsqueeze(1) + lengths.cumsum(1) - lengths  # [b, G] first column of each answer
        p_max, l_max = (int(x) for x in torch.stack([prompt.max(), lengths.max()]).tolist())  # one host sync
        rows = torch.arange(b, device=dev)
        cols = torch.arange(s, device=dev)

        t = torch.arange(l_max, device=dev)
        valid = t < lengths.unsqueeze(-1)  # [b, G, L_max]
        q_cols = torch.where(valid, starts.unsqueeze(-1) + t, 0)
        query_index = q_cols * b + rows.view(b, 1, 1)  # [b, G, L_max]
        prompt_index = (torch.arange(p_max, device=dev) * b + rows.unsqueeze(1)).unsqueeze(1).expand(b, g, p_max)
        kv_index = torch.cat([prompt_index, query_index], dim=-1)  # [b, G, P_max + L_max]

        sees_prompt = torch.arange(p_max, device=dev) < prompt.view(b, 1, 1, 1)  # [b, 1, 1, P_max]
        own = (t.unsqueeze(1) >= t) & valid.unsqueeze(-2)  # [b, G, L_max, L_max]: causal within the answer
        allowed = torch.cat([sees_prompt.expand(b, g, l_max, p_max), own], dim=-1)
        allowed = allowed.view(b * g, 1, l_max, p_max + l_max)

        # Output source of token (r, c): prompt block r, c; answer block (r, j), c - start; else padding (r, c).
        answer_of = segments.clamp_min(1) - 1  # [b, S]
        in_answer = cols - starts.gather(1, answer_of)
        answer_src = p_max * b + ((rows.unsqueeze(1) * g + answer_of) * l_max + in_answer)
        pad = (segments < 0).t().reshape(-1)  # [S·b]
        pad_src = (p_max * b + b * g * l_max + pad.cumsum(0) - 1).view(s, b).t()
        prompt_src = cols.clamp_max(max(p_max - 1, 0)) * b + rows.unsqueeze(1)
        src = torch.where(segments == 0, prompt_src, torch.where(segments > 0, answer_src, pad_src))
        return PrefixLayout(mask=mask, rows=b, seq_len=s, prompt_len=p_max, answers=g, answer_len=l_max,
                            query_index=query_index.reshape(-1), kv_index=kv_index.reshape(-1),
                            answer_allowed=allowed, pad_index=pad.nonzero().flatten(), out_index=src.t().reshape(-1))


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """Grouped K/V heads (GQA) repeated to `n` query heads along dim -3 ([..., heads, tokens, dim])."""
    return x if x.shape[-3] == n else x.repeat_interleave(n // x.shape[-3], dim=-3)


def block_attention(query, key, value, layout: PrefixLayout, scale: Optional[float], dropout: float):
    """Core attention of shared-prefix rows: [s, b, heads, dim] in, [s, b, heads · v_dim] out (see module doc)."""
    s, b, nq, dq = query.shape
    nkv, dv = key.shape[2], value.shape[-1]
    p, g, l = layout.prompt_len, layout.answers, layout.answer_len
    # (a) prompts: causal over the first P_max columns; a shorter prompt's later columns are dropped below
    qp, kp, vp = (x[:p].permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, P_max, d]
    out_p = F.scaled_dot_product_attention(qp, _heads(kp, nq), _heads(vp, nq), is_causal=True, dropout_p=dropout,
                                           scale=scale)
    parts = [out_p.permute(2, 0, 1, 3).reshape(p * b, nq, dv)]
    # (b) answers: [b·G, L_max] queries against [own prompt, own tokens]
    if l:
        qf = query.reshape(s * b, nq, dq)
        kf = key.reshape(s * b, nkv, key.shape[-1])
        vf = value.reshape(s * b, nkv, dv)
        qa = qf.index_select(0, layout.query_index).view(b * g, l, nq, dq).transpose(1, 2)
        ka = kf.index_select(0, layout.kv_index).view(b * g, p + l, nkv, -1).transpose(1, 2)
        va = vf.index_select(0, layout.kv_index).view(b * g, p + l, nkv, dv).transpose(1, 2)
        out_a = F.scaled_dot_product_attention(qa, _heads(ka, nq), _heads(va, nq), attn_mask=layout.answer_allowed,
                                               dropout_p=dropout, scale=scale)
        parts.append(out_a.transpose(1, 2).reshape(b * g * l, nq, dv))
    # (c) padding: attends to itself only under the dense mask, so its output is its own V
    pads = value.reshape(s * b, nkv, dv).index_select(0, layout.pad_index)
    parts.append(_heads(pads.unsqueeze(2), nq).view(-1, nq, dv))
    return torch.cat(parts).index_select(0, layout.out_index).view(s, b, nq * dv)


class PrefixAttentionTarget:
    """Mixin of the core-attention modules that compute per block while a `PrefixLayout` is active (the local
    `SDPACoreAttention`); defined here so this module needs none of them."""

    prefix_layout: Optional[PrefixLayout] = None  # set by `prefix_attention(model, layout)` for one forward


def _attention_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, PrefixAttentionTarget)]


@contextlib.contextmanager
def prefix_attention(model, layout: PrefixLayout):
    """Inside the block, `model`'s local core attention computes rows masked by `layout.mask` per block.
    A model without `SDPACoreAttention` (Transformer Engine) keeps using the dense mask."""
    modules = _attention_modules(model)
    for m in modules:
        m.prefix_layout = layout
    try:
        yield model
    finally:
        for m in modules:
            m.prefix_layout = None
