"""`megatron-r1 demo --quick`: every stage of the README's main job runs end to end and writes its artefacts."""
import json
import subprocess
import sys


def test_demo_quick_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "megatron_r1", "demo", "--quick", "--run-dir", str(run_dir)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    for side in ("before", "after"):
        assert set(results[side]) == {"pass@1", "cons@8", "format", "mean_length"}
        for key in ("pass@1", "cons@8", "format"):
            assert 0.0 <= results[side][key] <= 1.0
        assert results[side]["mean_length"] > 0
    assert results["minutes"] > 0
    assert (run_dir / "plots" / "response_length.png").is_file()
    assert (run_dir / "plots" / "reward.png").is_file()
    assert (run_dir / "grpo" / "checkpoints" / "latest").is_file()
    assert "pass@1" in r.stdout and "before RL" in r.stdout and str(run_dir) in r.stdout

    # `megatron-r1 eval` on the demo's RL checkpoint: the report's metrics as JSON
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "megatron_r1", "eval", "--load", str(run_dir / "grpo" / "checkpoints"),
                        "--k", "2", "--num-problems", "4", "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ev = json.loads(out.read_text())
    assert ev["k"] == 2 and ev["num_problems"] == 4
    assert 0.0 <= ev["pass@1"] <= 1.0 and 0.0 <= ev["cons@2"] <= 1.0 and ev["mean_length"] > 0
