"""A GRPO run killed with SIGKILL mid-run and resumed ends with exactly the weights of an uninterrupted run."""
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from tests.distributed import reaped, run_distributed
from tests.rl.common import TINY


def _write_config(path, save_dir, run_dir):
    cfg = {
        "stage": "grpo", "model": dict(TINY), "tokenizer": {"path": "builtin:demo"},
        "data": {"source": "builtin:demo_arithmetic", "template": "plain", "options": {"num_samples": 64, "seed": 1}},
        "training": {"train_steps": 4, "micro_batch_size": 16, "global_batch_size": 16, "seed": 5},
        "optimizer": {"lr": 1e-3, "lr_warmup_steps": 1, "lr_decay_style": "cosine", "min_lr": 1e-4},
        "rl": {"prompts_per_step": 4, "group_size": 4, "max_prompt_length": 16, "max_response_length": 8,
               "mini_batch_size": 8, "kl_coef": 0.01},  # two optimizer steps per RL step, a KL reference
        "generation": {"temperature": 1.0, "max_batch_size": 16},
        "rewards": [{"name": "tests.rl.plugin_rewards:says_think"}],
        "logging": {"run_dir": str(run_dir), "progress": False, "plots": False},
        "checkpoint": {"save": str(save_dir), "save_interval": 1, "keep_last": 5},
    }
    path.write_text(yaml.safe_dump(cfg))


def _train(config, kill_after=None):
    env = dict(os.environ)
    env.pop("MEGATRON_R1_TEST_KILL_AFTER_STEP", None)
    if kill_after is not None:
        env["MEGATRON_R1_TEST_KILL_AFTER_STEP"] = str(kill_after)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    log = config.with_suffix(f".{kill_after}.log")
    # Output to a file, not a pipe, and a session of its own: helper processes (checkpoint writer, reward pool)
    # outlive a SIGKILLed trainer and would hold a pipe open; every process it left is ended afterwards (reaped).
    with open(log, "w") as out, reaped():
        proc = subprocess.Popen([sys.executable, "-m", "megatron_r1", "train", str(config)], env=env, cwd=root,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        rc = proc.wait(timeout=600)
    return subprocess.CompletedProcess(proc.args, rc, log.read_text(), log.read_text())


def _final_weights(rank, world, config, ckpt):
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.config import load_config
    from megatron_r1.models import build_model
    from megatron_r1.parallel import init_parallel

    cfg = load_config(config)
    init_parallel(cfg.parallel, 0)
    model = build_model(cfg.model, cfg.parallel, "fp32")
    load_model_only(model, ckpt)
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    straight, broken = tmp_path / "straight.yaml", tmp_path / "broken.yaml"
    _write_config(straight, tmp_path / "ck_straight", tmp_path / "run_straight")
    _write_config(broken, tmp_path / "ck_broken", tmp_path / "run_broken")
    r = _train(straight)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _train(broken, kill_after=2)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert (tmp_path / "ck_broken" / "latest").read_text().strip() == "iter_0000002"
    r = _train(broken)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from step 2" in r.stderr
    (a,) = run_distributed(_final_weights, 1, str(straight), str(tmp_path / "ck_straight"))
    (b,) = run_distributed(_final_weights, 1, str(broken), str(tmp_path / "ck_broken"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
