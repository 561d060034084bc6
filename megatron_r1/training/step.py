"""One optimizer step through Megatron's pipeline schedule, with the fault handling every stage shares.

A step whose loss or gradients are not finite is skipped: gradients are dropped, the weights and optimizer state
are kept, and the step is reported as skipped (all ranks agree, so no rank steps alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_r1.models.unwrap import unwrap
from megatron_r1.training.setup import TrainState


@dataclass
class StepResult:
    loss: float  # mean of the micro-batches' "loss" metric (DP-averaged); NaN on ranks without the last stage
    grad_norm: float
    lr: float
    skipped: bool
    metrics: dict = field(default_factory=dict)  # means of every metric the loss function reported


def _reduce_metrics(losses: list[dict]) -> dict:
    """Average the loss functions' metric dicts over micro-batches, then over DP ranks (last stage only)."""
    from megatron.core import parallel_state as ps

    if not losses:
        return {}
    keys = sorted(losses[0].keys())
    vals = torch.tensor([[float(d[k]) for k in keys] for d in losses], dtype=torch.float64).mean(0)
    if ps.get_data_parallel_world_size() > 1:
        group = ps.get_data_parallel_group()
        dist.all_reduce(vals, group=group)
        vals /= ps.get_data_parallel_world_size()
    return dict(zip(keys, vals.tolist()))


def grads_are_finite(model_chunks: list) -> bool:
    """True when every local gradient is finite, agreed across all ranks (MIN all-reduce)."""
    ok = True
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None and not torch.isfinite(g).all():
                ok = False
                break
    flag = torch.tensor([1.0 if ok else 0.0], device=_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0.5)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def train_step(state: TrainState, forward_step_func: Callable, data_iterator: Iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int) -> StepResult:
    """Forward/backward over `num_microbatches` micro-batches, then one optimizer + LR-scheduler step.

    `forward_step_func(data_iterator, model) -> (output, loss_func)` is Megatron's contract; `loss_func(output)`
    returns `(loss, {"loss": ..., other metrics})` for one micro-batch. The caller advances `state.step` (a stage
    step may hold several optimizer steps, e.g. GRPO mini-batches).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=state.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=False,
    )
    metrics = _reduce_metrics(losses or [])
    lr = state.optimizer.param_groups[0]["lr"]
    if not grads_are_finite(state.model):
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        state.extra["skipped_steps"] = state.extra.get("skipped_steps", 0) + 1
        return StepResult(loss=metrics.get("loss", math.nan), grad_norm=math.nan, lr=lr, skipped=True,
                          metrics=metrics)
    update_ok, grad_norm, _ = state.optimizer.step()
    if update_ok:
        state.scheduler.step(increment=1)
    _update_expert_bias_metrics(state, metrics)
    return StepResult(loss=metrics.get("loss", math.nan), grad_norm=float(grad_norm or 0.0), lr=lr,
                      skipped=not update_ok, metrics=metrics)


def _update_expert_bias_metrics(state: TrainState, metrics: dict) -> None:
    """MoE load and the aux-loss-free balancing bias per layer (what users watch for routing collapse)."""
    for chunk in state.model:
        model = unwrap(chunk)
        decoder = getattr(model, "decoder", None)
        if decoder is None:
            continue
        for layer in decoder.layers:
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is None:
                continue
            n = layer.layer_number
            bias = getattr(router, "expert_bias", None)
            if bias is not None:
                metrics[f"moe/layer{n}_bias_absmax"] = float(bias.abs().max())
            load = getattr(router, "last_load", None)
            if load is not None:
                metrics[f"moe/layer{n}_load_max_over_mean"] = float(load.max() / load.float().mean().clamp_min(1e-9))
