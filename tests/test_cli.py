"""The console script: help, unknown commands, and one-line errors with a non-zero exit (no traceback wall)."""
import subprocess
import sys

import pytest


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "megatron_r1", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "train", "eval", "serve", "plot", "convert", "plan", "pipeline"):
        assert cmd in r.stdout


@pytest.mark.slow
def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


@pytest.mark.slow
def test_bad_config_is_one_clear_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: deepseek_v3_tiny\nparallel:\n  tensor_model_parallel_size: 3\n")
    r = run("train", str(p))
    assert r.returncode == 2
    assert "tensor_model_parallel_size: 3 does not divide model.num_attention_heads" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_missing_config_file():
    r = run("train", "/nonexistent.yaml")
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr
