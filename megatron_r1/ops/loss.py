"""GRPO per-token math and loss aggregation, shared by the reference loss and the fused hidden-state loss.

Written once so the fused path cannot drift from the spec: the fused path applies the same per-token function to
each chunk of tokens and differentiates it locally. The policy losses (`clip`, `dual_clip`, `cispo`, `gspo`) are
per-token surrogates registered by name (registry.py); docs/rl_conventions.md compares each with verl and TRL.
"""
from dataclasses import dataclass
from typing import Optional, get_args

import torch

from megatron_r1.choices import KLEstimator, LossAgg, TISLevel

from .registry import get_policy_loss, register_policy_loss

KL_ESTIMATORS = get_args(KLEstimator)  # k1, k2, k3 (the CUDA kernel numbers them 1, 2, 3)
LOSS_AGGS = get_args(LossAgg)
TIS_LEVELS = get_args(TISLevel)
# exp() of a k3 log-ratio beyond this overflows float32 long before the value clamp could help (verl's bound)
_K3_LOG_RATIO_BOUND = 20.0


@dataclass(frozen=True)
class PolicyLossConfig:
    """The scalar knobs of the policy loss; validated once at construction."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "seq-mean-token-mean"
    policy_loss: str = "clip"
    tis_cap: Optional[float] = None
    # Dr. GRPO's constant: `seq-mean-token-sum-norm` divides by answers × this, never by the batch's padded width
    max_response_length: Optional[int] = None
    clip_ratio_c: float = 3.0  # dual-clip: a negative-advantage token's loss is capped at −c·A
    kl_clamp: Optional[float] = None  # clamp each token's KL estimate to [−kl_clamp, kl_clamp]
    tis_on_kl: bool = False  # whether the TIS weight multiplies the KL term too (verl/TRL: no)
    tis_level: str = "token"  # token: a weight per token; sequence: one per answer (geometric mean)

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        get_policy_loss(self.policy_loss)  # raises with the known names
        if self.tis_level not in TIS_LEVELS:
            raise ValueError(f"tis_level must be one of {TIS_LEVELS}, got {self.tis_level!r}")
        if not (0.0 <= self.clip_low <= 1.0) or self.clip_high < 0.0:
            raise ValueError(f"need 0 <= clip_low <= 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be positive, got {self.tis_cap}")
        if self.loss_agg == "seq-mean-token-sum-norm" and not (self.max_response_length or 0) > 0:
            raise ValueError("loss_agg='seq-mean-token-sum-norm' (Dr. GRPO) divides by a constant: pass "
                             "max_response_length (the generation limit), not the batch's padded width")
        if self.policy_loss == "dual_clip" and not self.clip_ratio_c > 1.0:
            raise ValueError(f"dual_clip needs clip_ratio_c > 1, got {self.clip_ratio_c}")
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            raise ValueError(f"kl_clamp must be positive (or None), got {self.kl_clamp}")

    @property
    def sequence_ratio(self) -> bool:
        """Whether the ratio is one per answer, which couples an answer's tokens (GSPO)."""
        return get_policy_loss(self.policy_loss).sequence_ratio

    def cuda_unsupported(self, has_tis: bool) -> Optional[str]:
        """Why csrc/'s token-level loss kernel cannot compute this loss (None when it can): the kernel implements
        the PPO clip with an unclamped KL, and multiplies the KL term by the TIS weight."""
        if self.policy_loss != "clip":
            return f"policy_loss={self.policy_loss!r}: the kernel implements the clipped surrogate only"
        if self.kl_clamp is not None:
            return "kl_clamp: the kernel has no KL clamp"
        if has_tis and self.kl_coef != 0.0 and not self.tis_on_kl:
            return "tis_on_kl=False: the kernel weights the KL term by the TIS weight as well"
        return None

    def check_inputs(self, ref_logprobs, behavior_logprobs) -> None:
        """The optional tensors these knobs need are present."""
        if self.kl_coef != 0.0 and ref_logprobs is None:
            raise ValueError("kl_coef != 0 needs ref_logprobs")
        if self.tis_cap is not None and behavior_logprobs is None:
            raise ValueError("tis_cap needs behavior_logprobs")


# ------------------------------------------------------------------------------------ per-token surrogates
def _clipped(ratio, cfg):
    return torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)


@register_policy_loss("clip")
def clip_surrogate(ratio, log_ratio, advantages, cfg):
    """PPO/GRPO: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) (DeepSeekMath eq. 3; DAPO's clip-higher via ε_high)."""
    return -torch.minimum(ratio * advantages, _clipped(ratio, cfg) * advantages)


@register_policy_loss("dual_clip")
def dual_clip_surrogate(ratio, log_ratio, advantages, cfg):
    """Dual-clip PPO (Ye et al. 2020, arXiv:1912.09729): for A < 0 the clipped loss is also capped at −c·A, so a
    token whose ratio has grown huge cannot contribute an unbounded loss (nor any gradient past the cap)."""
    pg = clip_surrogate(ratio, log_ratio, advantages, cfg)
    return torch.where(advantages < 0, torch.minimum(pg, -cfg.clip_ratio_c * advantages), pg)


@register_policy_loss("cispo")
def cispo_surrogate(ratio, log_ratio, advantages, cfg):
    """CISPO (MiniMax-M1, arXiv:2506.13585): REINFORCE weighted by the clipped importance ratio under stop-gradient,
    so every token keeps a gradient sg(clip(ρ))·A·∇log π, clipped or not.

    Written as −sg(clip(ρ))·A·(1 + log π − sg(log π)): the same gradient as verl's and TRL's −sg(clip(ρ))·A·log π,
    but its value is the clipped IS-weighted objective −clip(ρ)·A instead of depending on log π's magnitude.
    """
    return -_clipped(ratio, cfg).detach() * advantages * (1.0 + log_ratio - log_ratio.detach())


@register_policy_loss("gspo", sequence_ratio=True)
def gspo_surrogate(ratio, log_ratio, advantages, cfg):
    """GSPO (arXiv:2507.18071): the PPO clip applied to the sequence ratio (ρ_i = exp(mean_t log ρ_i,t)), which the
    caller broadcasts to every token of the answer."""
    return clip_surrogate(ratio, log_ratio, advantages, cfg)


# ------------------------------------------------------------------------------------------- the other terms
def kl_penalty(logprobs, ref_logprobs, estimator: str, clamp: Optional[float] = None):
    """Per-token KL(π || π_ref) estimate from log-probs of the sampled tokens; `clamp` bounds each value."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    else:
        if clamp is not None:
            # bound the log-ratio before exp(): a clamp of exp(−d) = inf would pass back 0·inf = NaN
            d = torch.clamp(d, -_K3_LOG_RATIO_BOUND, _K3_LOG_RATIO_BOUND)
        # k3 = π_ref/π − log(π_ref/π) − 1: unbiased and always >= 0
        kl = torch.exp(-d) + d - 1.0
    if clamp is not None:
        kl = torch.clamp(kl, -clamp, clamp)
    return kl


def token_terms(log_ratio, advantages, mask, cfg: PolicyLossConfig, logprobs=None, ref_logprobs=None,
                tis_weight=None):
    """Per-token loss (surrogate × TIS weight + KL), ratio and KL, elementwise over any shape.

    `log_ratio` must already be zero where `mask` is false: padding may hold any value and exp() of it would
    overflow into NaN even though it is masked out afterwards.
    """
    ratio = torch.exp(log_ratio)
    loss = get_policy_loss(cfg.policy_loss).surrogate(ratio, log_ratio, advantages, cfg)
    if tis_weight is not None:
        loss = loss * tis_weight
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, torch.where(mask, ref_logprobs, logprobs), cfg.kl_estimator, cfg.kl_clamp)
        if cfg.kl_coef != 0.0:
            kl_term = cfg.kl_coef * kl
            if tis_weight is not None and cfg.tis_on_kl:
                kl_term = kl_term * tis_weight
            loss = loss + kl_term
    return loss, ratio, kl


def tis_weights(old_logprobs, behavior_logprobs, mask, cap: float, level: str = "token"):
    """Truncated importance weight min(π_old/π_behavior, cap) per token, or per answer (`level="sequence"`: the
    geometric mean over its tokens, the length normalisation GSPO's ratio uses); no gradient flows through it."""
    d = torch.where(mask, old_logprobs.float() - behavior_logprobs.float(), torch.zeros((), device=mask.device))
    if level == "sequence":
        n = mask.float().sum(-1, keepdim=True).clamp(min=1.0)
        d = torch.where(mask, (d.sum(-1, keepdim=True) / n).expand_as(d), torch.zeros((), device=mask.device))
    return torch.clamp(torch.exp(d), max=cap).detach()


def aggregation_weights(mask, loss_agg: str, max_response_length: Optional[int] = None):
    """Per-token weights w with loss = Σ w·token_loss; all-zero rows get weight 0 and no NaN."""
    m = mask.float()
    if loss_agg == "token-mean":
        return m / m.sum().clamp(min=1.0)
    if loss_agg == "seq-mean-token-sum-norm":
        # Dr. GRPO: a constant divisor (answers × the generation limit), whatever the longest answer here is
        return m / float(m.shape[0] * max_response_length)
    n = m.sum(-1, keepdim=True)
    # empty rows are left out of the mean over answers instead of diluting it
    rows = (n > 0).float().sum().clamp(min=1.0)
    return m / n.clamp(min=1.0) / rows


def aggregation_units(mask, loss_agg: str) -> float:
    """What `loss_agg` divides a batch's summed loss by, up to a constant: tokens (token-mean), non-empty answers
    (seq-mean-token-mean) or answers (seq-mean-token-sum-norm). A micro-batch's share of its mini-batch's loss is
    its units over the mini-batch's, which is how uneven micro-batches still give the mini-batch's gradient."""
    m = mask.float()
    if loss_agg == "token-mean":
        return float(m.sum())
    if loss_agg == "seq-mean-token-sum-norm":
        return float(m.shape[0])
    return float((m.sum(-1) > 0).sum())


def policy_metrics(ratio, advantages, mask, cfg: PolicyLossConfig, kl=None):
    """Clip fractions, mean ratio and mean KL over unmasked tokens, as detached 0-dim tensors."""
    with torch.no_grad():
        m = mask.float()
        n = m.sum().clamp(min=1.0)
        # CISPO clips the weight whatever the advantage's sign; PPO's clip only binds on one side per sign
        any_sign = cfg.policy_loss == "cispo"
        low = ((ratio < 1.0 - cfg.clip_low) & ((advantages < 0) | any_sign)).float()
        high = ((ratio > 1.0 + cfg.clip_high) & ((advantages > 0) | any_sign)).float()
        out = {
            "clip_frac_low": (low * m).sum() / n,
            "clip_frac_high": (high * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            "kl_mean": (kl * m).sum() / n if kl is not None else torch.zeros((), device=mask.device),
        }
        if cfg.policy_loss == "dual_clip":
            capped = ((advantages < 0) & (ratio > cfg.clip_ratio_c)).float()
            out["clip_frac_dual"] = (capped * m).sum() / n
        return out
