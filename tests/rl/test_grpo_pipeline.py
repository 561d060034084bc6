"""GRPO with pipeline parallelism: one RL step at PP=2 (and TP=2 x PP=2 on 4 processes) equals PP=1 — the same
rollouts from the pipelined generator, the same loss and gradient norm, the same weights after the update."""
import pytest
import torch

from tests.distributed import run_distributed
from tests.rl.common import grpo_config

pytestmark = pytest.mark.slow

STEP = ["training.train_steps=1", "checkpoint.finetune=true", "checkpoint.load_optimizer=false", "rl.kl_coef=0.01",
        # Adam's first step is lr·sign(g) where eps is tiny: float noise in near-zero gradients would flip signs;
        # a larger eps keeps the update a smooth function of the gradient, so two layouts can be compared
        "optimizer.adam_eps=1e-3",
        # a reward that differs within groups, so the step has real gradients
        "rewards=[{name: 'tests.rl.plugin_rewards:starts_a_to_m'}]",
        # two epochs over two mini-batches: the old log-probs come from the trainer's pipelined forward too
        "rl.ppo_epochs=2", "rl.mini_batch_size=8", "training.micro_batch_size=4"]


def _save_init(rank, world, tmp):
    from megatron_r1.checkpoint import save_model_only
    from megatron_r1.models import build_model
    from megatron_r1.parallel import init_parallel

    cfg = grpo_config(tmp)
    init_parallel(cfg.parallel, 3)
    save_model_only(build_model(cfg.model, cfg.parallel, "fp32"), f"{tmp}/init")


def _one_step(rank, world, tmp, name, layout):
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.inference.weights import full_state_dict
    from megatron_r1.models import build_model
    from megatron_r1.parallel import runtime
    from megatron_r1.rl.trainer import run_grpo

    cfg = grpo_config(f"{tmp}/{name}", [*layout, f"checkpoint.load={tmp}/init", *STEP])
    metrics = run_grpo(cfg)
    model = build_model(cfg.model, cfg.parallel, "fp32")
    load_model_only(model, cfg.checkpoint.save)
    full = full_state_dict(model)  # every stage's tensors, gathered
    ctx = runtime.current_context()
    return metrics if ctx.is_logging_rank else None, ({k: v.clone() for k, v in full.items()} if rank == 0 else None)


def _logged(results):
    (metrics,) = [m for m, _ in results if m is not None]
    return metrics, results[0][1]


@pytest.fixture(scope="module")
def pp1(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("grpo_pp"))
    run_distributed(_save_init, 1, tmp)
    return tmp, _logged(run_distributed(_one_step, 1, tmp, "pp1", []))


def _same_step(ref, got):
    (m1, w1), (m2, w2) = ref, got
    assert m1["reward"] == m2["reward"] and 0 < m1["reward"] < 1  # the same samples, with signal
    assert m1["response_length/mean"] == m2["response_length/mean"]
    assert m1["grad_norm"] > 1e-3
    assert abs(m1["loss"] - m2["loss"]) < 1e-5
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4 * m1["grad_norm"]
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


def test_one_rl_step_at_pp2_equals_pp1(pp1):
    tmp, ref = pp1
    _same_step(ref, _logged(run_distributed(_one_step, 2, tmp, "pp2", ["parallel.pipeline_model_parallel_size=2"])))


def test_one_rl_step_at_tp2_pp2_equals_pp1(pp1):
    tmp, ref = pp1
    layout = ["parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"]
    _same_step(ref, _logged(run_distributed(_one_step, 4, tmp, "tp2pp2", layout)))


def test_grpo_at_pp2_from_the_cli(tmp_path):
    """`torchrun --nproc_per_node 2 -m megatron_r1 train CONFIG parallel.pipeline_model_parallel_size=2`, as a user
    launches it: it runs its steps, and the last stage logs them."""
    import json
    import os
    import subprocess
    import sys

    from megatron_r1.config import dump_yaml
    from tests.distributed import free_port

    cfg = grpo_config(str(tmp_path))
    (tmp_path / "grpo.yaml").write_text(dump_yaml(cfg))
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])  # the config's reward plugin lives in tests/
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "megatron_r1", "train", str(tmp_path / "grpo.yaml"), "parallel.pipeline_model_parallel_size=2",
         "training.train_steps=2", "rewards=[{name: 'tests.rl.plugin_rewards:starts_a_to_m'}]"],
        capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in rows if "reward" in r})
    assert steps == [1, 2], rows
    assert all(r["grad_norm"] > 0 for r in rows if "grad_norm" in r)
