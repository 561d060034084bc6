"""In-memory weight transfer between Megatron models of different layouts (refit without disk).

A *full* state dict holds every tensor unsharded, named as a TP=1 / EP=1 model names it (global expert indices,
SwiGLU fc1 as [gate; up]). `full_state_dict(model)` gathers one from a (TP/EP-sharded) model — every rank of the
model's groups must call it; `load_full_state_dict(model, full)` slices it into this rank's shards. Together they
move the trainer's weights into an engine with another TP size or dtype, or another layer spec: names are the local
spec's (`layer_adapter.canonical_name`: Transformer Engine's fused `...linear_qkv.layer_norm_weight` is
`...input_layernorm.weight` here), so a TE-spec trainer refits a local-spec engine and back. Expert tensor
parallelism (ETP > 1) is not supported here (DeepSeek-V3 uses ETP = 1).
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megatron_r1.errors import CheckpointError
from megatron_r1.inference.layer_adapter import canonical_name
from megatron_r1.models.unwrap import unwrap

_EXPERT = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")
_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)")


def _groups():
    from megatron.core import parallel_state as ps

    if not ps.is_initialized():
        return None, 1, 0, None, 1, 0
    tp, ep = ps.get_tensor_model_parallel_group(), ps.get_expert_model_parallel_group()
    if ps.get_expert_tensor_parallel_world_size() > 1:
        raise CheckpointError("weight refit across layouts does not support expert tensor parallelism > 1")
    return (tp, dist.get_world_size(tp), dist.get_rank(tp), ep, dist.get_world_size(ep), dist.get_rank(ep))


def _tensors(model):
    """Parameters and persistent-or-routing buffers (expert_bias) by their local-spec name (`canonical_name`)."""
    out = {canonical_name(name): p for name, p in model.named_parameters()}
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            out[name] = buf
    return out


def _stage_tensors(model):
    """`_tensors` named as the whole model names them: a pipeline stage's decoder layers by their global index
    (layer_number - 1, not the stage's own 0..n-1). A later stage's copy of a tied output layer is still here as
    `output_layer.weight` (see `_tied_output`: the full model has only the embedding)."""
    numbers = [int(layer.layer_number) - 1 for layer in model.decoder.layers]
    out = {}
    for name, t in _tensors(model).items():
        m = _LAYER.match(name)
        if m:
            name = f"{m.group(1)}{numbers[int(m.group(2))]}{m.group(3)}"
        out[name] = t
    return out


def _tied_output(model) -> bool:
    """A later pipeline stage whose output layer holds its own copy of the tied embedding."""
    return bool(model.share_embeddings_and_output_weights and not getattr(model, "pre_process", True))


def _pp_group():
    from megatron.core import parallel_state as ps

    if not ps.is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    return ps.get_pipeline_model_parallel_group()


def _is_gated_fc1(name: str, model) -> bool:
    return name.endswith("linear_fc1.weight") and model.config.gated_linear_unit


def _num_local_experts(model) -> int:
    for m in model.modules():
        if hasattr(m, "local_experts"):
            return len(m.local_experts)
    return 0


def _global_name(name: str, ep_rank: int, n_local: int) -> str:
    m = _EXPERT.match(name)
    return f"{m.group(1)}{ep_rank * n_local + int(m.group(2))}{m.group(3)}" if m else name


def _is_tp_sharded(t, name: str) -> bool:
    # Experts are EP-sharded (ETP = 1): whole on each rank, even if Megatron marks them tensor_model_parallel.
    return bool(getattr(t, "tensor_model_parallel", False)) and not _EXPERT.match(name)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every tensor of `model` unsharded (gathered over TP, EP and the pipeline stages); collective over the
    model's groups."""
    model = unwrap(model)
    tp, tp_size, _, ep, ep_size, ep_rank = _groups()
    n_local = _num_local_experts(model)
    full = {}
    tensors = _stage_tensors(model)
    if _tied_output(model):
        tensors.pop("output_layer.weight", None)
    for name, param in tensors.items():
        t = param.detach()  # (detach drops Megatron's sharding attributes: read them from `param`)
        if _is_tp_sharded(param, name) and tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(parts, t.contiguous(), group=tp)
            dim = param.partition_dim
            if _is_gated_fc1(name, model):  # each shard is [gate_r; up_r]
                gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
                full[name] = torch.cat(list(gates) + list(ups), dim=0)
            else:
                full[name] = torch.cat(parts, dim=dim)
        elif _EXPERT.match(name) and ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(ep_size)]
            dist.all_gather(parts, t.contiguous(), group=ep)
            for r, p in enumerate(parts):
                full[_global_name(name, r, n_local)] = p.clone()
        else:
            full[_global_name(name, ep_rank, n_local)] = t.clone()
    pp = _pp_group()
    if pp is not None:  # every stage's tensors, on every stage (by value, on the CPU)
        parts: list = [None] * dist.get_world_size(pp)
        dist.all_gather_object(parts, {k: v.cpu() for k, v in full.items()}, group=pp)
        device = next(iter(full.values())).device if full else torch.device("cpu")
        full = {k: v.to(device) for part in parts for k, v in part.items()}
    return full


def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Copy a full state dict into this rank's shards of `model` (in place, any dtype; vocab padding adapted)."""
    model = unwrap(model)
    _, tp_size, tp_rank, _, _, ep_rank = _groups()
    n_local = _num_local_experts(model)
    mine = _stage_tensors(model)
    if _tied_output(model) and "output_layer.weight" not in full:  # the tied output weight is the embedding
        full = {**full, "output_layer.weight": full.get("embedding.word_embeddings.weight")}
    missing = [_global_name(n, ep_rank, n_local) for n in mine if full.get(_global_name(n, ep_rank, n_local)) is None]
    if missing:
        raise CheckpointError(f"refit: the source has no tensor for {missing[:3]} (and {max(0, len(missing) - 3)} "
                              "more): the models differ in architecture")
    with torch.no_grad():
        for name, t in mine.items():
            src = full[_global_name(name, ep_rank, n_local)]
            if _is_tp_sharded(t, name) and tp_size > 1:
                dim = t.partition_dim
                if _is_gated_fc1(name, model):
                    gate, up = src.chunk(2, dim=0)
                    src = torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
                else:
                    src = _fit_rows(src, t.shape[dim] * tp_size, dim, name).chunk(tp_size, dim)[tp_rank]
            elif src.shape != t.shape:
                src = _fit_rows(src, t.shape[0], 0, name)
            if src.shape != t.shape:
                raise CheckpointError(f"refit: {name} has shape {tuple(src.shape)} in the source, "
                                      f"{tuple(t.shape)} here")
            t.copy_(src)


def _fit_rows(src, rows: int, dim: int, name: str):
    """Vocab padding differs between TP sizes: pad with zeros or drop padded rows of embedding / output layers."""
    if src.shape[dim] == rows or "word_embeddings" not in name and "output_layer" not in name:
        return src
    if src.shape[dim] > rows:
        return src.narrow(dim, 0, rows)
    pad = list(src.shape)
    pad[dim] = rows - src.shape[dim]
    return torch.cat([src, src.new_zeros(pad)], dim=dim)


def copy_same_layout(src_model, dst_model) -> None:
    """Copy every tensor of `src_model` into `dst_model` (same names and shard shapes; dtype may differ)."""
    src, dst = _tensors(src_model), _tensors(dst_model)
    if src.keys() != dst.keys():
        diff = sorted(set(src) ^ set(dst))[:3]
        raise CheckpointError(f"refit: source and engine models differ (e.g. {diff}); pass a full state dict")
    with torch.no_grad():
        for name, t in dst.items():
            if t.shape != src[name].shape:
                raise CheckpointError(f"refit: {name} is {tuple(src[name].shape)} in the source, {tuple(t.shape)} "
                                      "here; pass weights.full_state_dict(source) to reshard")
            t.copy_(src[name])
