"""Readable torch reference for every op: the spec the fast paths are tested against.

It materializes the full fp32 logits and is meant for tests and small inputs, not for training. The advantage
estimators registered here (grpo, dr_grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline) are the
implementations the trainer calls; only grpo and dr_grpo have kernels (group_advantages).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from . import _tp
from .loss import PolicyLossConfig, aggregation_weights, policy_metrics, tis_weights, token_terms
from .registry import get_advantage_estimator, register_advantage_estimator


def _vocab_start(logits_local, tp_group):
    return _tp.rank(tp_group) * logits_local.shape[-1]


def logprobs_from_logits(logits, tokens, temperature=1.0, return_entropy=False, tp_group=None):
    """log p(token) [T] (and entropy [T]) from logits [T, V_local], vocab-parallel across `tp_group`."""
    z = logits.float() / temperature
    # any per-row shift leaves log-softmax unchanged, so the max needs no gradient
    m = _tp.all_reduce_(z.detach().amax(-1), tp_group, op=torch.distributed.ReduceOp.MAX)
    e = torch.exp(z - m[:, None])
    s = _tp.reduce_from_tp(e.sum(-1), tp_group)
    lse = m + torch.log(s)
    start = _vocab_start(logits, tp_group)
    local = tokens.long() - start
    in_shard = (local >= 0) & (local < logits.shape[-1])
    tgt = torch.gather(z, 1, local.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
    tgt = _tp.reduce_from_tp(torch.where(in_shard, tgt, torch.zeros_like(tgt)), tp_group)
    logp = tgt - lse
    if not return_entropy:
        return logp
    # H = lse − E_p[z]
    ez = _tp.reduce_from_tp((e * z).sum(-1), tp_group) / s
    return logp, lse - ez


def token_logprobs(hidden, weight, tokens, temperature=1.0, return_entropy=False, tp_group=None):
    """log p(token) [T] from hidden [T, H] and the (vocab-sharded) output layer weight [V_local, H]."""
    h = _tp.copy_to_tp(hidden, tp_group)
    logits = h.float() @ weight.float().t()
    return logprobs_from_logits(logits, tokens, temperature, return_entropy, tp_group)


@dataclass(frozen=True)
class AdvantageOptions:
    """How an estimator normalises: the std's divisor, its epsilon, and what a group of one answer gets."""

    std: str = "sample"  # sample: ÷(N−1), what verl and TRL use; population: ÷N
    eps: float = 1e-6  # verl 1e-6, TRL 1e-4
    singleton: str = "zero"  # a group of one answer: "zero" (TRL: no baseline to compare with) | "reward" (verl)

    def __post_init__(self):
        if self.std not in STD_KINDS:
            raise ValueError(f"std must be one of {STD_KINDS}, got {self.std!r}")
        if self.singleton not in SINGLETON_RULES:
            raise ValueError(f"singleton must be one of {SINGLETON_RULES}, got {self.singleton!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


STD_KINDS = ("sample", "population")
SINGLETON_RULES = ("zero", "reward")


def _groups(rewards, group_size):
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def _singleton(rewards, opts: AdvantageOptions):
    """Groups of one answer: no other answer to compare with, so the advantage is defined, not computed."""
    r = rewards.float().reshape(-1)
    return r.clone() if opts.singleton == "reward" else torch.zeros_like(r)


def group_advantages(rewards, group_size, scale="std", eps=1e-6, std="population"):
    """Advantages [B·G] from rewards [B·G] whose G answers per prompt are contiguous: r − mean over the group,
    divided by (the group's std + eps) when scale="std". `std`: "population" (÷G) or "sample" (÷(G−1))."""
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if std not in STD_KINDS:
        raise ValueError(f"std must be one of {STD_KINDS}, got {std!r}")
    r = _groups(rewards, group_size)
    a = r - r.mean(-1, keepdim=True)
    if scale == "std":
        if std == "sample" and group_size == 1:
            raise ValueError("the sample std of a group of one answer is undefined (see AdvantageOptions.singleton)")
        a = a / (r.std(-1, correction=1 if std == "sample" else 0, keepdim=True) + eps)
    return a.view(-1)


@register_advantage_estimator("grpo")
def grpo_advantages(rewards, group_size, opts: AdvantageOptions, lengths=None, dp_group=None):
    """GRPO (DeepSeekMath eq. 4 / R1): (r_i − mean(r_group)) / (std(r_group) + eps)."""
    if group_size == 1:
        return _singleton(rewards, opts)
    return group_advantages(rewards, group_size, "std", opts.eps, opts.std)


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards, group_size, opts: AdvantageOptions, lengths=None, dp_group=None):
    """Dr. GRPO (arXiv:2503.20783): r_i − mean(r_group), no std division (which up-weights near-uniform groups)."""
    if group_size == 1:
        return _singleton(rewards, opts)
    return group_advantages(rewards, group_size, "none", opts.eps, opts.std)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards, group_size, opts: AdvantageOptions, lengths=None, dp_group=None):
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): r_i − mean of the group's other answers
    = G/(G−1)·(r_i − mean(r_group)); an unbiased baseline, since it does not include r_i itself."""
    if group_size == 1:
        return _singleton(rewards, opts)
    r = _groups(rewards, group_size)
    others = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - others).view(-1)


def _global_normalise(a, opts: AdvantageOptions, lengths, dp_group):
    """(a − mean) / (std + eps) over the whole batch, every DP rank's answers included. With `lengths` each answer
    counts once per response token, as verl and OpenRLHF whiten their per-token advantages."""
    w = torch.ones_like(a) if lengths is None else lengths.to(a.device, torch.float32).reshape(-1)
    sums = torch.stack([w.sum(), (w * a).sum(), (w * a * a).sum()]).double()
    _tp.all_reduce_(sums, dp_group)
    n, s1, s2 = sums.unbind()
    mean = s1 / n.clamp(min=1.0)
    var = (s2 / n.clamp(min=1.0) - mean * mean).clamp(min=0.0)
    if opts.std == "sample":
        var = var * n / (n - 1.0) if n > 1 else torch.zeros_like(var)
    return ((a - mean.float()) / (var.sqrt().float() + opts.eps)).view(-1)


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_pp_advantages(rewards, group_size, opts: AdvantageOptions, lengths=None, dp_group=None):
    """REINFORCE++ (Hu 2025, arXiv:2501.03262) for an outcome reward: the reward itself, normalised over the
    global batch (no group baseline: it works with one answer per prompt)."""
    return _global_normalise(rewards.float().reshape(-1), opts, lengths, dp_group)


@register_advantage_estimator("reinforce_plus_plus_baseline")
def reinforce_pp_baseline_advantages(rewards, group_size, opts: AdvantageOptions, lengths=None, dp_group=None):
    """REINFORCE++-baseline: r_i − mean(r_group), then normalised over the global batch (std of the whole batch,
    not of the group)."""
    centred = (dr_grpo_advantages(rewards, group_size, opts) if group_size > 1
               else _singleton(rewards, opts))
    return _global_normalise(centred, opts, lengths, dp_group)


def advantages(rewards, group_size, estimator="grpo", opts: Optional[AdvantageOptions] = None, lengths=None,
               dp_group=None):
    """Advantages [N] by the registered `estimator` (registry.advantage_estimators())."""
    return get_advantage_estimator(estimator)(rewards, group_size, opts or AdvantageOptions(), lengths, dp_group)


def grpo_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, clip_low=0.2, clip_high=0.2,
                     kl_coef=0.0, kl_estimator="k3", loss_agg="seq-mean-token-mean", policy_loss="clip",
                     behavior_logprobs=None, tis_cap=None, **conventions):
    """Policy loss over [B, L] answers; returns (loss, metrics). `conventions`: the other PolicyLossConfig fields
    (max_response_length, clip_ratio_c, kl_clamp, tis_on_kl, tis_level)."""
    cfg = PolicyLossConfig(clip_low, clip_high, kl_coef, kl_estimator, loss_agg, policy_loss, tis_cap, **conventions)
    return policy_loss_from_config(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs, behavior_logprobs)


def policy_loss_from_config(logprobs, old_logprobs, advantages, mask, cfg: PolicyLossConfig, ref_logprobs=None,
                            behavior_logprobs=None):
    """grpo_policy_loss with its knobs already validated in `cfg`."""
    cfg.check_inputs(ref_logprobs, behavior_logprobs)
    mask = mask.bool()
    zero = torch.zeros((), device=logprobs.device)
    lp = logprobs.float()
    log_ratio = torch.where(mask, lp - old_logprobs.float(), zero)
    if cfg.sequence_ratio:
        # GSPO: one ratio per answer, the geometric mean of its token ratios
        n = mask.float().sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = torch.where(mask, (log_ratio.sum(-1, keepdim=True) / n).expand_as(lp), zero)
    tis = None
    if cfg.tis_cap is not None:
        tis = tis_weights(old_logprobs, behavior_logprobs, mask, cfg.tis_cap, cfg.tis_level)
    adv = advantages.float()[:, None]
    ref = ref_logprobs.float() if ref_logprobs is not None else None
    per_token, ratio, kl = token_terms(log_ratio, adv, mask, cfg, lp, ref, tis)
    per_token = torch.where(mask, per_token, zero)
    loss = (per_token * aggregation_weights(mask, cfg.loss_agg, cfg.max_response_length)).sum()
    return loss, policy_metrics(ratio, adv.expand_as(lp), mask, cfg, kl)
