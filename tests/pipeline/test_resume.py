"""An interrupted pipeline resumes: the stage that was killed continues from its last checkpoint, not from zero.

The kill is real (SIGKILL from the trainer's test hook, right after step 3 and its checkpoint), so nothing gets to
clean up; `--until cold_start` keeps the test to the first two stages.
"""
import json
import signal

import pytest

from tests.pipeline.test_pipeline_e2e import jsonl, run_pipeline


@pytest.mark.slow
def test_killed_stage_resumes_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "r1"
    killed = run_pipeline(run_dir, "--until", "cold_start", env={"MEGATRON_R1_TEST_KILL_AFTER_STEP": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    base = run_dir / "base"
    assert not (base / "STAGE_DONE.json").exists()  # not finished: no marker
    assert (base / "checkpoints" / "latest").read_text().strip().endswith("iter_0000003")
    assert not (run_dir / "cold_start").exists()

    resumed = run_pipeline(run_dir, "--until", "cold_start")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "base (train): running" in resumed.stdout and "from step 3" in resumed.stderr
    # Steps 1-3 were logged by the killed run, 4-6 by the resumed one (one row per step, no step trained twice).
    steps = [r["step"] for r in jsonl(base / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((base / "STAGE_DONE.json").read_text())["stage"] == "base"
    assert (run_dir / "cold_start" / "STAGE_DONE.json").is_file()
    assert not (run_dir / "reasoning_rl").exists()  # --until stops there
    md = (run_dir / "report.md").read_text()
    assert "stages finished: 2 of 8" in md and "### 2. cold_start" in md
