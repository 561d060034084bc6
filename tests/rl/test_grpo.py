"""GRPO end to end on CPU: it learns, it survives NaNs and failing rewards, and TP=2 equals TP=1."""
import math

import pytest
import torch

from megatron_r1.logging.metrics import read_metrics
from tests.distributed import run_distributed
from tests.rl.common import grpo_config


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


def _one_step_weights(rank, world, tmp, tp, init_dir):
    from megatron_r1.rl.trainer import run_grpo
    from megatron_r1.inference.weights import full_state_dict

    cfg = grpo_config(f"{tmp}/tp{tp}", [f"parallel.tensor_model_parallel_size={tp}", "training.train_steps=1",
                                        f"checkpoint.load={init_dir}", "checkpoint.finetune=true",
                                        "checkpoint.load_optimizer=false", "rl.kl_coef=0.01",
                                        # Adam's first step is lr·sign(g) where eps is tiny: float noise in
                                        # near-zero gradients would flip signs; a larger eps keeps the update a
                                        # smooth function of the gradient, so two layouts can be compared
                                        "optimizer.adam_eps=1e-3",
                                        # a reward that differs within groups, so the step has real gradients
                                        "rewards=[{name: 'tests.rl.plugin_rewards:starts_a_to_m'}]"])
    metrics = run_grpo(cfg)
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.models import build_model

    model = build_model(cfg.model, cfg.parallel, "fp32")
    load_model_only(model, cfg.checkpoint.save)
    full = full_state_dict(model)
    return metrics, ({k: v.clone() for k, v in full.items()} if rank == 0 else None)


def _save_init(rank, world, tmp):
    from megatron_r1.checkpoint import save_model_only
    from megatron_r1.models import build_model
    from megatron_r1.parallel import init_parallel

    cfg = grpo_config(tmp)
    init_parallel(cfg.parallel, 3)
    save_model_only(build_model(cfg.model, cfg.parallel, "fp32"), f"{tmp}/init")


@pytest.mark.slow
def test_one_rl_step_at_tp2_equals_tp1(tmp_path):
    run_distributed(_save_init, 1, str(tmp_path))
    (m1, w1), = run_distributed(_one_step_weights, 1, str(tmp_path), 1, f"{tmp_path}/init")
    (m2, w2), _ = run_distributed(_one_step_weights, 2, str(tmp_path), 2, f"{tmp_path}/init")
    assert m1["reward"] == m2["reward"] and 0 < m1["reward"] < 1  # the same samples, with signal
    assert m1["grad_norm"] > 1e-3
    assert abs(m1["loss"] - m2["loss"]) < 1e-5
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4 * m1["grad_norm"]
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
