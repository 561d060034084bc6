"""Cost of the code sandbox's isolation: the isolated path vs the unisolated one, in the same run.

For a trivial correct program (reads two numbers, prints the sum): latency of one run (p50/p99) and runs per second
at 1 and 8 concurrent runs, and the time to score a GRPO step's worth of answers (512, one test each, 8 at a time,
the way `CodeReward.__call__` fans them out). Modes are interleaved per measurement so load drift hits both.

    python tools/bench_sandbox.py [--runs 40] [--answers 512] [--parallel 8] [--phases 30] [--quick]

`--phases N` first prints where one isolated run's time goes (p50/min over N sequential runs, from the phase marks
of `_run_isolated(trace=...)` and the program's own first line); `--quick` is --runs 20 --answers 128.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_r1.rewards.sandbox import SandboxLimits, _run_isolated, run_python, sandbox_capabilities  # noqa: E402

PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
LIMITS = SandboxLimits(wall_seconds=60.0)
MODES = {"unisolated": "off", "isolated": "auto"}


def one(mode: str, k: int) -> float:
    start = time.perf_counter()
    r = run_python(PROGRAM, f"{k} 1", LIMITS, isolation=mode)
    elapsed = time.perf_counter() - start
    if r.returncode != 0 or r.stdout.strip() != str(k + 1):
        raise RuntimeError(f"{mode}: wrong result {r}")
    return elapsed


def latencies(mode: str, runs: int, concurrency: int) -> tuple[list[float], float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        lat = list(ex.map(lambda k: one(mode, k), range(runs)))
    return lat, runs / (time.perf_counter() - start)


# Phase marks of one isolated run in the order they happen (trainer, launcher, PID 1, program, trainer again).
PHASES = ("start", "staged", "cgroup-created", "launcher-started", "cgroup-joined", "unshared", "forked-pid1",
          "mounted", "pivoted", "exec", "program-first-line", "exited", "cgroup-emptied", "reaped", "collected",
          "cgroup-removed", "cleaned")


def phases(runs: int) -> None:
    """Per-phase time of sequential isolated runs (the program prints its first line's time)."""
    plan = sandbox_capabilities().plan
    if plan is None:
        print("phases: no isolation here")
        return
    program = "import time\nprint(time.monotonic())\n" + PROGRAM
    rows = []
    for k in range(runs + 2):
        trace: dict[str, float] = {}
        r = _run_isolated(plan, program, f"{k} 1", LIMITS, True, trace=trace)
        first, out = r.stdout.split()
        if out != str(k + 1):
            raise RuntimeError(f"phases: wrong result {r}")
        trace["program-first-line"] = float(first)
        rows.append(trace)
    rows = rows[2:]  # the first runs start the launcher server
    order = [n for n in PHASES if n in rows[0]]
    print(f"{'phase (isolated run)':<44}{'p50 ms':>9}{'min ms':>9}")
    for prev, name in zip(order, order[1:]):
        d = [(t[name] - t[prev]) * 1e3 for t in rows]
        print(f"{prev + ' -> ' + name:<44}{statistics.median(d):>9.2f}{min(d):>9.2f}")
    total = [(t[order[-1]] - t[order[0]]) * 1e3 for t in rows]
    print(f"{'total':<44}{statistics.median(total):>9.2f}{min(total):>9.2f}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40, help="runs per latency measurement")
    ap.add_argument("--answers", type=int, default=512, help="answers scored in the GRPO-step measurement")
    ap.add_argument("--parallel", type=int, default=8, help="concurrent runs (CodeReward max_parallel)")
    ap.add_argument("--phases", type=int, default=0, help="first print the phase breakdown over this many runs")
    ap.add_argument("--quick", action="store_true", help="--runs 20 --answers 128")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.answers = 20, 128
    caps = sandbox_capabilities()
    print(f"isolation: {caps.isolation}, cgroups: {caps.cgroups}, python: {caps.python}; "
          f"load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    if args.phases:
        phases(args.phases)
    for mode in MODES.values():
        latencies(mode, 4, 1)  # warm-up: capability probes, page cache
    rows = {}
    for concurrency in (1, args.parallel):
        for name, mode in MODES.items():
            lat, rate = latencies(mode, args.runs, concurrency)
            rows[(name, concurrency)] = (statistics.median(lat), pct(lat, 0.99), rate)
    step = {}
    for name, mode in MODES.items():
        _, rate = latencies(mode, args.answers, args.parallel)
        step[name] = args.answers / rate
    print(f"{'path':<12}{'concurrent':>11}{'p50 ms':>9}{'p99 ms':>9}{'runs/s':>9}")
    for (name, c), (p50, p99, rate) in rows.items():
        print(f"{name:<12}{c:>11}{p50 * 1e3:>9.1f}{p99 * 1e3:>9.1f}{rate:>9.1f}")
    for c in (1, args.parallel):
        ratio = rows[("isolated", c)][0] / rows[("unisolated", c)][0]
        print(f"isolated / unisolated p50 at {c} concurrent: {ratio:.2f}x")
    for name, seconds in step.items():
        print(f"score {args.answers} answers ({args.parallel} at a time), {name}: {seconds:.1f} s")
    print(f"isolated / unisolated for {args.answers} answers: {step['isolated'] / step['unisolated']:.2f}x; "
          f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
