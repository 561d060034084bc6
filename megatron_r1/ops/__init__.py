"""Fused GRPO ops: token log-probs from hidden states or logits, group advantages, clipped policy loss.

Every op has a readable torch reference (reference.py, the spec), a chunked torch path for CPUs, Triton kernels
and CUDA kernels (csrc/); dispatch.py picks one per call (override: MEGATRON_R1_OPS).
"""
from .api import fused_grpo_loss, group_advantages, grpo_policy_loss, logprobs_from_logits, token_logprobs
from .dispatch import BACKENDS, select_backend

__all__ = [
    "BACKENDS",
    "fused_grpo_loss",
    "group_advantages",
    "grpo_policy_loss",
    "logprobs_from_logits",
    "select_backend",
    "token_logprobs",
]
