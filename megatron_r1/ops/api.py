"""The public ops, each routed to the backend dispatch.py selects for its tensors' device."""
from . import chunked, reference
from .dispatch import rows_for, select_backend
from .loss import PolicyLossConfig, aggregation_weights, policy_metrics, tis_weights


def token_logprobs(hidden, weight, tokens, temperature=1.0, return_entropy=False, tp_group=None):
    """fp32 log p(token) [T] (and entropy [T]) from hidden [T, H] and output weight [V_local, H].

    Differentiable w.r.t. hidden and weight; never holds the [T, V] logits. With `tp_group` the weight's vocab
    rows are sharded across the group (rank r holds ids [r·V_local, (r+1)·V_local)), tokens are global ids, and
    hidden is replicated: its gradient is summed over the group.
    """
    backend = select_backend(hidden.device.type)
    if backend == "reference":
        return reference.token_logprobs(hidden, weight, tokens, temperature, return_entropy, tp_group)
    return chunked.token_logprobs(hidden, weight, tokens, temperature, return_entropy, tp_group,
                                  rows=rows_for(backend))


def logprobs_from_logits(logits, tokens, temperature=1.0, return_entropy=False, tp_group=None):
    """fp32 log p(token) [T] (and entropy [T]) from (vocab-parallel) logits [T, V_local], without an fp32 copy."""
    backend = select_backend(logits.device.type)
    if backend == "reference":
        return reference.logprobs_from_logits(logits, tokens, temperature, return_entropy, tp_group)
    return chunked.logprobs_from_logits(logits, tokens, temperature, return_entropy, tp_group,
                                        rows=rows_for(backend))


def group_advantages(rewards, group_size, scale="std", eps=1e-6):
    """Advantages [B·G] from rewards [B·G] (each prompt's G answers contiguous); scale "std" or "none"."""
    backend = select_backend(rewards.device.type)
    if backend == "cuda":
        from . import cuda_ext

        return cuda_ext.group_advantages(rewards, group_size, scale, eps)
    if backend == "triton":
        from . import triton_kernels

        return triton_kernels.group_advantages(rewards, group_size, scale, eps)
    return reference.group_advantages(rewards, group_size, scale, eps)


def grpo_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, clip_low=0.2, clip_high=0.2,
                     kl_coef=0.0, kl_estimator="k3", loss_agg="seq-mean-token-mean", ratio_level="token",
                     behavior_logprobs=None, tis_cap=None):
    """Clipped GRPO policy loss over [B, L] answers with per-answer advantages [B]; returns (loss, metrics).

    Semantics are those of reference.grpo_policy_loss. The elementwise work is small next to the log-probs, so
    only the CUDA kernel replaces the torch code, and only for the token-level ratio.
    """
    backend = select_backend(logprobs.device.type)
    if backend != "cuda" or ratio_level != "token":
        return reference.grpo_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low,
                                          clip_high, kl_coef, kl_estimator, loss_agg, ratio_level,
                                          behavior_logprobs, tis_cap)
    from . import cuda_ext

    cfg = PolicyLossConfig(clip_low, clip_high, kl_coef, kl_estimator, loss_agg, ratio_level, tis_cap)
    cfg.check_inputs(ref_logprobs, behavior_logprobs)
    mask = mask.bool()
    b, l = mask.shape
    adv = advantages.float()[:, None].expand(b, l)
    tis = tis_weights(old_logprobs, behavior_logprobs, mask, tis_cap) if tis_cap is not None else None
    loss, ratio, kl = cuda_ext.policy_loss_terms(
        logprobs.reshape(-1), old_logprobs.reshape(-1), adv.reshape(-1), mask.reshape(-1),
        aggregation_weights(mask, cfg.loss_agg).reshape(-1), None if ref_logprobs is None else ref_logprobs.reshape(-1),
        None if tis is None else tis.reshape(-1), cfg)
    return loss, policy_metrics(ratio.view(b, l), adv, mask, cfg, None if ref_logprobs is None else kl.view(b, l))


def fused_grpo_loss(hidden, weight, tokens, old_logprobs, advantages, mask, ref_logprobs=None, clip_low=0.2,
                    clip_high=0.2, kl_coef=0.0, kl_estimator="k3", loss_agg="seq-mean-token-mean",
                    ratio_level="token", behavior_logprobs=None, tis_cap=None, temperature=1.0, tp_group=None):
    """GRPO loss straight from hidden states [B, L, H]: grpo_policy_loss(token_logprobs(...)) in one pass.

    Gradients of hidden and weight are produced chunk by chunk during forward (3 matmuls, no logits recompute).
    """
    backend = select_backend(hidden.device.type)
    args = (old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high, kl_coef, kl_estimator, loss_agg,
            ratio_level, behavior_logprobs, tis_cap)
    if backend == "reference":
        b, l = tokens.shape
        logp = reference.token_logprobs(hidden.reshape(b * l, -1), weight, tokens.reshape(-1), temperature,
                                        False, tp_group).view(b, l)
        return reference.grpo_policy_loss(logp, *args)
    return chunked.fused_policy_loss(hidden, weight, tokens, *args, temperature=temperature, tp_group=tp_group,
                                     rows=rows_for(backend))
