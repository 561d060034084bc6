"""Router replay: the trainer's MoE layers route each token to the experts the generator chose for it.

Why: an MoE policy's log-prob of a token depends on which experts its router picks, and the router's top-k is
discontinuous: the generator (`inference.functional`) and the trainer (Megatron's TopKRouter) compute the same
scores with different kernels and batch shapes, and after any update they read slightly different weights, so a
token near a routing boundary goes to other experts in the update than in the rollout. The importance ratio
then compares two different networks (the mismatch peers report collapsing MoE RL runs). With replay, the
trainer's old-log-prob and gradient passes use the rollout's expert ids; the routing *probabilities* are still
the trainer's own scores gathered at those ids, so gradients reach the router as usual.

How: Megatron-Core 0.16.1's hook (`TopKRouter.router_replay`, consulted by
`moe_utils.topk_routing_with_score_function` through `RouterReplay.get_replay_topk` on the unfused router path).
`install` attaches a `LayerReplay` (a `RouterReplay`) to each MoE router of one model chunk rather than setting
`TransformerConfig.moe_enable_routing_replay`: the reference model, and the several models a test process
builds, must not share the class-wide instance list that Megatron's static `set_replay_data` addresses by
instantiation order, and every chunk (a pipeline stage holds only its own layers) finds its layers by their
global `layer_number`. `LayerReplay` extends Megatron's `get_replay_topk` in three ways:
- it also computes the trainer's own top-k, to count the (token, layer) pairs whose routing differs from the
  recorded one (`RoutingMismatch`: the `rl/routing_mismatch` metric), with or without replay;
- ids < 0 mark tokens without a record (padding columns): those route by themselves;
- activation recompute: the recomputed forward in backward (Megatron's `CheckpointFunction.backward`, where
  `is_checkpointing()` holds and grad is enabled) takes Megatron's REPLAY_BACKWARD path (the FIFO of targets,
  one per micro-batch forward, which is also right for 1F1B's interleaving) instead of the current target.

Token order: Megatron's router sees hidden states [s, b, h] flattened to [s * b] (s-major), and with sequence
parallelism each TP rank only its sequence chunk; the recorded ids come in the batch's [b, s] layout and are
reordered (`set_targets`) to match.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_r1.errors import ConfigError
from megatron_r1.models.unwrap import unwrap


class RoutingMismatch:
    """Counts of (token, layer) pairs with a recorded routing, and of those where the trainer's own top-k expert
    set differs from it."""

    def __init__(self):
        self.differ: Optional[torch.Tensor] = None
        self.total: Optional[torch.Tensor] = None

    def add(self, differ: torch.Tensor, total: torch.Tensor) -> None:
        self.differ = differ if self.differ is None else self.differ + differ
        self.total = total if self.total is None else self.total + total

    def fraction(self, group=None) -> Optional[float]:
        """differ / total summed over `group`'s ranks (every rank must call it); None when nothing was counted
        anywhere. Summing over all ranks is right for any layout: ranks that see the same tokens (TP without
        sequence parallelism) scale both counts alike."""
        import torch.distributed as dist

        device = self.total.device if self.total is not None else torch.device("cpu")
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        if self.total is not None:
            counts[0], counts[1] = self.differ.double(), self.total.double()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            counts = counts.cpu() if dist.get_backend(group) == "gloo" else counts
            dist.all_reduce(counts, group=group)
        return float(counts[0] / counts[1]) if float(counts[1]) > 0 else None


class LayerReplay(RouterReplay):
    """One MoE layer's replay state (see the module docstring)."""

    def __init__(self, layer: int):
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)  # addressed per model chunk, not class-wide
        self.layer = layer  # global decoder layer index (layer_number - 1)
        self.measure: Optional[RoutingMismatch] = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        action = self.router_replay_action
        if action is None:
            return default_compute_topk(scores, topk, num_groups, group_topk)
        own_probs, own_idx = default_compute_topk(scores, topk, num_groups, group_topk)
        if action == RouterReplayAction.RECORD:
            self.record_indices(own_idx)
        from megatron.core.tensor_parallel.random import is_checkpointing

        recompute = action == RouterReplayAction.REPLAY_BACKWARD or (is_checkpointing() and torch.is_grad_enabled())
        if recompute:
            target = self.replay_backward_list.pop(0) if self.replay_backward_list else None
        else:
            target = self.target_topk_idx
        if target is None:  # no record for this forward: the trainer's own routing
            return own_probs, own_idx
        target = target.to(scores.device, torch.long)
        if target.shape != own_idx.shape:
            raise ValueError(f"router replay: layer {self.layer} got {tuple(target.shape)} recorded expert ids for "
                             f"{tuple(own_idx.shape)} routed (tokens, k): the record does not match the batch")
        known = target[:, 0] >= 0
        if self.measure is not None and not recompute:
            differ = (own_idx.sort(-1).values != target.sort(-1).values).any(-1) & known
            self.measure.add(differ.sum(), known.sum())
        if action == RouterReplayAction.RECORD:
            return own_probs, own_idx
        idx = torch.where(known[:, None], target, own_idx)
        return scores.gather(1, idx), idx


def _moe_routers(model) -> Iterator:
    for layer in unwrap(model).decoder.layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None:
            yield layer, router


def install(model) -> list[LayerReplay]:
    """Attach a `LayerReplay` to every MoE router of this model chunk (again: the same ones); returns them."""
    out = []
    for layer, router in _moe_routers(model):
        cfg = router.config
        if getattr(cfg, "moe_router_fusion", False):
            raise ConfigError("rl.router_replay: Megatron's fused router (moe_router_fusion) bypasses the replay "
                              "hook; build the model with the unfused router")
        if not isinstance(router.router_replay, LayerReplay):
            router.router_replay = LayerReplay(layer.layer_number - 1)
        out.append(router.router_replay)
    return out


def replays(model) -> list[LayerReplay]:
    """The installed `LayerReplay`s of this model chunk (empty: none installed)."""
    return [r.router_replay for _, r in _moe_routers(model) if isinstance(r.router_replay, LayerReplay)]


@contextlib.contextmanager
def routing_replay(model_chunks: list, replay: bool, measure: Optional[RoutingMismatch] = None):
    """Inside: forwards that are handed a record (`set_targets`) route by it (`replay`) or only compare their
    own routing with it (`measure`). Targets are cleared on exit."""
    reps = [r for chunk in model_chunks for r in replays(chunk)]
    action = RouterReplayAction.REPLAY_FORWARD if replay else RouterReplayAction.RECORD
    for r in reps:
        r.clear_indices()
        r.set_router_replay_action(action)
        r.measure = measure
    try:
        yield reps
    finally:
        for r in reps:
            r.clear_indices()
            r.clear_router_replay_action()
            r.measure = None


def set_targets(model, routing: torch.Tensor, layers: tuple) -> None:
    """Hand one micro-batch's record — expert ids [b, s, recorded layers, k] in the batch's layout, `layers` the
    global decoder layer of each — to the active replays of this chunk, in Megatron's token order."""
    reps = [r for r in replays(model) if r.router_replay_action is not None]
    if not reps:
        return
    from megatron.core import parallel_state as ps

    b, s, _, k = routing.shape
    tp = ps.get_tensor_model_parallel_world_size() if ps.is_initialized() else 1
    if tp > 1 and unwrap(model).config.sequence_parallel:  # each TP rank routes its own sequence chunk
        chunk = s // tp
        rank = ps.get_tensor_model_parallel_rank()
        routing = routing[:, rank * chunk:(rank + 1) * chunk]
    for r in reps:
        if r.layer not in layers:
            raise ValueError(f"router replay: no recorded routing for decoder layer {r.layer} (the record holds "
                             f"layers {list(layers)})")
        ids = routing[:, :, layers.index(r.layer)]  # [b, s, k]
        r.set_target_indices(ids.transpose(0, 1).reshape(-1, k))
