"""Fused GRPO ops: token log-probs from hidden states or logits, advantages, the policy loss.

Every op has a readable torch reference (reference.py, the spec), a chunked torch path for CPUs, Triton kernels
and CUDA kernels (csrc/); dispatch.py picks one per call (override: MEGATRON_R1_OPS). Advantage estimators and
policy losses are registered by name (registry.py): `rl.advantage_estimator` and `rl.policy_loss` pick one.
"""
from .api import (compute_advantages, fused_grpo_loss, group_advantages, grpo_policy_loss, logprobs_from_logits,
                  token_logprobs)
from .dispatch import BACKENDS, select_backend
from .loss import PolicyLossConfig
from .reference import AdvantageOptions
from .registry import (advantage_estimators, policy_losses, register_advantage_estimator,
                       register_policy_loss)

__all__ = [
    "BACKENDS",
    "AdvantageOptions",
    "PolicyLossConfig",
    "advantage_estimators",
    "compute_advantages",
    "fused_grpo_loss",
    "group_advantages",
    "grpo_policy_loss",
    "logprobs_from_logits",
    "policy_losses",
    "register_advantage_estimator",
    "register_policy_loss",
    "select_backend",
    "token_logprobs",
]
