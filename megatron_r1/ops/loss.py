"""GRPO per-token math and loss aggregation, shared by the reference loss and the fused hidden-state loss.

Written once so the fused path cannot drift from the spec: the fused path applies the same per-token function to
each chunk of tokens and differentiates it locally.
"""
from dataclasses import dataclass
from typing import Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class PolicyLossConfig:
    """The scalar knobs of the clipped policy loss; validated once at construction."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "seq-mean-token-mean"
    ratio_level: str = "token"
    tis_cap: Optional[float] = None

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {self.ratio_level!r}")
        if not (0.0 <= self.clip_low < 1.0) or self.clip_high < 0.0:
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be positive, got {self.tis_cap}")

    def check_inputs(self, ref_logprobs, behavior_logprobs) -> None:
        """The optional tensors these knobs need are present."""
        if self.kl_coef != 0.0 and ref_logprobs is None:
            raise ValueError("kl_coef != 0 needs ref_logprobs")
        if self.tis_cap is not None and behavior_logprobs is None:
            raise ValueError("tis_cap needs behavior_logprobs")


def kl_penalty(logprobs, ref_logprobs, estimator: str):
    """Per-token KL(π || π_ref) estimate from log-probs of the sampled tokens."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    # k3 = π_ref/π − log(π_ref/π) − 1: unbiased and always >= 0
    return torch.exp(-d) + d - 1.0


def token_terms(log_ratio, advantages, mask, cfg: PolicyLossConfig, logprobs=None, ref_logprobs=None,
                tis_weight=None):
    """Per-token loss (surrogate + KL, times the TIS weight), ratio and KL, elementwise over any shape.

    `log_ratio` must already be zero where `mask` is false: padding may hold any value and exp() of it would
    overflow into NaN even though it is masked out afterwards.
    """
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, torch.where(mask, ref_logprobs, logprobs), cfg.kl_estimator)
        if cfg.kl_coef != 0.0:
            loss = loss + cfg.kl_coef * kl
    if tis_weight is not None:
        loss = loss * tis_weight
    return loss, ratio, kl


def tis_weights(old_logprobs, behavior_logprobs, mask, cap: float):
    """Truncated importance weight min(π_old/π_behavior, cap) per token; no gradient flows through it."""
    d = torch.where(mask, old_logprobs.float() - behavior_logprobs.float(), torch.zeros((), device=mask.device))
    return torch.clamp(torch.exp(d), max=cap).detach()


def aggregation_weights(mask, loss_agg: str):
    """Per-token weights w with loss = Σ w·token_loss; all-zero rows get weight 0 and no NaN."""
    m = mask.float()
    if loss_agg == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if loss_agg == "seq-mean-token-sum-norm":
        return m / float(m.numel())
    n = m.sum(-1, keepdim=True)
    # empty rows are left out of the mean over answers instead of diluting it
    rows = (n > 0).float().sum().clamp(min=1.0)
    return m / n.clamp(min=1.0) / rows


def policy_metrics(ratio, advantages, mask, cfg: PolicyLossConfig, kl=None):
    """Clip fractions, mean ratio and mean KL over unmasked tokens, as detached 0-dim tensors."""
    with torch.no_grad():
        m = mask.float()
        n = m.sum().clamp(min=1.0)
        low = ((ratio < 1.0 - cfg.clip_low) & (advantages < 0)).float()
        high = ((ratio > 1.0 + cfg.clip_high) & (advantages > 0)).float()
        return {
            "clip_frac_low": (low * m).sum() / n,
            "clip_frac_high": (high * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "kl_mean": (kl * m).sum() / n if kl is not None else torch.zeros((), device=mask.device),
        }
