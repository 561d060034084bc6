"""Move weights between HF tensors and a built Megatron model, in memory, one tensor at a time.

`load_hf_into_model` fills this rank's shard of the model (any TP/PP/EP layout) from an HF checkpoint: for every
rule whose Megatron tensor lives on this rank it reads the HF tensors, transforms them to the global Megatron
tensor, and copies this rank's slice into the parameter. Peak extra memory: one global tensor (plus its HF
parts). `iter_hf_tensors` walks a TP=1/PP=1/EP=1 model and yields HF tensors in checkpoint order.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from tqdm import tqdm

from megatron_r1.config import ModelConfig
from megatron_r1.checkpoint.convert.hf_io import HFCheckpoint
from megatron_r1.checkpoint.convert.mapping import VOCAB_PARAMS, HFOptions, Rule, build_rules
from megatron_r1.errors import CheckpointError
from megatron_r1.models.unwrap import unwrap

# Buffers that are state (converted); the others (rotary caches, token counters) are recomputed.
STATE_BUFFERS = ("expert_bias",)


def _global_name(model, local: str) -> str:
    """This rank's parameter name -> the TP=1/PP=1/EP=1 name (global layer and expert numbers)."""
    parts = local.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    if "local_experts" in parts:
        i = parts.index("local_experts")
        experts = model.get_submodule(".".join(local.split(".")[:i]))
        moe = model.get_submodule(".".join(local.split(".")[:i - 1]))
        indices = getattr(experts, "local_expert_indices", None) or moe.local_expert_indices
        parts[i + 1] = str(indices[int(parts[i + 1])])
    return ".".join(parts)


def local_tensors(model) -> dict[str, tuple[str, torch.Tensor]]:
    """global name -> (local name, tensor) for every parameter and state buffer on this rank."""
    model = unwrap(model)
    out = {}
    for name, p in model.named_parameters():
        out[_global_name(model, name)] = (name, p)
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] in STATE_BUFFERS:
            out[_global_name(model, name)] = (name, b)
    return out


def _tp_rank_size(local_name: str) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if not ps.is_initialized():
        return 0, 1
    if ".experts." in local_name and ".shared_experts." not in local_name:
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def shard_for_rank(global_name: str, local_name: str, full: torch.Tensor, target: torch.Tensor,
                   vocab_size: int) -> torch.Tensor:
    """This rank's slice of `full` (a global tensor) shaped like `target`: vocab padding, TP split, SwiGLU halves."""
    rank, size = _tp_rank_size(local_name)
    if global_name in VOCAB_PARAMS:
        rows = target.shape[0] * size  # the model's own padded vocab (its shard × TP)
        if full.shape[0] != vocab_size:
            raise CheckpointError(f"{global_name}: {full.shape[0]} vocab rows, config says vocab_size={vocab_size}")
        full = torch.cat([full, full.new_zeros(rows - vocab_size, *full.shape[1:])]) if rows > vocab_size else full
    if tuple(full.shape) == tuple(target.shape):
        return full
    dims = [d for d in range(full.dim()) if full.shape[d] != target.shape[d]] if full.dim() == target.dim() else []
    if len(dims) != 1 or full.shape[dims[0]] != target.shape[dims[0]] * size:
        raise CheckpointError(f"{global_name}: checkpoint shape {tuple(full.shape)} does not fit the model's "
                              f"{tuple(target.shape)} (TP {size}); does config.json match the weights?")
    d = dims[0]
    if local_name.endswith("linear_fc1.weight"):  # [gate; up]: each half is split across TP ranks
        gate, up = full.chunk(2, dim=d)
        return torch.cat([gate.chunk(size, dim=d)[rank], up.chunk(size, dim=d)[rank]], dim=d)
    return full.chunk(size, dim=d)[rank]


def _check_names(hf: HFCheckpoint, rules: list[Rule], opts: HFOptions) -> None:
    known = {n for r in rules for n in r.hf} | set(opts.ignored)
    needed = {n for r in rules if not r.export_only for n in r.hf}
    present = set(hf.names())
    missing = sorted(needed - present)
    extra = sorted(n for n in present - known if not n.endswith("rotary_emb.inv_freq"))
    if missing or extra:
        msg = []
        if missing:
            msg.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if extra:
            msg.append(f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:3])})")
        raise CheckpointError(f"{hf.path}: config.json does not match the weights: {'; '.join(msg)}")


@torch.no_grad()
def load_hf_into_model(model, hf: HFCheckpoint, m: ModelConfig, opts: HFOptions = HFOptions(),
                       progress: bool = True) -> int:
    """Fill this rank's part of `model` from HF checkpoint `hf`; returns the number of tensors set.

    Every parameter and expert bias of this rank must be covered (else CheckpointError): nothing is left at
    its random initialisation.
    """
    model = unwrap(model)
    rules = build_rules(m, opts)
    _check_names(hf, rules, opts)
    targets = local_tensors(model)
    todo = [r for r in rules if not r.export_only and r.mcore in targets]
    done = set()
    for rule in tqdm(todo, desc="hf -> mcore", unit="tensor", disable=not progress):
        parts = [hf.get(n) for n in rule.hf]
        full = rule.to_mcore(parts)
        del parts
        local_name, target = targets[rule.mcore]
        piece = shard_for_rank(rule.mcore, local_name, full, target, m.vocab_size)
        target.copy_(piece.to(target.dtype))
        done.add(rule.mcore)
        del full, piece
    left = sorted(set(targets) - done)
    if left:
        raise CheckpointError(f"{hf.path}: no HF tensor for model parameters {', '.join(left[:5])}"
                              f"{' ...' if len(left) > 5 else ''}")
    return len(done)


@torch.no_grad()
def iter_hf_tensors(model, m: ModelConfig, opts: HFOptions = HFOptions(),
                    dtypes: Optional[dict[str, str]] = None,
                    default_dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of a whole (TP=1, PP=1, EP=1) model, each in its original HF dtype when known."""
    model = unwrap(model)
    targets = local_tensors(model)
    for rule in build_rules(m, opts):
        if rule.mcore not in targets:
            raise CheckpointError(f"model has no {rule.mcore} (mcore -> HF needs the whole model in one process)")
        t = targets[rule.mcore][1].detach()
        if rule.mcore in VOCAB_PARAMS:
            t = t[: m.vocab_size]
        for name, piece in zip(rule.hf, rule.to_hf(t)):
            dt = (dtypes or {}).get(name)
            want = getattr(torch, dt) if dt else (default_dtype if piece.is_floating_point() and default_dtype
                                                     else piece.dtype)
            yield name, piece.to(want)


def count_rules(m: ModelConfig, opts: HFOptions = HFOptions()) -> int:
    return sum(len(r.hf) for r in build_rules(m, opts))
