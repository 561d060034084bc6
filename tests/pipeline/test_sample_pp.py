"""`megatron-r1 sample` (rejection sampling) with pipeline parallelism: torchrun at PP=2 draws and keeps exactly what
one process draws and keeps — the same rows, the same filter counts, each row written once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_r1.config import to_dict
from tests.distributed import free_port, run_distributed
from tests.rl.common import grpo_config
from tests.rl.layouts import save_init

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _sample(tmp: Path, name: str, launcher: list, overrides: list) -> tuple[list, dict]:
    out = tmp / name
    out.mkdir()
    cfg = to_dict(grpo_config(str(tmp)))
    cfg["rl"]["max_prompt_length"] = 100  # the r1_zero template's prompt
    cfg.update(stage="sft", checkpoint={"load": str(tmp / "init")},
               data={"source": "builtin:demo_arithmetic", "options": {"num_samples": 6, "seed": 9},
                     "template": "r1_zero"},
               logging={"run_dir": str(out), "progress": False, "plots": False, "tensorboard": False})
    # an untrained model is never right, so what is compared is every filter's count over the 18 answers drawn, and
    # the general rows (written once, not once per stage)
    cfg["sampling"] = {"n": 3, "max_new_tokens": 8, "batch_prompts": 4, "general_source": "builtin:preferences",
                       "min_general_samples": 3}
    f = out / "sample.yaml"
    f.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, *launcher, "-m", "megatron_r1", "sample", str(f), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    stats = json.loads((out / "samples.jsonl.stats.json").read_text())
    return rows, stats


def test_sample_at_pp2_equals_one_process(tmp_path):
    run_distributed(save_init, 1, str(tmp_path))
    rows1, stats1 = _sample(tmp_path, "pp1", [], [])
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    rows2, stats2 = _sample(tmp_path, "pp2", torchrun, ["parallel.pipeline_model_parallel_size=2"])
    assert stats1["drawn"] == stats2["drawn"] == 18
    counts = lambda st: {k: v for k, v in st.items() if k not in ("options", "output")}  # noqa: E731
    assert counts(stats1) == counts(stats2)
    assert len(rows1) == len(rows2) > 0
    key = lambda r: (r["id"], r["completion"])  # noqa: E731
    assert sorted(map(key, rows1)) == sorted(map(key, rows2))
