"""One launcher for every multi-process test: spawns N gloo ranks on loopback and returns each rank's result.

Tests pass a module-level function `fn(rank, world_size, *args)`; its return value (anything picklable) comes
back in rank order. An exception in any rank fails the test with that rank's traceback, a rank that does not
answer within `timeout` fails it with a timeout.

No process of a run outlives the call (success, failure or timeout): ranks die with this process if it is killed
(PR_SET_PDEATHSIG), and `reaped()` ends every process that became a descendant of this one during the call, a rank's
leftovers included (a verifier pool, a server, a checkpoint writer, a setsid'd or double-forked stray), instead of
leaving them under pid 1 holding their memory for the rest of the suite. Tests that run the CLI in a subprocess
(the kill/resume tests) use `reaped()` too.
"""
import contextlib
import ctypes
import io
import multiprocessing
import os
import queue as queue_module
import signal
import socket
import time
import traceback
from multiprocessing import resource_tracker

import psutil
import torch.multiprocessing as mp

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 1, 36, 37
_LIBC = ctypes.CDLL(None, use_errno=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue, init_pg):
    # Die with the test process even when it is killed outright (CI's timeout, a SIGKILLed pytest): nothing
    # would run its cleanup then. The check after closes the race with a parent that died before the prctl.
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != multiprocessing.parent_process().pid:
        os._exit(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # By value: torch's queue pickling would share tensors through file descriptors that die with this
        # process, so a parent reading after the child exited gets "connection reset".
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # report every failure, including SystemExit, to the parent test
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass


def run_distributed(fn, world_size: int, *args, init_process_group: bool = True, timeout: float = 600.0):
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; return results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    results, errors = {}, []
    with reaped():
        procs = [
            ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, init_process_group))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + timeout
            while len(results) < world_size:
                try:
                    rank, ok, payload = queue.get(timeout=1.0)
                except queue_module.Empty:
                    missing = sorted(set(range(world_size)) - set(results))
                    # A rank that died before reporting (killed, or its test module failed to import) fails the
                    # call now instead of after `timeout`; a rank that reported and exited is in the queue already.
                    dead = [r for r in missing if procs[r].exitcode is not None]
                    if dead and queue.empty():
                        errors.append(f"ranks {dead} exited (codes {[procs[r].exitcode for r in dead]}) without a "
                                      "result; their stderr is above")
                        break
                    if time.monotonic() > deadline:
                        errors.append(f"ranks {missing} gave no result within {timeout:.0f} s")
                        break
                    continue
                if ok:
                    import torch

                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
                    break
        finally:
            # Ranks that answered exit by themselves; after a failure or a timeout the others are stopped.
            _wait_exit(procs, 5 if errors else 60)
            for p in procs:
                if p.exitcode is None:
                    p.terminate()
            _wait_exit(procs, 5)
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _wait_exit(procs, seconds: float) -> None:
    """Wait for the ranks to exit by polling their pids: `Process.join` waits on a pipe that a process forked by
    the rank (a checkpoint writer, a double-forked stray) inherits and holds open after the rank itself exited."""
    deadline = time.monotonic() + seconds
    while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def reaped(grace: float = 5.0):
    """Every process that becomes a descendant of this one inside the block is gone when it ends: SIGTERM, then
    SIGKILL after `grace` seconds, and reaped. This process is a child subreaper meanwhile, so what a child leaves
    behind (an orphan, a setsid'd or double-forked process) is re-parented here instead of to pid 1 and is found.
    Processes that were already there (a fixture's server, the multiprocessing resource tracker) are left alone."""
    resource_tracker.ensure_running()  # this process's own helper, started once, before the snapshot
    keep = {p.pid for p in _descendants()} | {os.getpid(), resource_tracker._resource_tracker._pid}
    was = ctypes.c_int(0)
    _LIBC.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        try:
            _end_descendants(keep, grace)
        finally:
            _LIBC.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


def _end_descendants(keep: set, grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 30.0)
        signalled = False
        while True:
            _reap_children(keep)
            # Re-listed each round: a process killed mid-fork, or an orphan re-parented here, shows up late.
            left = [p for p in _descendants() if p.pid not in keep and _running(p)]
            if not left:
                return
            if not signalled or sig == signal.SIGKILL:
                for p in left:
                    with contextlib.suppress(psutil.Error):
                        p.send_signal(sig)
                signalled = True
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    raise AssertionError(f"processes outlived SIGKILL: {[p.pid for p in left]}")


def _reap_children(keep: set) -> None:
    """Collect the exit status of this process's own dead children (zombies) that it did not have before."""
    for p in psutil.Process().children():
        if p.pid in keep:
            continue
        with contextlib.suppress(ChildProcessError, psutil.Error):
            if p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
