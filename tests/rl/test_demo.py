"""`megatron-r1 demo --quick`: every stage of the README's main job runs end to end and writes its artefacts,
from the shipped base and (`--pretrain`) from a base it pre-trains itself."""
import json
import subprocess
import sys

import pytest

from megatron_r1.rl.demo_base import LOSS_CURVE, SHIPPED, WEIGHTS, read_provenance


def run_demo(run_dir, *flags):
    r = subprocess.run([sys.executable, "-m", "megatron_r1", "demo", "--quick", "--run-dir", str(run_dir), *flags],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    for side in ("before", "after"):
        assert set(results[side]) == {"pass@1", "cons@8", "format", "mean_length", "reflection_rate"}
        for key in ("pass@1", "cons@8", "format", "reflection_rate"):
            assert 0.0 <= results[side][key] <= 1.0
        assert results[side]["mean_length"] > 0
        sample = results["samples"][side]
        assert sample["response"] and sample["response"].strip() in r.stdout
    assert results["minutes"] > 0
    for curve in ("response_length", "reflection_rate", "reward", f"pretrain/{LOSS_CURVE[:-4]}"):
        assert (run_dir / "plots" / f"{curve}.png").is_file(), curve
    assert (run_dir / "grpo" / "checkpoints" / "latest").is_file()
    assert "pass@1" in r.stdout and "reflection rate" in r.stdout and "before RL" in r.stdout
    assert str(run_dir) in r.stdout and "made by: megatron-r1 demo --pretrain" in r.stdout
    return r, results


@pytest.mark.slow
def test_demo_quick_from_the_shipped_base(tmp_path):
    run_dir = tmp_path / "demo"
    r, results = run_demo(run_dir)
    assert results["base"] == str(SHIPPED) and not (run_dir / "pretrain").exists()

    # `megatron-r1 eval` on the demo's RL checkpoint: the report's metrics as JSON
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "megatron_r1", "eval", "--load", str(run_dir / "grpo" / "checkpoints"),
                        "--k", "2", "--num-problems", "4", "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ev = json.loads(out.read_text())
    assert ev["k"] == 2 and ev["num_problems"] == 4
    assert 0.0 <= ev["pass@1"] <= 1.0 and 0.0 <= ev["cons@2"] <= 1.0 and ev["mean_length"] > 0


@pytest.mark.slow
def test_demo_quick_pretrain_rebuilds_a_base_with_provenance(tmp_path):
    run_dir = tmp_path / "demo"
    r, results = run_demo(run_dir, "--pretrain")
    base = run_dir / "base"
    assert results["base"] == str(base) and (base / WEIGHTS).is_file() and (base / LOSS_CURVE).is_file()
    p = read_provenance(base)
    assert p["command"] == "megatron-r1 demo --pretrain --quick" and p["training"]["train_steps"] == 4
    assert [step for step, _ in p["loss_curve"]] == [1, 2, 3, 4]
    assert p["held_out"]["pass@1"] == results["before"]["pass@1"]
    assert set(p["check"]) >= {"held_out_loss", "pass@1", "mean_length"}
