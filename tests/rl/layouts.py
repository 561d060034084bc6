"""One GRPO step under a parallel layout, and the check that two layouts took the same step: what the layout parity
tests (TP, PP, TP x PP, EP) share. Rank functions are module-level so `run_distributed` can spawn them."""
import torch

from tests.rl.common import grpo_config

# A step two layouts can be compared on: one RL step from the same saved weights, KL on, a reward that differs within
# groups (real gradients), and a larger Adam eps: Adam's first step is lr·sign(g) where eps is tiny, so float noise
# in near-zero gradients would flip signs; with eps 1e-3 the update is a smooth function of the gradient.
ONE_STEP = ["training.train_steps=1", "checkpoint.finetune=true", "checkpoint.load_optimizer=false", "rl.kl_coef=0.01",
            "optimizer.adam_eps=1e-3", "rewards=[{name: 'tests.rl.plugin_rewards:starts_a_to_m'}]"]


def save_init(rank, world, tmp):
    """The tiny GRPO model's initial weights under `tmp`/init, for every layout to start from."""
    from megatron_r1.checkpoint import save_model_only
    from megatron_r1.models import build_model
    from megatron_r1.parallel import init_parallel

    cfg = grpo_config(tmp)
    init_parallel(cfg.parallel, 3)
    save_model_only(build_model(cfg.model, cfg.parallel, "fp32"), f"{tmp}/init")


def one_step(rank, world, tmp, name, overrides):
    """One RL step from `tmp`/init under `overrides` (the layout and anything else). Returns (the metrics, on the
    logging rank, else None; the full weights after the step, gathered over every group, on rank 0, else None)."""
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.inference.weights import full_state_dict
    from megatron_r1.models import build_model
    from megatron_r1.parallel import runtime
    from megatron_r1.rl.trainer import run_grpo

    cfg = grpo_config(f"{tmp}/{name}", [*overrides, f"checkpoint.load={tmp}/init", *ONE_STEP])
    metrics = run_grpo(cfg)
    model = build_model(cfg.model, cfg.parallel, "fp32")
    load_model_only(model, cfg.checkpoint.save)
    full = full_state_dict(model)
    logging = runtime.current_context().is_logging_rank
    return metrics if logging else None, ({k: v.clone() for k, v in full.items()} if rank == 0 else None)


def logged(results):
    """(the logging rank's metrics, rank 0's weights) from `run_distributed(one_step, ...)`'s results."""
    (metrics,) = [m for m, _ in results if m is not None]
    return metrics, results[0][1]


def assert_same_step(ref, got):
    """The same rollouts (reward, lengths), the same loss and gradient norm, the same weights after the step."""
    (m1, w1), (m2, w2) = ref, got
    assert m1["reward"] == m2["reward"] and 0 < m1["reward"] < 1  # the same samples, with signal
    assert m1["response_length/mean"] == m2["response_length/mean"]
    assert m1["grad_norm"] > 1e-3
    assert abs(m1["loss"] - m2["loss"]) < 1e-5
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4 * m1["grad_norm"]
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
