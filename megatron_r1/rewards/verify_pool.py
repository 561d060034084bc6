"""A lazily started, reusable pool of math-verify worker processes with a hard per-sample time limit."""
from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_WORKER = str(Path(__file__).with_name("_verify_worker.py"))


@dataclass
class Verdict:
    """One comparison's outcome; `timed_out` and `error` are counted by the caller."""

    ok: bool
    timed_out: bool = False
    error: str | None = None


class _Worker:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # Plain subprocess (fork+exec): safe from threaded/distributed parents, no multiprocessing bootstrap.
        self.proc = subprocess.Popen(
            [sys.executable, "-u", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1, env=env, close_fds=True,
        )
        self.ready = False
        self.pending: tuple[int, float] | None = None  # (request index, deadline)

    def send(self, idx: int, pred: str, gold: str, limit: float) -> None:
        self.proc.stdin.write(json.dumps({"id": idx, "pred": pred, "gold": gold, "timeout": limit}) + "\n")
        self.proc.stdin.flush()
        self.pending = (idx, time.monotonic() + limit + 1.0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class VerifyPool:
    """Compares (prediction, gold) pairs with math-verify in `num_workers` worker processes.

    Workers start on first use and are reused across batches; a worker that exceeds `timeout` on a sample is
    killed and replaced, and that sample scores as a timeout. `close()` stops all workers (also run at exit).
    """

    def __init__(self, num_workers: int = 2, timeout: float = 5.0, startup_timeout: float = 60.0):
        self.num_workers = max(1, num_workers)
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self._workers: list[_Worker] = []
        ref = weakref.ref(self)
        atexit.register(lambda: ref() and ref().close())

    def _ensure_started(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker())

    def _read_line(self, w: _Worker, deadline: float) -> str | None:
        sel = selectors.DefaultSelector()
        sel.register(w.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                return None
            return w.proc.stdout.readline() or None
        finally:
            sel.close()

    def _wait_ready(self, w: _Worker) -> bool:
        if not w.ready:
            line = self._read_line(w, time.monotonic() + self.startup_timeout)
            w.ready = bool(line and json.loads(line).get("ready"))
        return w.ready

    def verify_many(self, pairs: list[tuple[str, str]]) -> list[Verdict]:
        """Verdicts for `(prediction, gold)` pairs, in order; never raises for a bad or slow pair."""
        results: list[Verdict | None] = [None] * len(pairs)
        if not pairs:
            return []
        self._ensure_started()
        todo = list(range(len(pairs)))[::-1]
        for i, w in enumerate(self._workers):
            if not self._wait_ready(w):
                log.warning("math-verify worker failed to start; restarting it")
                w.kill()
                self._workers[i] = _Worker()
        # Lines are one per reply and the worker flushes after each, so readline() after select never blocks long.
        sel = selectors.DefaultSelector()
        busy: dict[int, _Worker] = {}
        try:
            while todo or busy:
                for w in self._workers:
                    if w.pending is None and todo and w.ready:
                        idx = todo.pop()
                        w.send(idx, pairs[idx][0], pairs[idx][1], self.timeout)
                        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
                        busy[id(w)] = w
                if not busy:
                    # No worker could take work (all failed to start): score the rest as errors.
                    for idx in todo:
                        results[idx] = Verdict(False, error="no math-verify worker available")
                    break
                next_deadline = min(w.pending[1] for w in busy.values())
                for key, _ in sel.select(max(0.0, next_deadline - time.monotonic())):
                    w = key.data
                    line = w.proc.stdout.readline()
                    idx = w.pending[0]
                    sel.unregister(w.proc.stdout)
                    del busy[id(w)]
                    w.pending = None
                    if not line:  # worker died (e.g. out of memory): replace it, count an error
                        results[idx] = Verdict(False, error="math-verify worker exited")
                        self._replace(w)
                        continue
                    reply = json.loads(line)
                    results[idx] = Verdict(bool(reply["ok"]), bool(reply.get("timed_out")), reply.get("error"))
                now = time.monotonic()
                for w in [w for w in busy.values() if w.pending[1] <= now]:
                    results[w.pending[0]] = Verdict(False, timed_out=True)
                    sel.unregister(w.proc.stdout)
                    del busy[id(w)]
                    self._replace(w)
        finally:
            sel.close()
        return results  # type: ignore[return-value]

    def _replace(self, w: _Worker) -> None:
        w.kill()
        new = _Worker()
        self._workers[self._workers.index(w)] = new
        if not self._wait_ready(new):
            log.warning("replacement math-verify worker failed to start")

    def close(self) -> None:
        """Stop all workers; the pool restarts them lazily if used again."""
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
