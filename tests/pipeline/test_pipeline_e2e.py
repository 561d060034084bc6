"""The tiny R1 pipeline end to end on CPU (examples/pipelines/r1_tiny.yaml), as users run it: a subprocess.

One run of all eight stages feeds every assertion (about two minutes on two cores); then a re-run must skip them
all, and a re-run with a changed stage must refuse to reuse that stage's old outputs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.distributed import reaped

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "pipelines" / "r1_tiny.yaml"
STAGES = ["base", "cold_start", "reasoning_rl", "rejection_sampling", "rs_sft", "reward_model", "all_scenario_rl",
          "distill"]
TRAINED = ["base", "cold_start", "reasoning_rl", "rs_sft", "reward_model", "all_scenario_rl", "distill"]


def run_pipeline(run_dir, *args, env=None, timeout=600):
    """The CLI in a subprocess; output goes through files, not pipes: after a SIGKILL, the checkpoint writer's
    helper processes may outlive the pipeline for a moment, and a pipe held open by them would block the test."""
    cmd = [sys.executable, "-m", "megatron_r1", "pipeline", str(TINY), f"run_dir={run_dir}", *args]
    logs = Path(run_dir).parent / f"{Path(run_dir).name}.logs"
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    out, err = logs / f"{n}.out", logs / f"{n}.err"
    # Its own session, and every process it left ended afterwards (reaped): a SIGKILLed pipeline's checkpoint-writer
    # helpers would otherwise live on under pid 1 (seen: one holding ~570 MB after the suite).
    with out.open("w") as fo, err.open("w") as fe, reaped():
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fo, stderr=fe, env={**os.environ, **(env or {})},
                                start_new_session=True)
        returncode = proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(cmd, returncode, out.read_text(), err.read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("r1_tiny")
    proc = run_pipeline(run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir, proc


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def stage_config(run_dir, name):
    return yaml.safe_load((run_dir / name / "config.yaml").read_text())


@pytest.mark.slow
def test_every_stage_finished_with_its_artefacts(run):
    run_dir, proc = run
    for name in STAGES:
        marker = json.loads((run_dir / name / "STAGE_DONE.json").read_text())
        assert marker["stage"] == name and marker["fingerprint"]
        assert f"{name} (" in proc.stdout and "running" in proc.stdout
    for name in TRAINED:
        ckpt = run_dir / name / "checkpoints"
        assert (ckpt / "latest").is_file(), name
        assert (run_dir / name / "metrics.jsonl").is_file(), name


@pytest.mark.slow
def test_each_stage_starts_from_the_one_before(run):
    run_dir, _ = run
    expected = {"cold_start": "base", "reasoning_rl": "cold_start", "rs_sft": "base", "reward_model": "rs_sft",
                "all_scenario_rl": "rs_sft"}
    for name, source in expected.items():
        ck = stage_config(run_dir, name)["checkpoint"]
        assert ck["load"] == str(run_dir / source / "checkpoints"), name
        assert ck["finetune"] is True and ck["load_optimizer"] is False
        assert ck["save"] == str(run_dir / name / "checkpoints")
    assert stage_config(run_dir, "rs_sft")["data"]["source"] == str(run_dir / "rejection_sampling" / "samples.jsonl")
    assert stage_config(run_dir, "rs_sft")["training"]["num_epochs"] == 2
    steps = [r["step"] for r in jsonl(run_dir / "rs_sft" / "metrics.jsonl")]
    rows = len(jsonl(run_dir / "rejection_sampling" / "samples.jsonl"))
    assert max(steps) == -(-2 * rows // 8)  # two epochs at global batch 8


@pytest.mark.slow
def test_rejection_sampling_output(run):
    run_dir, proc = run
    out = run_dir / "rejection_sampling"
    stats = json.loads((out / "samples.jsonl.stats.json").read_text())
    assert stats["drawn"] == 8 * 4
    assert stats["kept"] + sum(stats["removed"].values()) == stats["drawn"]
    rows = jsonl(out / "samples.jsonl")
    assert len(rows) == stats["reasoning_rows"] + stats["general_rows"]
    assert stats["general_rows"] >= 16
    for r in rows:
        assert r["prompt"] and r["completion"] and r["kind"] in ("reasoning", "general")
        assert r["provenance"]["prompt_id"]
        if r["kind"] == "reasoning":
            p = r["provenance"]
            assert p["checkpoint"].startswith(str(run_dir / "reasoning_rl" / "checkpoints"))
            assert p["scores"]["accuracy"] == 1.0
    # What each filter removed is printed.
    for name in ("wrong_answer", "mixed_language", "code_block", "overlong_paragraph", "repetition"):
        assert name in proc.stdout


@pytest.mark.slow
def test_all_scenario_rl_mixes_and_routes(run):
    run_dir, _ = run
    prompts = jsonl(run_dir / "all_scenario_rl" / "prompts.jsonl")
    kinds = [p["kind"] for p in prompts]
    assert kinds.count("reasoning") == 24 and kinds.count("general") == 8  # weights 3 : 1 of 32
    cfg = stage_config(run_dir, "all_scenario_rl")
    routes = cfg["rewards"][0]["options"]["routes"]
    assert routes["general"][0]["options"]["checkpoint"] == str(run_dir / "reward_model" / "checkpoints")
    rows = jsonl(run_dir / "all_scenario_rl" / "metrics.jsonl")
    assert len(rows) == 2 and all(r["reward_errors"] == 0 for r in rows)
    assert json.loads((run_dir / "reward_model" / "reward_model_eval.json").read_text())["heldout_pairs"] > 0


@pytest.mark.slow
def test_distilled_student(run):
    run_dir, _ = run
    d = run_dir / "distill"
    cfg = stage_config(run_dir, "distill")
    assert cfg["model"]["arch"] == "qwen2" and cfg["model"]["num_experts"] is None
    assert cfg["tokenizer"]["path"].endswith("tiny_student_tokenizer")  # its own tokenizer, not the teacher's
    data = jsonl(d / "distill_data.jsonl")
    assert len(data) == len(jsonl(run_dir / "rejection_sampling" / "samples.jsonl")) + \
        len(jsonl(d / "teacher" / "samples.jsonl"))
    assert cfg["data"]["source"] == str(d / "distill_data.jsonl")
    ev = json.loads((d / "student_eval.json").read_text())
    assert ev["num_problems"] == 4 and ev["k"] == 2 and 0.0 <= ev["pass@1"] <= 1.0


@pytest.mark.slow
def test_report(run):
    run_dir, _ = run
    md = (run_dir / "report.md").read_text()
    assert "stages finished: 8 of 8" in md
    for i, name in enumerate(STAGES, 1):
        assert f"### {i}. {name}" in md
    for metric in ("| loss |", "| reward |", "| eval/pairwise_accuracy |", "| removed: wrong_answer |",
                   "| student eval pass@1 |", "| prompt mixture |"):
        assert metric in md, metric
    png = run_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_refuses_changed_ones(run):
    run_dir, _ = run
    markers = {n: (run_dir / n / "STAGE_DONE.json").read_text() for n in STAGES}
    ckpts = {n: (run_dir / n / "checkpoints" / "latest").read_text() for n in TRAINED}
    proc = run_pipeline(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped") == len(STAGES)
    assert "running" not in proc.stdout
    assert {n: (run_dir / n / "STAGE_DONE.json").read_text() for n in STAGES} == markers
    assert {n: (run_dir / n / "checkpoints" / "latest").read_text() for n in TRAINED} == ckpts
    assert "stages finished: 8 of 8" in (run_dir / "report.md").read_text()

    changed = run_pipeline(run_dir, "cold_start.training.train_steps=4")
    assert changed.returncode == 2
    assert "stage cold_start finished with a different configuration" in changed.stderr
    assert "base (train): done" in changed.stdout  # the unchanged stage before it was still skipped


@pytest.mark.slow
def test_sample_command_on_the_reasoning_checkpoint(run, tmp_path):
    """`megatron-r1 sample CONFIG k=v` by itself: the stage config plus a `sampling:` section, overrides to both."""
    run_dir, _ = run
    cfg = stage_config(run_dir, "cold_start")
    cfg.update(stage="sft", data={"source": "builtin:demo_arithmetic", "options": {"num_samples": 4, "seed": 9},
                                  "template": "r1_zero"},
               checkpoint={"load": str(run_dir / "reasoning_rl" / "checkpoints")},
               logging={"run_dir": str(tmp_path), "progress": False, "plots": False, "tensorboard": False})
    cfg["sampling"] = {"n": 2, "max_new_tokens": 8, "general_source": "builtin:preferences",
                       "min_general_samples": 3}
    f = tmp_path / "sample.yaml"
    f.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "megatron_r1", "sample", str(f), "sampling.n=3", "training.seed=4"]
    with (tmp_path / "out.txt").open("w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "wrong_answer" in text and "of 12 drawn" in text  # 4 prompts × n=3 (the override won)
    stats = json.loads((tmp_path / "samples.jsonl.stats.json").read_text())
    assert stats["drawn"] == 12 and stats["options"]["n"] == 3 and stats["general_rows"] >= 3
    assert len(jsonl(tmp_path / "samples.jsonl")) == stats["reasoning_rows"] + stats["general_rows"]
