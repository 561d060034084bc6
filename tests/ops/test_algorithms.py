"""The registered advantage estimators and policy losses against hand-computed values, and each convention's knob.

Every expected number below is worked out by hand in the comment beside it (docs/rl_conventions.md has the
formulas and which peer uses which convention).
"""
import math

import pytest
import torch

import megatron_r1.ops as ops
from megatron_r1.ops import reference as R
from megatron_r1.ops.dispatch import ENV
from megatron_r1.ops.registry import advantage_estimators, get_policy_loss, policy_losses, register_policy_loss

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # two groups of G=4


def _adv(name, rewards=REWARDS, g=4, lengths=None, **opts):
    return R.advantages(rewards, g, name, R.AdvantageOptions(eps=0.0, **opts), lengths)


def test_registries_list_the_builtins():
    assert advantage_estimators()[:5] == ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus",
                                          "reinforce_plus_plus_baseline")
    assert set(policy_losses()) >= {"clip", "dual_clip", "cispo", "gspo"}
    assert get_policy_loss("gspo").sequence_ratio and not get_policy_loss("cispo").sequence_ratio
    with pytest.raises(ValueError, match="known: grpo"):
        R.advantages(REWARDS, 4, "ppo")


def test_grpo_sample_and_population_std():
    # group 1: mean 0.5, |r − mean| = 0.5; sample std sqrt(4·0.25/3) = 0.57735, population std 0.5
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(_adv("grpo")[:4], torch.tensor([s, -s, -s, s]))
    torch.testing.assert_close(_adv("grpo", std="population")[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    # group 2: mean 0.75, deviations (.25, .25, .25, −.75), sample std sqrt(.75/3) = 0.5
    torch.testing.assert_close(_adv("grpo")[4:], torch.tensor([0.5, 0.5, 0.5, -1.5]))
    # eps is added to the std: TRL's 1e-4 vs verl's 1e-6
    a = R.advantages(REWARDS, 4, "grpo", R.AdvantageOptions(eps=1e-4))
    torch.testing.assert_close(a[4:], torch.tensor([0.25, 0.25, 0.25, -0.75]) / (0.5 + 1e-4))


def test_dr_grpo_and_rloo():
    torch.testing.assert_close(_adv("dr_grpo"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))
    # RLOO: r_i − mean(others). Group 1: 1 − 1/3, 0 − 2/3; group 2: 1 − 2/3, 0 − 1
    torch.testing.assert_close(_adv("rloo"), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0]))


def test_reinforce_plus_plus_normalises_over_the_batch():
    # mean 5/8, sample var (5/8)(3/8)(8/7) = 0.267857, std 0.517549
    std = math.sqrt(0.625 * 0.375 * 8 / 7)
    want = (REWARDS - 0.625) / std
    torch.testing.assert_close(_adv("reinforce_plus_plus"), want)
    # baseline variant: group-centred (Dr. GRPO values), then the batch std: mean 0, sample var 1.75/7 = 0.25
    torch.testing.assert_close(_adv("reinforce_plus_plus_baseline"),
                               torch.tensor([1.0, -1.0, -1.0, 1.0, 0.5, 0.5, 0.5, -1.5]))
    # token weighting (verl/OpenRLHF whiten per token): rewards (1, 0) over 3 and 1 tokens:
    # mean 3/4, population var (3·1/16 + 9/16)/4 = 3/16, sample (×4/3) 1/4 -> std 1/2
    got = _adv("reinforce_plus_plus", torch.tensor([1.0, 0.0]), 1, lengths=torch.tensor([3, 1]))
    torch.testing.assert_close(got, torch.tensor([0.5, -1.5]))


def test_groups_of_one_answer():
    r = torch.tensor([2.0, -1.0])
    for name in ("grpo", "dr_grpo", "rloo"):
        assert torch.equal(_adv(name, r, 1), torch.zeros(2)), name  # default: nothing to compare with
        assert torch.equal(_adv(name, r, 1, singleton="reward"), r), name  # verl: mean 0, std 1
    with pytest.raises(ValueError, match="undefined"):
        R.group_advantages(r, 1, std="sample")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_public_compute_advantages_matches_reference(monkeypatch, backend):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ENV, backend)
    r = torch.rand(24, generator=torch.Generator().manual_seed(3))
    for name in advantage_estimators():
        for std in ("sample", "population"):
            opts = R.AdvantageOptions(std=std)
            torch.testing.assert_close(ops.compute_advantages(r, 6, name, opts), R.advantages(r, 6, name, opts))


def test_triton_sample_std():
    from megatron_r1.ops import triton_kernels

    r = torch.rand(12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(triton_kernels.group_advantages(r, 4, "std", 1e-6, "sample"),
                               R.group_advantages(r, 4, "std", 1e-6, "sample"))


# ------------------------------------------------------------------------------------------------- losses
def _loss_and_grad(lp, old, adv, mask=None, **kw):
    x = torch.tensor(lp, requires_grad=True)
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else torch.tensor(mask)
    loss, m = R.grpo_policy_loss(x, torch.tensor(old), torch.tensor(adv), mask, loss_agg="token-mean", **kw)
    loss.backward()
    return loss.item(), x.grad, m


def test_dual_clip_caps_negative_advantage_tokens():
    # A = −1: ratio 5 > c = 3 -> PPO's loss max(5, 1.2) = 5 is capped at 3, no gradient;
    # ratio 2 < c -> loss 2, d(−ρA)/dlogπ = ρ = 2. A = +1, ratio 5: −min(5, 1.2) = −1.2 as in PPO
    lp = [[math.log(5.0)], [math.log(2.0)], [math.log(5.0)]]
    loss, grad, m = _loss_and_grad(lp, [[0.0]] * 3, [-1.0, -1.0, 1.0], policy_loss="dual_clip", clip_ratio_c=3.0)
    assert loss == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    torch.testing.assert_close(grad, torch.tensor([[0.0], [2.0 / 3], [0.0]]))
    assert m["clip_frac_dual"].item() == pytest.approx(1 / 3)
    plain, _, _ = _loss_and_grad(lp, [[0.0]] * 3, [-1.0, -1.0, 1.0], policy_loss="clip")
    assert plain == pytest.approx((5.0 + 2.0 - 1.2) / 3)


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    # no lower bound (clip_low = 1), upper 1.2. Token 0: ρ = 1.5, A = 1 -> weight sg(1.2): value −1.2, and
    # gradient −1.2 (PPO's clip would give 0). Token 1: ρ = 0.5, A = −1 -> value 0.5, gradient +0.5
    lp = [[math.log(1.5), math.log(0.5)]]
    loss, grad, m = _loss_and_grad(lp, [[0.0, 0.0]], [1.0], policy_loss="cispo", clip_low=1.0, clip_high=0.2)
    loss2, grad2, _ = _loss_and_grad([[math.log(0.5)]], [[0.0]], [-1.0], policy_loss="cispo", clip_low=1.0,
                                     clip_high=0.2)
    assert loss == pytest.approx((-1.2 - 0.5) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-1.2 / 2, -0.5 / 2]]))
    assert loss2 == pytest.approx(0.5) and grad2.item() == pytest.approx(0.5)
    assert m["clip_frac_high"].item() == pytest.approx(0.5)
    # the same gradient as verl's / TRL's form −sg(clip(ρ))·A·log π
    x = torch.tensor(lp, requires_grad=True)
    (-(torch.clamp(torch.exp(x), 0.0, 1.2).detach() * 1.0 * x).mean()).backward()
    torch.testing.assert_close(grad, x.grad)
    _, ppo_grad, _ = _loss_and_grad(lp, [[0.0, 0.0]], [1.0], policy_loss="clip", clip_low=1.0, clip_high=0.2)
    assert ppo_grad[0, 0].item() == 0.0


def test_dr_grpo_divisor_is_a_constant_not_the_padded_width():
    # the same two answers (3 and 1 tokens) padded to width 3 and to width 7 give the same loss and gradient:
    # Σ token losses / (answers × max_response_length) = Σ / (2 × 8)
    def run(width):
        lp = torch.zeros(2, width)
        lp[0, :3] = torch.tensor([0.1, -0.2, 0.3])
        lp[1, 0] = 0.4
        mask = torch.zeros(2, width, dtype=torch.bool)
        mask[0, :3] = True
        mask[1, 0] = True
        x = lp.clone().requires_grad_(True)
        loss, _ = R.grpo_policy_loss(x, torch.zeros(2, width), torch.tensor([1.0, -2.0]), mask,
                                     loss_agg="seq-mean-token-sum-norm", max_response_length=8, clip_high=10.0,
                                     clip_low=0.9)
        loss.backward()
        return loss, x.grad[:, :3]

    (l3, g3), (l7, g7) = run(3), run(7)
    tok = -torch.exp(torch.tensor([0.1, -0.2, 0.3])).sum() + 2.0 * math.exp(0.4)
    assert l3.item() == pytest.approx(tok.item() / 16, rel=1e-6)
    assert l3.item() == l7.item()
    assert torch.equal(g3, g7)


def test_kl_clamp_bounds_the_k3_term():
    # log π − log π_ref = −100: exp(100) overflows fp32; clamped, the term is 10 and its gradient 0 (finite)
    kw = dict(ref_logprobs=torch.tensor([[-1.0]]), kl_coef=1.0)
    loss, grad, m = _loss_and_grad([[-101.0]], [[-101.0]], [0.0], kl_clamp=10.0, **kw)
    assert loss == pytest.approx(10.0) and grad.item() == 0.0 and m["kl_mean"].item() == pytest.approx(10.0)
    loss, _, _ = _loss_and_grad([[-101.0]], [[-101.0]], [0.0], **kw)
    assert math.isinf(loss)
    # inside the bound the clamp changes nothing: d = 1 -> k3 = e^−1
    loss, _, _ = _loss_and_grad([[-1.0]], [[-1.0]], [0.0], kl_clamp=10.0, ref_logprobs=torch.tensor([[-2.0]]),
                                kl_coef=1.0)
    assert loss == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_tis_weights_the_kl_term_only_on_request():
    # A = 0, so the loss is β·KL; TIS weight min(e^1, 2) = 2
    kw = dict(ref_logprobs=torch.tensor([[-2.0]]), kl_coef=0.5, behavior_logprobs=torch.tensor([[-2.0]]),
              tis_cap=2.0)
    pg_only, _, _ = _loss_and_grad([[-1.0]], [[-1.0]], [0.0], **kw)
    both, _, _ = _loss_and_grad([[-1.0]], [[-1.0]], [0.0], tis_on_kl=True, **kw)
    assert pg_only == pytest.approx(0.5 * math.exp(-1.0), rel=1e-6)
    assert both == pytest.approx(2.0 * pg_only, rel=1e-6)


def test_tis_level_token_or_sequence():
    old = torch.tensor([[0.0, 0.0, 7.0]])
    behav = torch.tensor([[-1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    tok = R.tis_weights(old, behav, mask, 10.0, "token")
    seq = R.tis_weights(old, behav, mask, 10.0, "sequence")
    torch.testing.assert_close(tok[0, :2], torch.tensor([math.e, math.exp(-1.0)]))
    torch.testing.assert_close(seq[0, :2], torch.ones(2))  # exp(mean(1, −1)) = 1 for every token of the answer


def test_a_user_policy_loss_registers_by_name():
    @register_policy_loss("test_unclipped")
    def unclipped(ratio, log_ratio, advantages, cfg):
        return -ratio * advantages

    loss, grad, _ = _loss_and_grad([[math.log(1.5)]], [[0.0]], [1.0], policy_loss="test_unclipped")
    assert loss == pytest.approx(-1.5) and grad.item() == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("clip")(unclipped)


def test_cuda_routing_reasons():
    from megatron_r1.ops.loss import PolicyLossConfig

    assert PolicyLossConfig().cuda_unsupported(has_tis=False) is None
    assert PolicyLossConfig(kl_coef=0.1, tis_cap=2.0, tis_on_kl=True).cuda_unsupported(has_tis=True) is None
    for cfg, why in ((PolicyLossConfig(policy_loss="cispo"), "clipped surrogate only"),
                     (PolicyLossConfig(kl_clamp=10.0), "no KL clamp"),
                     (PolicyLossConfig(kl_coef=0.1, tis_cap=2.0), "TIS weight")):
        assert why in cfg.cuda_unsupported(has_tis=True)
