"""One launcher for every multi-process test: spawns N gloo ranks on loopback and returns each rank's result.

Tests pass a module-level function `fn(rank, world_size, *args)`; its return value (anything picklable) comes
back in rank order. An exception in any rank fails the test with that rank's traceback, a rank that does not
answer within `timeout` fails it with a timeout.

Each rank leads its own process group, and every group is killed when the call returns (success, failure or
timeout): whatever a rank started (a verifier pool, a server, a stray subprocess) dies with it instead of living on
under pid 1 and holding its memory for the rest of the suite.
"""
import io
import os
import queue as queue_module
import signal
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue, init_pg):
    os.setpgid(0, 0)  # this rank and everything it starts share one group the parent can kill at the end
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
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, init_process_group))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except queue_module.Empty:
                missing = sorted(set(range(world_size)) - set(results))
                errors.append(f"ranks {missing} gave no result within {timeout:.0f} s")
                break
            if ok:
                import torch

                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
        for p in procs:
            _kill_group(p.pid)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group a rank led. The group outlives its leader while any member does, so this reaches a
    rank's leftovers after the rank itself exited; a group that is already empty is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
