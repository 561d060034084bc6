"""Tensor-parallel collectives for the vocab-parallel ops, with Megatron's gradient conventions.

Every TP rank holds an identical copy of the loss, so a value summed across ranks passes its gradient straight
through (Megatron's reduce_from_tensor_model_parallel_region), and an input replicated across ranks receives the
sum of every rank's gradient (copy_to_tensor_model_parallel_region).
"""
import torch
import torch.distributed as dist


def world(tp_group) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


def rank(tp_group) -> int:
    return 0 if tp_group is None else dist.get_rank(tp_group)


def all_reduce_(x: torch.Tensor, tp_group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce in place outside autograd; a no-op without a group."""
    if world(tp_group) > 1:
        dist.all_reduce(x, op=op, group=tp_group)
    return x


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp_group):
        return all_reduce_(x.clone(), tp_group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp_group):
        ctx.tp_group = tp_group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce_(g.clone(), ctx.tp_group), None


def reduce_from_tp(x, tp_group):
    """Sum across TP ranks; the gradient passes through unchanged."""
    return x if world(tp_group) == 1 else _ReduceFromTP.apply(x, tp_group)


def copy_to_tp(x, tp_group):
    """Identity on a replicated input; its gradient is summed across TP ranks."""
    return x if world(tp_group) == 1 else _CopyToTP.apply(x, tp_group)
