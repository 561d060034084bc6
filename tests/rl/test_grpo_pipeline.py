"""GRPO with pipeline parallelism: one RL step at PP=2 (and TP=2 x PP=2 on 4 processes) equals PP=1 — the same
rollouts from the pipelined generator, the same loss and gradient norm, the same weights after the update."""
import pytest

from tests.distributed import run_distributed
from tests.rl.common import grpo_config
from tests.rl.layouts import assert_same_step, logged, one_step, save_init

pytestmark = pytest.mark.slow

# two epochs over two mini-batches: the old log-probs come from the trainer's pipelined forward too
EPOCHS = ["rl.ppo_epochs=2", "rl.mini_batch_size=8", "training.micro_batch_size=4"]


@pytest.fixture(scope="module")
def pp1(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("grpo_pp"))
    run_distributed(save_init, 1, tmp)
    return tmp, logged(run_distributed(one_step, 1, tmp, "pp1", EPOCHS))


def test_one_rl_step_at_pp2_equals_pp1(pp1):
    tmp, ref = pp1
    layout = ["parallel.pipeline_model_parallel_size=2"]
    assert_same_step(ref, logged(run_distributed(one_step, 2, tmp, "pp2", [*layout, *EPOCHS])))


def test_one_rl_step_at_tp2_pp2_equals_pp1(pp1):
    tmp, ref = pp1
    layout = ["parallel.pipeline_model_parallel_size=2", "parallel.tensor_model_parallel_size=2"]
    assert_same_step(ref, logged(run_distributed(one_step, 4, tmp, "tp2pp2", [*layout, *EPOCHS])))


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
