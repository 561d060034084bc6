"""Resume is exact: N steps straight == N/2 steps + SIGKILL + resume + N/2 steps, bit for bit, on CPU.

The trainer runs as `python -m megatron_r1 train CONFIG` in a subprocess. The interrupted run is killed for real:
`MEGATRON_R1_TEST_KILL_AFTER_STEP=k` makes the trainer SIGKILL itself right after step k and the checkpoint due
at step k (no clean return, no atexit, no flush). Resuming restores model, optimizer, LR scheduler, RNG, data
position and step from `checkpoint.save`; the final weights of both runs are then loaded with load_model_only and
compared exactly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed import run_distributed
from tests.presets import tiny_deepseek_v3

N = 6
MODEL = tiny_deepseek_v3(seq_length=48, max_position_embeddings=64)


def _config(tmp: Path, name: str) -> Path:
    cfg = {
        "stage": "pretrain", "model": MODEL, "tokenizer": {"path": "builtin:demo"},
        "data": {"source": str(tmp / "corpus.txt")},
        # Warm-up spans the kill point, so a scheduler restored wrongly changes the learning rate of step N/2+1.
        "training": {"train_steps": N, "micro_batch_size": 4, "global_batch_size": 8, "seed": 5},
        "optimizer": {"lr": 0.003, "lr_warmup_steps": N // 2 + 1},
        "logging": {"run_dir": str(tmp / name / "run"), "progress": False, "plots": False, "tensorboard": False},
        "checkpoint": {"save": str(tmp / name / "ckpt"), "save_interval": N // 2, "keep_last": 2},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, kill_after: int | None = None, run_dir_suffix: str = "") -> tuple[int, str]:
    """Run the trainer; returns (exit code, its stderr). Output goes to files, not pipes: a SIGKILLed trainer
    leaves dist_checkpointing's helper processes behind holding inherited pipes open, and a pipe reader would
    wait for them. The trainer gets its own process group, which is killed afterwards to end those helpers."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MEGATRON_R1_TEST_KILL_AFTER_STEP", None)
    if kill_after is not None:
        env["MEGATRON_R1_TEST_KILL_AFTER_STEP"] = str(kill_after)
    cmd = [sys.executable, "-m", "megatron_r1", "train", str(config)]
    if run_dir_suffix:
        run_dir = Path(yaml.safe_load(config.read_text())["logging"]["run_dir"] + run_dir_suffix)
        cmd.append(f"logging.run_dir={run_dir}")
    log = config.with_suffix(f".{kill_after}{run_dir_suffix}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: trainer leftovers only
            except ProcessLookupError:
                pass
    return code, log.read_text()[-3000:]


def _steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            steps.append(row["step"])
    return steps


def _final_weights(rank, world_size, config: str, ckpt_dirs: list[str]):
    import io

    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.config import load_config
    from megatron_r1.models.builder import build_model
    from megatron_r1.parallel import init_parallel

    cfg = load_config(config)
    init_parallel(cfg.parallel, 0)
    out = []
    for d in ckpt_dirs:
        model = build_model(cfg.model, cfg.parallel, cfg.training.precision)
        load_model_only(model, d)
        out.append({k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")})
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


@pytest.mark.slow
def test_kill_and_resume_equals_straight_run(tmp_path):
    docs = [f"User: {a}*{b}. Assistant: <answer> {a * b} </answer>" for a in range(12) for b in range(12)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs))

    straight = _config(tmp_path, "straight")
    code, out = _train(straight)
    assert code == 0, out

    broken = _config(tmp_path, "broken")
    code, out = _train(broken, kill_after=N // 2)
    assert code == -signal.SIGKILL, f"expected SIGKILL, got {code}\n{out}"
    ckpt = tmp_path / "broken" / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"iter_{N // 2:07d}"
    assert _steps_logged(tmp_path / "broken" / "run") == list(range(1, N // 2 + 1))

    code, out = _train(broken, run_dir_suffix="_resumed")
    assert code == 0, out
    # It continued from the checkpoint: only the second half was trained by this process.
    assert _steps_logged(tmp_path / "broken" / "run_resumed") == list(range(N // 2 + 1, N + 1))
    assert (ckpt / "latest").read_text().strip() == f"iter_{N:07d}"

    import io

    blob = run_distributed(_final_weights, 1, str(straight),
                           [str(tmp_path / "straight" / "ckpt"), str(ckpt)])[0]
    a, b = torch.load(io.BytesIO(blob))
    assert a.keys() == b.keys() and len(a) > 10
    mismatched = [k for k in a if not torch.equal(a[k], b[k])]
    assert not mismatched, f"weights differ after resume: {mismatched[:5]}"
