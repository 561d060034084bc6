"""tools/bench_generation.py --workload r1 at a tiny scale: the paged and contiguous sides do the same work (every
request completed, the same token counts) and paged runs at least as many requests at once in the same bytes."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import bench_generation  # noqa: E402


@pytest.mark.parametrize("preset", ["llama_tiny", pytest.param("deepseek_v3_tiny", marks=pytest.mark.slow)])
def test_r1_workload_quick(preset, capsys):
    res = bench_generation.main(["--workload", "r1", "--quick", "--preset", preset, "--threads", "1"])
    c, p = res["contiguous"], res["paged"]
    for side in (c, p):
        assert side["completed"] == side["requests"] == 16
        assert side["tokens"] == sum(side["tokens_each"]) > 0
        assert side["cache_bytes"] <= res["budget_bytes"]
        assert side["tok_s"] > 0
    assert c["tokens_each"] == p["tokens_each"]  # forced lengths: the same work on both sides
    assert c["running_peak"] == 2  # the budget is two full-context rows
    assert p["running_peak"] >= c["running_peak"]
    assert res["concurrency_ratio"] == p["running_peak"] / c["running_peak"]
    out = capsys.readouterr().out
    assert "paged / contiguous: concurrency" in out
