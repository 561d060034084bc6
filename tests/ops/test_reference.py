"""The reference ops against hand-computed values: this file pins the semantics every backend must match."""
import math

import pytest
import torch

from megatron_r1.ops import reference as R


def test_token_logprobs_is_log_softmax_at_the_token():
    torch.manual_seed(0)
    h, w = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    tok = torch.randint(0, 11, (7,))
    logp, ent = R.token_logprobs(h, w, tok, temperature=0.5, return_entropy=True)
    ls = torch.log_softmax((h @ w.t()) / 0.5, -1)
    torch.testing.assert_close(logp.double(), ls.gather(1, tok[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), -(ls.exp() * ls).sum(-1), rtol=1e-5, atol=1e-5)
    assert logp.dtype == torch.float32


def test_group_advantages_values_and_constant_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = R.group_advantages(r, 4, eps=1e-6)
    torch.testing.assert_close(a[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-6))
    assert torch.equal(a[4:], torch.zeros(4))  # identical rewards: no signal, no NaN
    torch.testing.assert_close(R.group_advantages(r, 4, scale="none")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError):
        R.group_advantages(r, 3)
    with pytest.raises(ValueError):
        R.group_advantages(r, 4, scale="max")


def _loss(lp, old, adv, mask, **kw):
    return R.grpo_policy_loss(torch.tensor(lp), torch.tensor(old), torch.tensor(adv), torch.tensor(mask), **kw)


def test_clipped_surrogate_by_hand():
    # token 0: ratio 1.5 > 1.2 with A > 0 -> clipped to 1.2; token 1: ratio 1
    loss, m = _loss([[math.log(1.5), 0.0]], [[0.0, 0.0]], [1.0], [[True, True]])
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2)
    assert m["clip_frac_high"].item() == pytest.approx(0.5) and m["clip_frac_low"].item() == 0
    assert m["ratio_mean"].item() == pytest.approx(1.25)
    # A < 0, ratio 0.5 < 0.8 -> the pessimistic branch is the clipped one: −(0.8·(−1)) = 0.8
    loss, m = _loss([[math.log(0.5)]], [[0.0]], [-1.0], [[True]])
    assert loss.item() == pytest.approx(0.8) and m["clip_frac_low"].item() == 1.0
    # clip-higher: asymmetric bounds
    loss, _ = _loss([[math.log(1.5)]], [[0.0]], [1.0], [[True]], clip_high=0.28)
    assert loss.item() == pytest.approx(-1.28)


@pytest.mark.parametrize("est,expected", [("k1", 1.0), ("k2", 0.5), ("k3", math.exp(-1.0))])
def test_kl_estimators(est, expected):
    # log π − log π_ref = 1 with A = 0, so the loss is kl_coef · KL
    loss, m = _loss([[-1.0]], [[-1.0]], [0.0], [[True]], ref_logprobs=torch.tensor([[-2.0]]), kl_coef=0.5,
                    kl_estimator=est)
    assert loss.item() == pytest.approx(0.5 * expected, rel=1e-6)
    assert m["kl_mean"].item() == pytest.approx(expected, rel=1e-6)


def test_loss_aggregations_and_empty_rows():
    lp = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0], [1e4, -1e4, float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    old = torch.zeros(3, 3)
    adv = torch.tensor([1.0, -2.0, 5.0])
    ratio = torch.exp(lp[:2].clamp(max=1.0))
    tok = -torch.minimum(ratio * adv[:2, None], ratio.clamp(0.8, 1.2) * adv[:2, None])
    cases = {
        "seq-mean-token-mean": (tok[0].sum() / 3 + tok[1, 0]) / 2,  # the empty row is left out of the mean
        "token-mean": (tok[0].sum() + tok[1, 0]) / 4,
        "seq-mean-token-sum-norm": (tok[0].sum() + tok[1, 0]) / 9,
    }
    for agg, expected in cases.items():
        x = lp.clone().requires_grad_(True)
        loss, metrics = R.grpo_policy_loss(x, old, adv, mask, loss_agg=agg, max_response_length=3)
        loss.backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6), agg
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad[2], torch.zeros(3))
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())


def test_all_rows_empty_gives_zero():
    loss, m = _loss([[0.3, 0.1]], [[0.0, 0.0]], [1.0], [[False, False]])
    assert loss.item() == 0.0 and m["ratio_mean"].item() == 0.0


def test_truncated_importance_sampling_weight():
    # exp(old − behavior) = e^1 capped at 2, e^−1 not capped
    kw = dict(behavior_logprobs=torch.tensor([[-1.0, 1.0]]), tis_cap=2.0, loss_agg="token-mean")
    loss, _ = _loss([[0.0, 0.0]], [[0.0, 0.0]], [1.0], [[True, True]], **kw)
    assert loss.item() == pytest.approx(-(2.0 + math.exp(-1.0)) / 2, rel=1e-6)


def test_sequence_ratio_is_geometric_mean():
    lp = torch.tensor([[math.log(1.1), math.log(1.3), 5.0]], requires_grad=True)
    loss, m = R.grpo_policy_loss(lp, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1, 1, 0]]).bool(),
                                 policy_loss="gspo", clip_high=0.5)
    s = math.sqrt(1.1 * 1.3)
    assert loss.item() == pytest.approx(-s, rel=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(s, rel=1e-6)
    loss.backward()
    # d(−exp(mean log r))/d lp_t = −s / n on each unmasked token, nothing on padding
    torch.testing.assert_close(lp.grad, torch.tensor([[-s / 2, -s / 2, 0.0]]))


def test_bad_options_are_rejected():
    args = (torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1).bool())
    for kw in (dict(kl_estimator="k4"), dict(loss_agg="mean"), dict(policy_loss="seq"), dict(kl_coef=0.1),
               dict(tis_cap=2.0), dict(loss_agg="seq-mean-token-sum-norm"),  # Dr. GRPO needs its constant
               dict(policy_loss="dual_clip", clip_ratio_c=1.0), dict(kl_clamp=0.0),
               dict(tis_level="answer", tis_cap=2.0, behavior_logprobs=torch.zeros(1, 1))):
        with pytest.raises(ValueError):
            R.grpo_policy_loss(*args, **kw)
