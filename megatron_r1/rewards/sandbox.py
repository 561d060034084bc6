"""Run an untrusted Python program in a throwaway process with OS-enforced limits (for the `code` reward).

Layers, strongest first, each applied when the machine allows it (see `sandbox_capabilities()`):
- its own session/process group, killed as a whole (plus any straggler in the session) on timeout;
- rlimits: CPU seconds, address space, file size (caps stdout/stderr, which go to files), open files, no core;
- as root: a new network namespace (no interfaces but a down loopback) and an unprivileged uid (`nobody`), which
  also makes RLIMIT_NPROC effective against fork bombs (the kernel exempts root from it);
- a temporary working directory, deleted afterwards;
- an audit hook in the child refusing sockets, exec/subprocess, ctypes and writes outside its directory.

What it does not stop (by design or because the machine lacks the mechanism):
- reading files the sandbox uid may read (world-readable files such as /etc/passwd or the repo); there is no
  mount namespace or chroot;
- as `nobody`, writes to world-writable places (/tmp, /dev/shm) are blocked only by the audit hook, which a
  determined program can evade from C extensions already importable (ctypes itself is refused);
- when not root: no network namespace (sockets are then refused only by the audit hook), no uid drop, and
  RLIMIT_NPROC counts all of the user's processes (a fork bomb is still ended by the session kill);
- RLIMIT_NPROC is per uid, so concurrent sandboxes share `max_processes`;
- a child that calls setsid() leaves the session and survives the kill when no uid drop is possible (with the
  uid drop it is capped by RLIMIT_NPROC and CPU time); CPU/memory of the machine as a whole (no cgroup quota).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_BOOT = str(Path(__file__).with_name("_sandbox_boot.py"))
_CLONE_NEWNET = 0x40000000
# Loaded once in the parent: dlopen() inside the forked child could deadlock on a loader lock held by another thread.
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run; defaults suit competitive-programming style tests."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    max_processes: int = 64  # per sandbox uid, shared by concurrent runs
    output_bytes: int = 1 << 20
    open_files: int = 64


@dataclass
class SandboxResult:
    """What the program did: exit code (negative = killed by that signal), captured output, why it stopped."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float


@dataclass(frozen=True)
class Capabilities:
    """Which isolation layers work on this machine (logged once; listed in the docs of the `code` reward)."""

    is_root: bool
    network_namespace: bool
    drop_uid: int | None
    python: str


def _unshare_net() -> bool:
    return _LIBC.unshare(_CLONE_NEWNET) == 0


def _preexec(limits: SandboxLimits, netns: bool, uid: int | None):
    """Build the function run in the child between fork and exec.

    It runs in a copy of a possibly multi-threaded parent, so it only makes system calls (no imports, logging or
    allocation-heavy work that could wait on a lock another thread held at fork time).
    """

    def apply():
        os.setsid()
        if netns and not _unshare_net():
            os._exit(97)  # the probe said it works; failing now must not silently run with network
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        memory = limits.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return apply


def _probe_python(candidate: str, netns: bool, uid: int | None) -> bool:
    try:
        r = subprocess.run([candidate, "-I", "-c", "import json, math, collections"], preexec_fn=_preexec(
            SandboxLimits(), netns, uid), cwd="/", capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


@functools.lru_cache(maxsize=None)
def sandbox_capabilities(python: str | None = None) -> Capabilities:
    """Probe once which isolation layers this machine supports and which interpreter the sandbox uid can run."""
    is_root = os.geteuid() == 0
    netns = False
    if is_root:
        probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=lambda: os._exit(0 if _unshare_net() else 1),
                               capture_output=True)
        netns = probe.returncode == 0
    uid = None
    if is_root:
        try:
            uid = pwd.getpwnam("nobody").pw_uid
        except KeyError:
            uid = 65534
    # The sandbox uid may not be able to read our interpreter (e.g. a pyenv under a 0700 /root): find one it can.
    candidates = [python] if python else [sys.executable, shutil.which("python3") or "", "/usr/bin/python3"]
    for cand in [c for c in candidates if c]:
        if _probe_python(cand, netns, uid):
            chosen = cand
            break
    else:
        if uid is None:
            raise RuntimeError(f"sandbox: no usable Python interpreter among {candidates}")
        log.warning("sandbox: no interpreter readable by uid %d; running programs as root (fork bombs are then "
                    "limited only by the wall-time kill)", uid)
        uid, chosen = None, candidates[0]
    caps = Capabilities(is_root, netns, uid, chosen)
    log.info("sandbox capabilities: %s", caps)
    return caps


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the ")" of the command name: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def _kill_session(sid: int, patience: float = 5.0) -> None:
    """SIGKILL every process in session `sid` and wait until none is left alive.

    The process group kill alone misses children that changed group; repeating covers children forked while the
    first signals were in flight. Their zombies are reaped by init once their parent is gone.
    """
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        members = [p for p in _session_members(sid) if p != sid]
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    log.warning("sandbox: processes of session %d survived SIGKILL for %.0fs", sid, patience)


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               python: str | None = None, audit_hook: bool = True) -> SandboxResult:
    """Run `source` as a Python program in the sandbox with `stdin`; never raises for the program's behaviour.

    `audit_hook=False` leaves only the OS layers (tests use it to show those hold on their own).
    """
    caps = sandbox_capabilities(python)
    workdir = tempfile.mkdtemp(prefix="mr1-sandbox-")
    try:
        program = os.path.join(workdir, "program.py")
        Path(program).write_text(source, encoding="utf-8")
        Path(workdir, "stdin.txt").write_text(stdin, encoding="utf-8")
        # The boot script is copied in: the sandbox uid may not be able to read our install directory.
        boot = os.path.join(workdir, "_boot.py")
        shutil.copyfile(_BOOT, boot)
        if caps.drop_uid is not None:
            os.chown(workdir, caps.drop_uid, caps.drop_uid)
            os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": workdir,
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        timed_out = False
        # Output goes to files: RLIMIT_FSIZE then caps it in the kernel (a pipe would need us to police it).
        with open(os.path.join(workdir, "stdin.txt"), "rb") as fin, \
                open(os.path.join(workdir, "stdout.txt"), "wb") as fout, \
                open(os.path.join(workdir, "stderr.txt"), "wb") as ferr:
            argv = [caps.python, "-I", "-B"] + ([boot, program] if audit_hook else [program])
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr,
                                    cwd=workdir, env=env, close_fds=True,
                                    preexec_fn=_preexec(limits, caps.network_namespace, caps.drop_uid))
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_session(proc.pid)  # also reaps leftovers (e.g. forked children) of a program that exited
            proc.wait()
        elapsed = time.monotonic() - start

        def read(name: str) -> str:
            with open(os.path.join(workdir, name), "rb") as f:
                return f.read(limits.output_bytes).decode("utf-8", errors="replace")

        return SandboxResult(proc.returncode, read("stdout.txt"), read("stderr.txt"), timed_out, elapsed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
