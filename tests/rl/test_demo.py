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
