"""The public ops, each routed to the backend dispatch.py selects for its tensors' device."""
from . import chunked, cuda_ext, reference
from .dispatch import _triton_importable, rows_for, select_backend
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


def group_advantages(rewards, group_size, scale="std", eps=1e-6, std="population"):
    """Advantages [B·G] from rewards [B·G] (each prompt's G answers contiguous); scale "std" or "none"; `std`
    "population" (÷G) or "sample" (÷(G−1)). The CUDA kernel computes the population std only, so a sample-std
    call on CUDA takes the Triton kernel (or the reference without Triton)."""
    backend = select_backend(rewards.device.type)
    if backend == "cuda" and (std == "population" or scale == "none"):
        return cuda_ext.group_advantages(rewards, group_size, scale, eps)
    if backend == "triton" or (backend == "cuda" and _triton_importable()):
        from . import triton_kernels

        return triton_kernels.group_advantages(rewards, group_size, scale, eps, std)
    return reference.group_advantages(rewards, group_size, scale, eps, std)


def compute_advantages(rewards, group_size, estimator="grpo", opts=None, lengths=None, dp_group=None):
    """Advantages [N] from rewards [N] by the registered `estimator` (registry.advantage_estimators()).

    grpo and dr_grpo go through group_advantages (kernels); the others are O(N) torch ops on N rewards, which is
    all they need. `lengths` (response tokens per answer) weight the REINFORCE++ batch normalisation per token;
    `dp_group` makes that normalisation span every data-parallel rank's answers.
    """
    opts = opts or reference.AdvantageOptions()
    if estimator in ("grpo", "dr_grpo") and group_size > 1:
        return group_advantages(rewards, group_size, "std" if estimator == "grpo" else "none", opts.eps, opts.std)
    return reference.advantages(rewards, group_size, estimator, opts, lengths, dp_group)


def _loss_config(clip_low, clip_high, kl_coef, kl_estimator, loss_agg, policy_loss, tis_cap, conventions):
    if isinstance(policy_loss, PolicyLossConfig):
        return policy_loss
    return PolicyLossConfig(clip_low, clip_high, kl_coef, kl_estimator, loss_agg, policy_loss, tis_cap, **conventions)


def grpo_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, clip_low=0.2, clip_high=0.2,
                     kl_coef=0.0, kl_estimator="k3", loss_agg="seq-mean-token-mean", policy_loss="clip",
                     behavior_logprobs=None, tis_cap=None, **conventions):
    """Policy loss over [B, L] answers with per-answer advantages [B]; returns (loss, metrics).

    `policy_loss`: a registered name (clip, dual_clip, cispo, gspo) or a ready PolicyLossConfig; `conventions`:
    max_response_length (required by the Dr. GRPO aggregation), clip_ratio_c, kl_clamp, tis_on_kl, tis_level.
    Semantics are those of reference.grpo_policy_loss. The elementwise work is small next to the log-probs, so
    only the CUDA kernel replaces the torch code, and only where PolicyLossConfig.cuda_unsupported says it can.
    """
    cfg = _loss_config(clip_low, clip_high, kl_coef, kl_estimator, loss_agg, policy_loss, tis_cap, conventions)
    backend = select_backend(logprobs.device.type)
    if backend != "cuda" or cfg.cuda_unsupported(behavior_logprobs is not None and cfg.tis_cap is not None):
        return reference.policy_loss_from_config(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs,
                                                 behavior_logprobs)

    cfg.check_inputs(ref_logprobs, behavior_logprobs)
    mask = mask.bool()
    b, l = mask.shape
    adv = advantages.float()[:, None].expand(b, l)
    tis = tis_weights(old_logprobs, behavior_logprobs, mask, cfg.tis_cap, cfg.tis_level) if cfg.tis_cap else None
    loss, ratio, kl = cuda_ext.policy_loss_terms(
        logprobs.reshape(-1), old_logprobs.reshape(-1), adv.reshape(-1), mask.reshape(-1),
        aggregation_weights(mask, cfg.loss_agg, cfg.max_response_length).reshape(-1),
        None if ref_logprobs is None else ref_logprobs.reshape(-1), None if tis is None else tis.reshape(-1), cfg)
    return loss, policy_metrics(ratio.view(b, l), adv, mask, cfg, None if ref_logprobs is None else kl.view(b, l))


def fused_grpo_loss(hidden, weight, tokens, old_logprobs, advantages, mask, ref_logprobs=None, clip_low=0.2,
                    clip_high=0.2, kl_coef=0.0, kl_estimator="k3", loss_agg="seq-mean-token-mean",
                    policy_loss="clip", behavior_logprobs=None, tis_cap=None, temperature=1.0, tp_group=None,
                    return_entropy=False, **conventions):
    """Policy loss straight from hidden states [B, L, H]: grpo_policy_loss(token_logprobs(...)) in one pass.

    Gradients of hidden and weight are produced chunk by chunk during forward (3 matmuls, no logits recompute);
    a sequence-level ratio (gspo) couples an answer's tokens and takes the composed path. `old_logprobs=None`:
    on-policy (old = the log-probs computed here, detached). `return_entropy`: also the per-token entropy [B, L]
    (no gradient; for logging), as a third result.
    """
    cfg = _loss_config(clip_low, clip_high, kl_coef, kl_estimator, loss_agg, policy_loss, tis_cap, conventions)
    backend = select_backend(hidden.device.type)
    if backend == "reference":
        b, l = tokens.shape
        out = reference.token_logprobs(hidden.reshape(b * l, -1), weight, tokens.reshape(-1), temperature,
                                       return_entropy, tp_group)
        logp, ent = out if return_entropy else (out, None)
        logp = logp.view(b, l)
        old = logp.detach() if old_logprobs is None else old_logprobs
        res = reference.policy_loss_from_config(logp, old, advantages, mask, cfg, ref_logprobs, behavior_logprobs)
        if ent is None:
            return res
        return (*res, ent.detach().view(b, l))
    return chunked.fused_policy_loss(hidden, weight, tokens, old_logprobs, advantages, mask, cfg, ref_logprobs,
                                     behavior_logprobs, temperature=temperature, tp_group=tp_group,
                                     rows=rows_for(backend), return_entropy=return_entropy)
