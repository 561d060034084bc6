"""GRPO end to end on CPU: it learns, it survives NaNs and failing rewards, and TP=2 equals TP=1."""
import math

import pytest

from megatron_r1.logging.metrics import read_metrics
from tests.distributed import run_distributed
from tests.rl.common import grpo_config
from tests.rl.layouts import assert_same_step, logged, one_step, save_init


def _run(rank, world, tmp, overrides):
    from megatron_r1.rl.trainer import run_grpo

    return run_grpo(grpo_config(tmp, overrides))


@pytest.mark.slow
def test_grpo_raises_the_reward_on_a_learnable_task(tmp_path):
    run_distributed(_run, 1, str(tmp_path), ["training.train_steps=16", "rl.prompts_per_step=4", "rl.group_size=8",
                                             "rl.mini_batch_size=32", "training.micro_batch_size=32",
                                             "training.global_batch_size=32", "optimizer.lr=1e-2",
                                             "optimizer.min_lr=1e-2", "rl.max_response_length=12"])
    rows = [r for r in read_metrics(tmp_path / "run") if "reward" in r]
    rewards = [r["reward"] for r in rows]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.5, rewards  # a real improvement, not noise
    for key in ("kl", "entropy", "grad_norm", "clip_frac_low", "clip_frac_high", "response_length/mean",
                "reflection_rate", "time/generate_s", "time/update_s", "gen_tokens_per_s"):
        assert key in rows[-1], key


def _nan_once(rank, world, tmp):
    import megatron_r1.ops as ops
    from megatron_r1.rl.trainer import run_grpo

    calls = {"n": 0}

    def poison(real):
        # The first loss the update computes is NaN, whichever op computes it: the fused op (token-level
        # losses, the default) or the composed one (sequence-level ratios). Both return the loss first.
        def poisoned(*args, **kwargs):
            loss, *rest = real(*args, **kwargs)
            calls["n"] += 1
            return (loss * float("nan") if calls["n"] == 1 else loss, *rest)
        return poisoned

    ops.grpo_policy_loss = poison(ops.grpo_policy_loss)
    ops.fused_grpo_loss = poison(ops.fused_grpo_loss)
    cfg = grpo_config(tmp, ["training.train_steps=2"])
    result = run_grpo(cfg)
    assert calls["n"] > 1, "the policy update called neither loss op: the poison did not reach it"
    return result


@pytest.mark.slow
def test_nan_loss_step_is_skipped_and_run_continues(tmp_path):
    run_distributed(_nan_once, 1, str(tmp_path))
    rows = [r for r in read_metrics(tmp_path / "run") if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in rows] == [1.0, 0.0]
    assert all(math.isfinite(r["reward"]) for r in rows)


@pytest.mark.slow
def test_reward_exceptions_are_counted_not_fatal(tmp_path):
    run_distributed(_run, 1, str(tmp_path), ["training.train_steps=1",
                                             "rewards=[{name: 'tests.rl.plugin_rewards:flaky'}]"])
    (row,) = [r for r in read_metrics(tmp_path / "run") if "reward_errors" in r]
    assert 0 < row["reward_errors"] < 16  # 4 prompts × 4 answers, those with odd-length prompts fail
    # each failing answer scored 0.0, every other one 1.0
    assert row["reward"] == (16 - row["reward_errors"]) / 16


@pytest.mark.slow
def test_one_rl_step_at_tp2_equals_tp1(tmp_path):
    run_distributed(save_init, 1, str(tmp_path))
    ref = logged(run_distributed(one_step, 1, str(tmp_path), "tp1", []))
    assert_same_step(ref, logged(run_distributed(one_step, 2, str(tmp_path), "tp2",
                                                 ["parallel.tensor_model_parallel_size=2"])))
