"""Name -> advantage estimator and name -> policy loss registries: the one list config validation reads.

`rl.advantage_estimator` and `rl.policy_loss` take a registered name. The built-ins live where their math is
(advantage estimators in reference.py, per-token surrogates in loss.py) and register themselves on import;
`register_advantage_estimator` / `register_policy_loss` add a user's own under a new name. This module imports
no torch, so listing the names stays cheap; the built-ins are imported on first lookup.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

_ESTIMATORS: dict[str, Callable] = {}
_LOSSES: dict[str, "PolicyLossSpec"] = {}


@dataclass(frozen=True)
class PolicyLossSpec:
    """A registered policy loss: its per-token surrogate and whether its ratio is per answer (GSPO)."""

    name: str
    surrogate: Callable  # (ratio, log_ratio, advantages, cfg) -> per-token policy-gradient loss, elementwise
    sequence_ratio: bool = False  # the ratio is one per answer (geometric mean of its token ratios)


def register_advantage_estimator(name: str):
    """Register `fn(rewards [N], group_size, opts, lengths=None, dp_group=None) -> advantages [N]` under `name`."""

    def wrap(fn):
        if name in _ESTIMATORS and _ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered by {_ESTIMATORS[name].__module__}")
        _ESTIMATORS[name] = fn
        return fn

    return wrap


def register_policy_loss(name: str, sequence_ratio: bool = False):
    """Register a per-token surrogate `fn(ratio, log_ratio, advantages, cfg) -> loss` under `name`."""

    def wrap(fn):
        if name in _LOSSES and _LOSSES[name].surrogate is not fn:
            raise ValueError(f"policy loss {name!r} is already registered by {_LOSSES[name].surrogate.__module__}")
        _LOSSES[name] = PolicyLossSpec(name, fn, sequence_ratio)
        return fn

    return wrap


def _load_builtins() -> None:
    # imported for their @register_* side effects; deferred so this module stays torch-free and cycle-free
    from megatron_r1.ops import loss, reference  # noqa: F401


def advantage_estimators() -> tuple:
    """The registered estimator names (built-ins first, in registration order)."""
    _load_builtins()
    return tuple(_ESTIMATORS)


def policy_losses() -> tuple:
    """The registered policy loss names."""
    _load_builtins()
    return tuple(_LOSSES)


def get_advantage_estimator(name: str) -> Callable:
    _load_builtins()
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(_ESTIMATORS)}")
    return _ESTIMATORS[name]


def get_policy_loss(name: str) -> PolicyLossSpec:
    _load_builtins()
    if name not in _LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; known: {', '.join(_LOSSES)}")
    return _LOSSES[name]
