"""Readable torch reference for every op: the spec the fast paths are tested against.

It materializes the full fp32 logits and is meant for tests and small inputs, not for training.
"""
import torch

from . import _tp
from .loss import PolicyLossConfig, aggregation_weights, policy_metrics, tis_weights, token_terms


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


def group_advantages(rewards, group_size, scale="std", eps=1e-6):
    """Advantages [B·G] from rewards [B·G] whose G answers per prompt are contiguous."""
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(-1, keepdim=True)
    if scale == "std":
        a = a / (r.std(-1, unbiased=False, keepdim=True) + eps)
    return a.view(-1)


def grpo_policy_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, clip_low=0.2, clip_high=0.2,
                     kl_coef=0.0, kl_estimator="k3", loss_agg="seq-mean-token-mean", ratio_level="token",
                     behavior_logprobs=None, tis_cap=None):
    """Clipped policy loss over [B, L] answers; returns (loss, metrics)."""
    cfg = PolicyLossConfig(clip_low, clip_high, kl_coef, kl_estimator, loss_agg, ratio_level, tis_cap)
    cfg.check_inputs(ref_logprobs, behavior_logprobs)
    mask = mask.bool()
    zero = torch.zeros((), device=logprobs.device)
    lp = logprobs.float()
    log_ratio = torch.where(mask, lp - old_logprobs.float(), zero)
    if cfg.ratio_level == "sequence":
        # GSPO: one ratio per answer, the geometric mean of its token ratios
        n = mask.float().sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = torch.where(mask, (log_ratio.sum(-1, keepdim=True) / n).expand_as(lp), zero)
    tis = tis_weights(old_logprobs, behavior_logprobs, mask, tis_cap) if tis_cap is not None else None
    adv = advantages.float()[:, None]
    ref = ref_logprobs.float() if ref_logprobs is not None else None
    per_token, ratio, kl = token_terms(log_ratio, adv, mask, cfg, lp, ref, tis)
    per_token = torch.where(mask, per_token, zero)
    loss = (per_token * aggregation_weights(mask, cfg.loss_agg)).sum()
    return loss, policy_metrics(ratio, adv.expand_as(lp), mask, cfg, kl)
