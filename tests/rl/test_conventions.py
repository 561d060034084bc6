"""GRPO-family conventions as config fields: each field changes the trainer's advantages or loss as documented in
docs/rl_conventions.md, every choice is logged at start, and RLOO, REINFORCE++, CISPO and dual-clip learn the
trivially learnable task end to end."""
import logging
import math

import pytest
import torch

from megatron_r1.errors import ConfigError
from megatron_r1.logging.metrics import read_metrics
from megatron_r1.rl.batch import RolloutBatch
from tests.distributed import run_distributed
from tests.rl.common import grpo_config


def _rollouts(rewards, group_size, lengths=None):
    n = len(rewards)
    lengths = lengths or [1] * n
    return RolloutBatch(prompt_tokens=[[1]] * n, response_tokens=[[2] * k for k in lengths],
                        behavior_logprobs=[[0.0] * k for k in lengths], texts=[""] * n, samples=[{}] * n,
                        finish_reasons=["stop"] * n, group_size=group_size, rewards=torch.tensor(rewards))


def _adv(tmp, rewards, g, *overrides, lengths=None):
    from megatron_r1.rl.trainer import advantages_for

    cfg = grpo_config(tmp, [f"rl.group_size={g}", *overrides])
    return advantages_for(_rollouts(rewards, g, lengths), cfg.rl)


R4 = [1.0, 0.0, 0.0, 1.0]


def test_advantage_fields(tmp_path):
    s = 0.5 / math.sqrt(1 / 3)  # the default: sample std (verl, TRL)
    torch.testing.assert_close(_adv(tmp_path, R4, 4), torch.tensor([s, -s, -s, s]), rtol=1e-5, atol=0)
    torch.testing.assert_close(_adv(tmp_path, R4, 4, "rl.advantage_std=population"), torch.tensor([1.0, -1, -1, 1]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(_adv(tmp_path, R4, 4, "rl.advantage_eps=0.5"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5]) / (math.sqrt(1 / 3) + 0.5))
    torch.testing.assert_close(_adv(tmp_path, R4, 4, "rl.advantage_estimator=dr_grpo"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(_adv(tmp_path, R4, 4, "rl.advantage_estimator=rloo"),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    # REINFORCE++ weighs each answer by its response tokens (3, 1, 3, 1): mean 6/8, population variance
    # (6·(1/4)² + 2·(3/4)²)/8 = 3/16, sample (×8/7) 3/14
    two = ["rl.mini_batch_size=8", "training.micro_batch_size=8", "training.global_batch_size=16"]
    got = _adv(tmp_path, [1.0, 0.0, 1.0, 0.0], 2, *two, "rl.advantage_estimator=reinforce_plus_plus",
               lengths=[3, 1, 3, 1])
    torch.testing.assert_close(got, torch.tensor([0.25, -0.75, 0.25, -0.75]) / math.sqrt(3 / 14))


def test_groups_of_one(tmp_path):
    one = ["rl.mini_batch_size=4", "training.micro_batch_size=4", "training.global_batch_size=4"]
    with pytest.raises(ConfigError, match="rl.group_size"):
        grpo_config(tmp_path, ["rl.group_size=1", *one])  # every grpo advantage would be 0
    torch.testing.assert_close(_adv(tmp_path, [2.0, -1.0, 0.0, 1.0], 1, *one, "rl.singleton_advantage=reward"),
                               torch.tensor([2.0, -1.0, 0.0, 1.0]))
    # REINFORCE++ needs no group: one answer per prompt is its usual setting
    got = _adv(tmp_path, [1.0, 0.0, 1.0, 0.0], 1, *one, "rl.advantage_estimator=reinforce_plus_plus")
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.5 / math.sqrt(1 / 3))


def _loss(tmp, *overrides, lp=None, old=None, adv=(1.0, -1.0), ref=None, behav=None, width=3):
    """The trainer's loss on two fixed answers (3 and 1 tokens), built from the config like the trainer does."""
    from megatron_r1.ops import grpo_policy_loss
    from megatron_r1.rl.policy_forward import loss_config

    cfg = loss_config(grpo_config(tmp, list(overrides)).rl)
    mask = torch.zeros(2, width, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 0] = True

    def full(rows):
        t = torch.zeros(2, width)
        t[:, : len(rows[0])] = torch.tensor(rows)
        return t

    lp = full(lp or [[0.3, -0.2, 0.1], [1.2, 0.0, 0.0]])
    old = full(old or [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss, m = grpo_policy_loss(lp, old, torch.tensor(adv), mask, ref_logprobs=None if ref is None else full(ref),
                               behavior_logprobs=None if behav is None else full(behav), policy_loss=cfg)
    return loss.item(), m


def test_loss_fields(tmp_path):
    base, _ = _loss(tmp_path)
    # Dr. GRPO divides by answers × rl.max_response_length: the same whatever the padded width, and halved when
    # the limit doubles
    dr = ["rl.loss_agg=seq-mean-token-sum-norm"]
    a, _ = _loss(tmp_path, *dr, "rl.max_response_length=8")
    b, _ = _loss(tmp_path, *dr, "rl.max_response_length=8", width=7)
    c, _ = _loss(tmp_path, *dr, "rl.max_response_length=16")
    assert a == b and c == pytest.approx(a / 2)
    # dual clip: answer 1 (A = −1) has ratio e^1.2 = 3.32 > c
    dual, m = _loss(tmp_path, "rl.policy_loss=dual_clip", "rl.clip_ratio_c=2.0")
    assert dual == pytest.approx(base - (math.exp(1.2) - 2.0) / 2) and m["clip_frac_dual"] > 0
    assert _loss(tmp_path, "rl.policy_loss=dual_clip", "rl.clip_ratio_c=4.0")[0] == pytest.approx(base)
    for name in ("cispo", "gspo"):
        assert _loss(tmp_path, f"rl.policy_loss={name}")[0] != pytest.approx(base), name
    # KL clamp on a token whose k3 term is huge; TIS on the KL term or not; TIS per token or per answer
    kl = dict(adv=(0.0, 0.0), ref=[[5.3, -0.2, 0.1], [1.2, 0.0, 0.0]])
    free, _ = _loss(tmp_path, "rl.kl_coef=1.0", **kl)
    clamped, _ = _loss(tmp_path, "rl.kl_coef=1.0", "rl.kl_clamp=10", **kl)
    assert free > 20 and clamped == pytest.approx(10.0 / 3 / 2)
    tis = dict(behav=[[-1.0, -1.0, 1.0], [-1.0, 0.0, 0.0]], **kl)
    pg_only, _ = _loss(tmp_path, "rl.kl_coef=1.0", "rl.tis_cap=2.0", **tis)
    both, _ = _loss(tmp_path, "rl.kl_coef=1.0", "rl.tis_cap=2.0", "rl.tis_on_kl=true", **tis)
    assert pg_only == pytest.approx(free) and both != pytest.approx(free)
    tok, _ = _loss(tmp_path, "rl.tis_cap=2.0", behav=tis["behav"])
    seq, _ = _loss(tmp_path, "rl.tis_cap=2.0", "rl.tis_level=sequence", behav=tis["behav"])
    assert tok != pytest.approx(seq)


def test_old_fields_name_their_replacement(tmp_path):
    with pytest.raises(ConfigError, match="rl.policy_loss"):
        grpo_config(tmp_path, ["rl.ratio_level=sequence"])
    with pytest.raises(ConfigError, match="rl.advantage_estimator"):
        grpo_config(tmp_path, ["rl.advantage_scale=none"])
    with pytest.raises(ConfigError, match="choose from clip, dual_clip, cispo, gspo"):
        grpo_config(tmp_path, ["rl.policy_loss=ppo"])


def test_conventions_name_every_field(tmp_path):
    from megatron_r1.rl.trainer import conventions

    got = conventions(grpo_config(tmp_path, ["rl.policy_loss=cispo", "training.max_tokens_per_micro_batch=64"]))
    for key in ("rl.advantage_estimator", "rl.advantage_std", "rl.advantage_eps", "rl.singleton_advantage",
                "rl.policy_loss", "rl.loss_agg", "rl.max_response_length", "rl.clip_ratio_c", "rl.kl_clamp",
                "rl.tis_on_kl", "rl.tis_level", "training.max_tokens_per_micro_batch"):
        assert key in got, key
    assert got["rl.policy_loss"] == "cispo" and got["training.max_tokens_per_micro_batch"] == 64


# ---------------------------------------------------------------------------------------- end to end (CPU)
class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _run(rank, world, tmp, overrides):
    from megatron_r1.logging import get_logger
    from megatron_r1.rl.trainer import run_grpo

    handler = _Lines()
    get_logger().addHandler(handler)
    run_grpo(grpo_config(tmp, overrides))
    return handler.lines


LEARNABLE = ["training.train_steps=16", "rl.prompts_per_step=4", "rl.group_size=8", "rl.mini_batch_size=16",
             "training.micro_batch_size=16", "training.global_batch_size=32", "optimizer.lr=1e-2",
             "optimizer.min_lr=1e-2", "rl.max_response_length=12"]
CASES = {
    "rloo": ["rl.advantage_estimator=rloo", "training.max_tokens_per_micro_batch=120"],
    "reinforce_plus_plus": ["rl.advantage_estimator=reinforce_plus_plus"],
    "cispo": ["rl.policy_loss=cispo", "rl.clip_low=1.0", "rl.clip_high=0.28", "rl.loss_agg=token-mean"],
    "dual_clip": ["rl.policy_loss=dual_clip", "rl.clip_ratio_c=3.0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_estimator_or_loss_raises_the_reward(tmp_path, case):
    # two mini-batches per step: the second one's ratios are off 1, so the losses differ from plain PPO's
    (lines,) = run_distributed(_run, 1, str(tmp_path), LEARNABLE + CASES[case])
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    rewards = [r["reward"] for r in rows]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.5, rewards
    (logged,) = [line for line in lines if line.startswith("GRPO conventions")]
    for override in CASES[case]:
        assert override in logged, (override, logged)
    assert 0.0 <= rows[-1]["padding_fraction"] < 1.0
    if case == "rloo":  # token-budget micro-batches: more than the fixed split's one per mini-batch
        assert rows[-1]["micro_batches"] > 1
