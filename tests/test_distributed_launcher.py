"""The shared multi-process launcher leaves no process behind: a rank's children die with the call, whether the
ranks succeed, fail or time out."""
import os
import subprocess
import sys
import time

import pytest

from tests.distributed import run_distributed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of an exited rank is reparented and reaped by init; until then it is a zombie, which is dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _leave_child(rank, world_size, pid_file, mode):
    """Start a long-lived grandchild (not waited for), record its pid, then return / fail / hang as `mode` says."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(f"{pid_file}.{rank}", "w") as f:
        f.write(str(child.pid))
    if mode == "fail" and rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    if mode == "hang":
        time.sleep(600)
    return rank


def _pids(tmp_path, world_size):
    return [int((tmp_path / f"pid.{r}").read_text()) for r in range(world_size) if (tmp_path / f"pid.{r}").exists()]


def _wait_dead(pids, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("mode", ["ok", "fail", "hang"])
def test_no_process_survives_the_launcher(tmp_path, mode):
    pid_file = str(tmp_path / "pid")
    if mode == "ok":
        assert run_distributed(_leave_child, 2, pid_file, mode, init_process_group=False) == [0, 1]
    else:
        with pytest.raises(AssertionError, match="fails on purpose" if mode == "fail" else "within 20 s"):
            run_distributed(_leave_child, 2, pid_file, mode, init_process_group=False, timeout=20.0)
    pids = _pids(tmp_path, 2)
    assert pids, "the ranks never started their children"
    assert _wait_dead(pids) == [], f"children of the ranks outlived run_distributed ({mode})"
