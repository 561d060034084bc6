"""Rotary embeddings at given position ids: the bridge that lets packed rows (a prompt followed by several answers,
each answer's positions restarting after the prompt) use RoPE correctly.

Why: in Megatron-Core 0.16.1 the rotary modules ignore `position_ids`. `GPTModel.rotary_pos_emb` (dense Llama /
Qwen2) and each MLA layer's `self_attention.rotary_pos_emb` (`RotaryEmbedding`, or `YarnRotaryEmbedding`, which
returns `(emb, mscale)`) are called with a length S and return the angles of positions 0..S-1 as [S, 1, 1, d].
`install_position_bridge` (called by the model builder) adds a forward hook to each of them; inside
`with rotary_positions(model, position_ids):` the hook replaces that output with the angles gathered at the given
positions, [S, b, 1, d], which Megatron's bshd `apply_rotary_pos_emb` broadcasts over heads. Outside the block the
hook returns nothing and the modules behave exactly as before (generation, pre-training, SFT).

Where it holds (checked in Megatron-Core 0.16.1's source):
- TP with sequence parallelism: both call sites ask for the full sequence length (`get_rotary_seq_len` multiplies
  the local length by TP), and rope is applied after the sequence gather — MLA's q/kv up-projections are
  column-parallel on sequence-parallel input, so q and k have the full sequence on every rank — so the full
  [b, S] position ids are the right ones on every TP rank.
- Pipeline parallelism: every stage calls its own rotary modules; the position ids come with each micro-batch,
  which every stage's forward step reads.
Not supported (refused with an error): context parallelism (the angles would need the CP rank's slice), fused rope
(`apply_rope_fusion` takes cos/sin caches, not these angles), and activation recomputation of MLA layers (MLA
computes its rotary embedding inside the recomputed layer, which the backward pass re-runs outside this block).
"""
from __future__ import annotations

import contextlib

import torch

_ATTR = "_r1_position_ids"  # (position ids [b, s], their max + 1) while a `rotary_positions` block is active


def _rotary_classes() -> tuple:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return (RotaryEmbedding,)  # YarnRotaryEmbedding is a subclass


def _gathered(module, args, kwargs, output):
    active = getattr(module, _ATTR, None)
    if active is None:
        return None
    positions, needed = active
    max_seq_len = args[0] if args else kwargs["max_seq_len"]
    cp_group = kwargs.get("cp_group", args[3] if len(args) > 3 else None) or getattr(module, "cp_group", None)
    if cp_group is not None and cp_group.size() > 1:
        raise RuntimeError("rotary_positions: context parallelism is not supported")
    if max_seq_len != positions.shape[1]:
        raise RuntimeError(f"rotary_positions: the model asked for {max_seq_len} rotary positions but the position "
                           f"ids cover {positions.shape[1]} (sequence length mismatch)")
    is_yarn = isinstance(output, tuple)
    table = output[0] if is_yarn else output  # [max_seq_len, 1, 1, d]: angles of positions 0..max_seq_len-1
    if needed > table.shape[0]:
        table = module.forward(needed)  # lru-cached in Megatron
        table = table[0] if is_yarn else table
    emb = table[:, 0, 0, :][positions.to(table.device)]  # [b, s, d]
    emb = emb.transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, d]
    return (emb, output[1]) if is_yarn else emb


def install_position_bridge(model) -> int:
    """Hook every rotary module of `model` (GPTModel's and each MLA layer's); returns how many were hooked."""
    count = 0
    for module in model.modules():
        if isinstance(module, _rotary_classes()) and not getattr(module, "_r1_position_bridge", False):
            module.register_forward_hook(_gathered, with_kwargs=True)
            module._r1_position_bridge = True
            count += 1
    return count


@contextlib.contextmanager
def rotary_positions(model, position_ids: torch.Tensor):
    """Inside the block, `model`'s rotary embeddings use `position_ids` [b, s] instead of 0..s-1."""
    config = model.config
    if getattr(config, "apply_rope_fusion", False):
        raise RuntimeError("rotary_positions: apply_rope_fusion uses cos/sin caches the bridge does not cover")
    if config.multi_latent_attention and getattr(config, "recompute_granularity", None):
        raise RuntimeError("rotary_positions: MLA computes rope inside recomputed layers, which the backward pass "
                           "re-runs outside this block; disable activation recomputation")
    modules = [m for m in model.modules() if getattr(m, "_r1_position_bridge", False)]
    if not modules:
        raise RuntimeError("rotary_positions: the model has no bridged rotary module (build it with "
                           "megatron_r1.models.build_model)")
    active = (position_ids, int(position_ids.max()) + 1)  # one host sync per forward, not one per layer
    for m in modules:
        setattr(m, _ATTR, active)
    try:
        yield model
    finally:
        for m in modules:
            setattr(m, _ATTR, None)
