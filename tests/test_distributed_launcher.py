"""No process of a run survives it: the shared launcher (`run_distributed`) and `reaped()` (around the CLI
subprocesses of the kill/resume tests) end every process started under them, whether the run succeeds, fails,
times out or is killed; a plain child, a setsid'd one and a double-forked orphan alike."""
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.distributed import reaped, run_distributed

# Source, not an import: the CLI-like subprocess below runs it without importing torch (seconds under load).
STRAYS = textwrap.dedent("""
    import os, subprocess, sys, time

    SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]

    def start_strays(prefix):
        # A plain child, one in a session of its own, a double-forked orphan: none waited for; pids to files.
        for name, own_session in (("plain", False), ("session", True)):
            pid = subprocess.Popen(SLEEPER, start_new_session=own_session).pid
            with open(prefix + "." + name, "w") as f:
                f.write(str(pid))
        if os.fork() == 0:
            if os.fork() == 0:
                os.setsid()
                with open(prefix + ".orphan.tmp", "w") as f:
                    f.write(str(os.getpid()))
                os.rename(prefix + ".orphan.tmp", prefix + ".orphan")
                time.sleep(600)
            os._exit(0)
        os.wait()
        deadline = time.monotonic() + 30
        while not os.path.exists(prefix + ".orphan"):
            assert time.monotonic() < deadline, "the double-forked child never started"
            time.sleep(0.02)
""")
REPO = Path(__file__).resolve().parents[1]
_namespace: dict = {}
exec(STRAYS, _namespace)
_start_strays = _namespace["start_strays"]
SLEEPER = _namespace["SLEEPER"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed process is a zombie until its parent (or init) collects it; a zombie is dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _leave_strays(rank, world_size, pid_prefix, mode):
    """Record this rank's pid, start strays, then return / fail / hang as `mode` says."""
    with open(f"{pid_prefix}.{rank}.rank", "w") as f:
        f.write(str(os.getpid()))
    _start_strays(f"{pid_prefix}.{rank}")
    if mode == "fail" and rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    if mode == "dies" and rank == 1:
        os._exit(3)  # no traceback, no result: killed, or its test module failed to import
    if mode == "hang":
        time.sleep(600)
    return os.getpid()


def _pids(directory) -> list[int]:
    return [int(p.read_text()) for p in directory.iterdir() if p.read_text().strip()]


def _wait_dead(pids, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ok", "fail", "dies", "hang"])
def test_no_process_of_a_launched_run_survives(tmp_path, mode):
    if mode == "ok":
        run_distributed(_leave_strays, 2, str(tmp_path / "pid"), mode, init_process_group=False)
    else:
        expected = {"fail": "fails on purpose", "dies": r"ranks \[1\] exited \(codes \[3\]\) without a result",
                    "hang": "within 45 s"}[mode]
        # Long enough for two ranks to import torch on a loaded 2-core machine; `dies` must not wait for it.
        timeout = 45.0 if mode == "hang" else 300.0
        started = time.monotonic()
        with pytest.raises(AssertionError, match=expected):
            run_distributed(_leave_strays, 2, str(tmp_path / "pid"), mode, init_process_group=False, timeout=timeout)
        if mode == "dies":  # noticed when it happens, not after the timeout
            assert time.monotonic() - started < 120.0
    pids = _pids(tmp_path)
    assert len(pids) >= 4, "the ranks never started their strays"
    # Gone when the call returns, not eventually: a second of grace for the kernel to deliver the last SIGKILL.
    assert _wait_dead(pids, seconds=1.0) == [], f"processes of the run outlived run_distributed ({mode})"


@pytest.mark.slow
def test_ranks_die_with_a_killed_test_process(tmp_path):
    """The test process itself SIGKILLed mid-run (CI's timeout): its ranks and their strays do not live on."""
    driver = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.distributed import run_distributed
        from tests.test_distributed_launcher import _leave_strays
        run_distributed(_leave_strays, 2, {str(tmp_path / "pid")!r}, "hang", init_process_group=False)
    """)
    with reaped():  # the ranks' strays are re-parented to the killed driver's ancestors: this test cleans up
        proc = subprocess.Popen([sys.executable, "-c", driver], start_new_session=True)
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("pid.*.orphan"))) < 2:  # the last file each rank writes
            assert proc.poll() is None and time.monotonic() < deadline, "the driver never started its ranks"
            time.sleep(0.1)
        ranks = [int(p.read_text()) for p in tmp_path.glob("pid.*.rank")]
        proc.kill()
        proc.wait()
        assert ranks and _wait_dead(ranks) == [], "ranks outlived the process that launched them"


@pytest.mark.parametrize("outcome", ["exits", "killed", pytest.param("times out", marks=pytest.mark.slow)])
def test_reaped_ends_what_a_cli_subprocess_left(tmp_path, outcome):
    """The kill/resume tests' pattern: a subprocess in its own session whose helpers outlive it."""
    program = STRAYS + textwrap.dedent(f"""
        import signal
        start_strays({str(tmp_path / "pid")!r})
        if {outcome!r} == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        if {outcome!r} == "times out":
            time.sleep(600)
    """)
    before = subprocess.Popen(SLEEPER)  # already running when the block starts: not the block's to end
    try:
        with reaped():
            proc = subprocess.Popen([sys.executable, "-c", program], start_new_session=True)
            with pytest.raises(subprocess.TimeoutExpired) if outcome == "times out" else contextlib.nullcontext():
                rc = proc.wait(timeout=5 if outcome == "times out" else 120)
                assert rc == (-signal.SIGKILL if outcome == "killed" else 0)
        pids = _pids(tmp_path)
        assert len(pids) == 3, "the subprocess never started its strays"
        assert _wait_dead(pids + [proc.pid], seconds=1.0) == [], f"processes outlived reaped() ({outcome})"
        assert before.poll() is None, "reaped() ended a process that predates it"
    finally:
        before.kill()
        before.wait()
