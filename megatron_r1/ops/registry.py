"""Name -> advantage estimator and name -> policy loss registries: the one list config validation reads.

`rl.advantage_estimator` and `rl.policy_loss` take a registered name. The built-ins live where their math is
(advantage estimators in reference.py, per-token surrogates in loss.py) and register themselves on import;
`register_advantage_estimator` / `register_policy_loss` add a user's own under a new name. This module imports
no torch; the built-ins (which do) are imported on the first lookup (megatron_r1/registry.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_r1.registry import Registry


@dataclass(frozen=True)
class PolicyLossSpec:
    """A registered policy loss: its per-token surrogate and whether its ratio is per answer (GSPO)."""

    name: str
    surrogate: Callable  # (ratio, log_ratio, advantages, cfg) -> per-token policy-gradient loss, elementwise
    sequence_ratio: bool = False  # the ratio is one per answer (geometric mean of its token ratios)


# The built-ins register themselves when these modules are imported (on the first lookup: they import torch).
_BUILTINS = ("megatron_r1.ops.loss", "megatron_r1.ops.reference")
ESTIMATORS: Registry[Callable] = Registry("advantage estimator", _BUILTINS)
LOSSES: Registry[PolicyLossSpec] = Registry("policy loss", _BUILTINS)


def register_advantage_estimator(name: str):
    """Register `fn(rewards [N], group_size, opts, lengths=None, dp_group=None) -> advantages [N]` under `name`."""
    return ESTIMATORS.register(name)


def register_policy_loss(name: str, sequence_ratio: bool = False):
    """Register a per-token surrogate `fn(ratio, log_ratio, advantages, cfg) -> loss` under `name`."""
    return LOSSES.register(name, lambda fn: PolicyLossSpec(name, fn, sequence_ratio))


def advantage_estimators() -> tuple:
    """The registered estimator names (built-ins first, in registration order)."""
    return ESTIMATORS.names()


def policy_losses() -> tuple:
    """The registered policy loss names."""
    return LOSSES.names()


def get_advantage_estimator(name: str) -> Callable:
    return ESTIMATORS.get(name)


def get_policy_loss(name: str) -> PolicyLossSpec:
    return LOSSES.get(name)
