"""tools/gpu_check.py --dry-run: the prepared GPU check runs the same code on the CPU at tiny shapes, so it cannot
rot before a device is lent (docs/gpu.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    md = out.with_suffix(".md")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--json", str(out),
                           "--markdown", str(md)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert md.read_text().startswith("## GPU check (dry run on CPU)")
    return json.loads(out.read_text()), proc.stdout


def test_every_section_runs_and_passes(dry_run):
    result, table = dry_run
    assert result["dry_run"] is True
    assert list(result["sections"]) == list(gpu_check.SECTIONS)
    for name, sec in result["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert f"### {name}: ok" in table
    assert result["total_s"] < 110


def test_logprobs_engine_equals_trainer_on_both_shapes(dry_run):
    rows = dry_run[0]["sections"]["logprobs"]["rows"]
    assert [r["model"] for r in rows] == ["deepseek_v3_1b", "qwen2_0.5b"]
    for r in rows:
        assert r["tokens"] > 0 and r["finite"] and r["dtype"] == "float32"
        assert r["max_abs_diff"] < 1e-4 and r["mean_abs_diff"] <= r["max_abs_diff"]


def test_decode_rows_cover_batches_and_modes_with_a_roofline(dry_run):
    result = dry_run[0]
    rows = result["sections"]["decode"]["rows"]
    sizes = gpu_check.SIZES["dry"]
    want = {(m, b, mode) for m in gpu_check.MODELS["dry"] for b in sizes["decode_batches"]
            for mode in ("eager", "static")}  # "static": the CUDA-graph step without capture, off the GPU
    assert {(r["model"], r["batch"], r["mode"]) for r in rows} == want
    assert result["meta"]["copy_bandwidth_GBps"] > 0
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["roofline_pct"] < 100 and r["MB_per_step"] > 0


def test_ops_are_checked_against_the_reference_and_timed_against_the_floor(dry_run):
    rows = dry_run[0]["sections"]["ops"]["rows"]
    methods = {(r["method"], r["backend"]) for r in rows}
    assert {("floor", "-"), ("naive", "reference"), ("fused", "torch"), ("split", "torch")} <= methods
    assert ("fused", "triton") in methods  # interpreted Triton in the dry run
    floor = [r for r in rows if r["method"] == "floor"]
    assert floor and all(r["x_floor"] == 1.0 for r in floor)
    for r in rows:
        if r["method"] in ("fused", "split"):
            assert r["max_rel_err"] < 1e-4


def test_grpo_step_has_its_time_split_and_tokens_per_second(dry_run):
    rows = dry_run[0]["sections"]["grpo"]["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        parts = sum(r[k] for k in ("generate_s", "reward_s", "logprobs_s", "update_s", "refit_s"))
        assert 0 < parts <= r["step_s"] * 1.05
        assert r["seq_tokens"] > r["gen_tokens"] > 0 and r["tokens_per_s_per_gpu"] > 0


def test_gpu_marked_tests_were_collected(dry_run):
    (row,) = dry_run[0]["sections"]["tests"]["rows"]
    assert row["returncode"] == 0 and row.get("skipped", 0) > 0  # all skipped off the GPU, none failed


def _stub_run(monkeypatch, **fns):
    for name, fn in fns.items():
        monkeypatch.setattr(gpu_check, f"section_{name}", fn)
    monkeypatch.setattr(gpu_check, "environment", lambda: {"device": "stub"})


def test_a_broken_section_is_reported_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    def broken(ctx):
        raise RuntimeError("kernel exploded")

    def bad_figures(ctx):
        raise gpu_check.CheckFailed("figures off", [{"x": 1.5}])

    _stub_run(monkeypatch, logprobs=broken, decode=lambda ctx: [{"batch": 1, "tokens_per_s": 10.0}],
              ops=bad_figures)
    rc = gpu_check.main(["--dry-run", "--sections", "logprobs,decode,ops", "--json", str(tmp_path / "r.json")])
    assert rc == 1
    res = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert res["logprobs"]["status"] == "ERROR" and "kernel exploded" in res["logprobs"]["error"]
    assert res["decode"]["status"] == "ok" and res["decode"]["rows"] == [{"batch": 1, "tokens_per_s": 10.0}]
    assert res["ops"]["status"] == "FAILED" and res["ops"]["rows"] == [{"x": 1.5}]
    out = capsys.readouterr().out
    assert "### ops: FAILED" in out and "| x |" in out and "| 1.5 |" in out


def test_sections_past_the_budget_are_skipped(monkeypatch, tmp_path):
    import time

    _stub_run(monkeypatch, decode=lambda ctx: time.sleep(0.05) or [], ops=lambda ctx: [])
    rc = gpu_check.main(["--dry-run", "--sections", "decode,ops", "--budget-s", "0.01",
                         "--json", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())["sections"]
    assert res["decode"]["status"] == "ok" and res["ops"]["status"].startswith("skipped") and rc == 1


def test_unknown_sections_and_a_missing_gpu_are_refused(monkeypatch):
    with pytest.raises(SystemExit):
        gpu_check.main(["--sections", "decode,bogus"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit, match="--dry-run"):
        gpu_check.main([])
