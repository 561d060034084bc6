"""Run an untrusted Python program in a throwaway, isolated process tree with per-run quotas (the `code` reward).

A policy under RL searches for whatever raises its reward, including reading the expected outputs, so a run must
see nothing but the program, its stdin, the files its task ships and the Python installation. The layers of an
isolated run (mechanism chosen by `sandbox_capabilities()`, built by `_sandbox_init.py`; docs/sandbox.md):
- its own filesystem view (mount namespace + pivot_root): read-only system libraries and Python installation, a
  private writable /work, empty private /tmp and /dev/shm (tmpfs, gone with the run), a /proc of its own;
- a PID namespace: when the program (PID 1 there) exits or is killed, the kernel kills every process it left,
  including setsid'd and double-forked ones;
- per-run cgroups: memory (all processes together), process count and a CPU bandwidth cap, plus the run's total
  CPU seconds enforced here; removed after the run;
- a network namespace (no interfaces but a down loopback), IPC and UTS namespaces;
- as root, a uid of its own per run (so RLIMIT_NPROC is per run too) and no_new_privs;
- defence in depth kept from before: rlimits (CPU seconds, address space, file size, open files, no core) and an
  audit hook refusing sockets, exec/subprocess, ctypes and writes outside the working directory.

Where no isolation mechanism works, `run_python` refuses (`SandboxUnavailable`) unless `allow_unisolated=True`;
the unisolated path keeps the layers above that need no namespace (rlimits, session kill, audit hook, and as root
a network namespace and a uid of its own per run, whose processes are all killed afterwards), and then a program
can read any world-readable file.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import marshal
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_r1.rewards.cgroups import CgroupRoot, RunCgroup, find_cgroup_root
from megatron_r1.rewards.isolation import WORKDIR, FilesystemView, filesystem_view, site_boot_args

log = logging.getLogger(__name__)

_BOOT = str(Path(__file__).with_name("_sandbox_boot.py"))
_INIT = str(Path(__file__).with_name("_sandbox_init.py"))
_CLONE_NEWNET = 0x40000000
# Loaded once in the parent: dlopen() inside the forked child could deadlock on a loader lock held by another thread.
_LIBC = ctypes.CDLL(None, use_errno=True)
# Memory of a run's cgroup beyond `memory_mb`: the launcher's own interpreter, which waits outside the namespace.
_LAUNCHER_MB = 32
# Per-run uids (root only): far above regular users and the usual subuid ranges; pid bits keep trainers apart.
_UID_BASE = 2_000_000_000
_uid_counter = itertools.count()
# Not `nobody`: under a user namespace every unmapped host process shows as the overflow uid 65534, so a shared
# `nobody` has a RLIMIT_NPROC budget that other machines' processes can exhaust (a CI runner did: fork -> EAGAIN).
_PROBE_UID = _UID_BASE + 0xFFFF  # never handed to a run: the pid bits stop at 0x3FFF << 16, the counter at 0xFFFF


def _new_run_uid() -> int:
    """A uid no other run of any trainer on this machine holds now (root only)."""
    return _UID_BASE + ((os.getpid() & 0x3FFF) << 16) + (next(_uid_counter) % 0xFFFF)


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism works on this machine and the caller did not accept running without one."""


class SandboxSetupError(RuntimeError):
    """The launcher failed to build a run's isolation (reported on a pipe the program cannot write to)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run; defaults suit competitive-programming style tests."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5  # per process (RLIMIT_CPU) and, with a cgroup, for all the run's processes together
    memory_mb: int = 512  # per process (RLIMIT_AS) and, with a cgroup, for all of them (tmpfs files included)
    max_processes: int = 64  # per run with a pids cgroup or a per-run uid; per uid on the unisolated path
    output_bytes: int = 1 << 20
    open_files: int = 64
    cpu_cores: float = 1.0  # CPU bandwidth of a run (cgroup cpu quota)
    scratch_mb: int = 64  # size of each of the run's /work, /tmp and /dev/shm


@dataclass
class SandboxResult:
    """What the program did: exit code (negative = killed by that signal), captured output, why it stopped."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool  # the wall time or the run's total CPU time ran out
    wall_seconds: float
    oom_killed: bool = False  # the run's memory cgroup hit its limit and the kernel killed a process
    isolated: bool = False


@dataclass(frozen=True)
class _Plan:
    """How isolated runs are built on this machine (found once by `sandbox_capabilities`)."""

    mechanism: str
    python: str
    view: FilesystemView
    cgroups: CgroupRoot | None
    site_args: tuple[str, ...] = ()  # what `site` would do, as boot.py options (runs start with -S)


@dataclass(frozen=True)
class Capabilities:
    """Which isolation this machine gives a run (logged once; docs/sandbox.md lists what each guarantees)."""

    isolation: str | None  # "namespaces" (root) | "user-namespaces" | None: nothing works
    cgroups: str | None  # "v1" | "v2": per-run memory/process/CPU quotas; None: per-process rlimits only
    python: str  # the interpreter of isolated runs
    missing: tuple[str, ...] = ()  # what is unavailable, and why
    plan: _Plan | None = field(default=None, repr=False)


@dataclass(frozen=True)
class UnisolatedCapabilities:
    """Layers of the unisolated path (used only with `allow_unisolated` or `isolation="off"`)."""

    is_root: bool
    network_namespace: bool
    per_run_uid: bool  # as root: each run gets a fresh uid (its own RLIMIT_NPROC budget), swept after the run
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
def unisolated_capabilities(python: str | None = None) -> UnisolatedCapabilities:
    """Probe once what the unisolated path can use: network namespace, uid drop, an interpreter that uid can run."""
    is_root = os.geteuid() == 0
    netns = False
    if is_root:
        probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=lambda: os._exit(0 if _unshare_net() else 1),
                               capture_output=True)
        netns = probe.returncode == 0
    uid = _PROBE_UID if is_root else None
    # A fresh uid may not be able to read our interpreter (e.g. a pyenv under a 0700 /root): find one it can.
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
    caps = UnisolatedCapabilities(is_root, netns, uid is not None, chosen)
    log.info("unisolated sandbox layers: %s", caps)
    return caps


def _live_processes(proc_file: str, match: Callable[[str], bool]) -> list[int]:
    """The pids whose /proc/<pid>/<proc_file> text satisfies `match` (processes that vanish meanwhile are skipped)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/{proc_file}").read_text()
        except OSError:
            continue
        if match(text):
            pids.append(int(entry))
    return pids


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`, from /proc."""

    def member(stat: str) -> bool:
        # Fields after the ")" of the command name: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2:].split()
        return len(fields) > 3 and fields[0] != "Z" and int(fields[3]) == sid

    return _live_processes("stat", member)


def _uid_members(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`, from /proc."""

    def member(status: str) -> bool:
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return int(fields.get("Uid", "-1 ").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z")

    return _live_processes("status", member)


def _kill_uid(uid: int, patience: float = 5.0) -> None:
    """SIGKILL every process of a run's own uid, from a child that takes that uid (kill(-1) then reaches exactly
    them), until none is left: the unisolated path has no PID namespace to do it."""
    deadline = time.monotonic() + patience
    while _uid_members(uid):
        if time.monotonic() > deadline:
            log.warning("sandbox: processes of uid %d survived SIGKILL for %.0fs", uid, patience)
            return
        pid = os.fork()
        if pid == 0:  # only system calls between fork and _exit (the parent may be multi-threaded)
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)  # every process this uid may signal, i.e. its own; never us
            except OSError:
                pass
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.01)


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



_PROBE = "import json, math, collections, sys\nprint(sum(map(int, sys.stdin.read().split())))\n"


@functools.lru_cache(maxsize=None)
def sandbox_capabilities(python: str | None = None) -> Capabilities:
    """Find the strongest isolation that works here by running a probe program through each, strongest first."""
    interpreter = python or sys.executable
    missing: list[str] = []
    try:
        view = filesystem_view(interpreter)
        site = site_boot_args(interpreter)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return Capabilities(None, None, interpreter, (f"interpreter {interpreter}: {e}",))
    cg_root, cg_reason = find_cgroup_root()
    if cg_root is None:
        missing.append(cg_reason)
    mechanisms = (["namespaces"] if os.geteuid() == 0 else []) + ["user-namespaces"]
    for mechanism in mechanisms:
        for cgroups in ([cg_root, None] if cg_root is not None else [None]):
            plan = _Plan(mechanism, interpreter, view, cgroups, site)
            try:
                r = _run_isolated(plan, _PROBE, "2 3", SandboxLimits(wall_seconds=30), audit_hook=True)
            except (SandboxSetupError, OSError) as e:
                missing.append(f"{mechanism}{'' if cgroups else ' without cgroups'}: {e}")
                continue
            if r.returncode == 0 and r.stdout.strip() == "5":
                if cgroups is None and cg_root is not None:
                    missing.append("cgroups: creating a run's cgroup failed (see above)")
                caps = Capabilities(mechanism, f"v{cgroups.version}" if cgroups else None, interpreter,
                                    tuple(missing), plan)
                log.info("sandbox capabilities: %s", caps)
                if caps.cgroups is None:
                    log.warning("sandbox: no per-run cgroup (%s): memory and CPU quotas are per process, the "
                                "process quota per uid", cg_reason)
                return caps
            missing.append(f"{mechanism}: probe program failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    if os.geteuid() != 0:
        missing.append("not root, and user namespaces are unavailable (kernel.unprivileged_userns_clone=0, "
                       "user.max_user_namespaces=0 or a seccomp filter)")
    return Capabilities(None, None, interpreter, tuple(missing))


def unisolated_refusal(caps: Capabilities) -> str:
    """The one message that says what is missing and how to opt in."""
    return ("sandbox: no isolation mechanism works on this machine (" + "; ".join(caps.missing) + "). Untrusted "
            "programs would run with rlimits and an audit hook only and could read any world-readable file (e.g. "
            "the expected outputs). Set rewards[].options.allow_unisolated=true to accept that.")


@functools.lru_cache(maxsize=None)
def _warn_unisolated(message: str) -> None:
    log.warning("%s Running unisolated because allow_unisolated is set.", message)


def run_python(source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(),
               python: str | None = None, audit_hook: bool = True, files: dict | None = None,
               allow_unisolated: bool = False, isolation: str = "auto") -> SandboxResult:
    """Run `source` as a Python program in the sandbox with `stdin`; never raises for the program's behaviour.

    `files` ({name: str | bytes}) are placed next to the program in its working directory. `isolation="auto"`
    uses the strongest mechanism found and raises `SandboxUnavailable` when there is none, unless
    `allow_unisolated`; `"off"` runs the unisolated path (benchmarks compare the two). `audit_hook=False` leaves
    only the OS layers (tests use it to show those hold on their own).
    """
    _check_files(files)
    if isolation not in ("auto", "off"):
        raise ValueError(f"isolation must be 'auto' or 'off', got {isolation!r}")
    if isolation == "auto":
        caps = sandbox_capabilities(python)
        if caps.plan is not None:
            return _run_isolated(caps.plan, source, stdin, limits, audit_hook, files)
        message = unisolated_refusal(caps)
        if not allow_unisolated:
            raise SandboxUnavailable(message)
        _warn_unisolated(message)
    return _run_unisolated(source, stdin, limits, python, audit_hook, files)


def _check_files(files: dict | None) -> None:
    for name in files or {}:
        if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name == "program.py":
            raise ValueError(f"sandbox: task file name {name!r} must be a plain name (not program.py)")


def _write_files(directory: str, source: str, files: dict | None) -> None:
    Path(directory, "program.py").write_text(source, encoding="utf-8")
    for name, content in (files or {}).items():
        data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
        Path(directory, name).write_bytes(data)


def _wait(proc: subprocess.Popen, limits: SandboxLimits, cgroup: RunCgroup | None) -> bool:
    """Wait for `proc` to exit; True when the wall time or the run's total CPU time ran out first.

    A pidfd wakes us the moment the process exits (Popen.wait(timeout) polls with sleeps of up to 50 ms).
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            return _wait_readable(fd, limits, cgroup)
        finally:
            os.close(fd)
    deadline = time.monotonic() + limits.wall_seconds
    while time.monotonic() < deadline:
        try:
            proc.wait(timeout=deadline - time.monotonic())
            return False
        except subprocess.TimeoutExpired:
            pass
    return True


def _wait_readable(fd: int, limits: SandboxLimits, cgroup: RunCgroup | None) -> bool:
    """Wait until `fd` is readable (a pidfd: the process exited; a launcher's socket: the run ended); True when the
    wall time or, with a cgroup, the run's total CPU time (checked every 100 ms) ran out first."""
    deadline = time.monotonic() + limits.wall_seconds
    check_cpu = cgroup is not None and cgroup.cpu_seconds() is not None
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        if poller.poll((min(remaining, 0.1) if check_cpu else remaining) * 1000):
            return False
        if check_cpu and (cgroup.cpu_seconds() or 0.0) > limits.cpu_seconds:  # type: ignore[union-attr]
            return True


class _Launcher:
    """The warm launcher of isolated runs (`_sandbox_init.serve`), one per trainer process, started on first use.

    It forks a fresh launcher per run, which joins the run's cgroups and unshares fresh namespaces itself, so a run
    costs a fork instead of an interpreter start and its imports. Requests go over a SOCK_SEQPACKET socket (one
    message each, the run's descriptors attached); each run answers on a socket of its own.
    """

    _lock = threading.Lock()
    _current: _Launcher | None = None

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", _INIT, str(theirs.fileno())], cwd="/",
                                         env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, close_fds=True, pass_fds=(theirs.fileno(),),
                                         start_new_session=True)
        self.control = ours
        self.owner = os.getpid()

    @classmethod
    def start_run(cls, spec: dict, fds: list[int]) -> socket.socket:
        """Hand one run to the launcher (restarted once if it died, or if this process is a fork of its owner)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            for attempt in (0, 1):
                with cls._lock:
                    if cls._current is None or cls._current.owner != os.getpid() or attempt:
                        if cls._current is not None and cls._current.owner == os.getpid():
                            cls._current.control.close()  # a server that is still there exits on EOF
                        cls._current = _Launcher()
                    control = cls._current.control
                    try:
                        socket.send_fds(control, [marshal.dumps(spec)], fds + [theirs.fileno()])
                        return ours
                    except OSError:
                        if attempt:
                            ours.close()
                            raise
        raise AssertionError("unreachable")


def _read_output(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _run_isolated(plan: _Plan, source: str, stdin: str, limits: SandboxLimits, audit_hook: bool,
                  files: dict | None = None, trace: dict[str, float] | None = None) -> SandboxResult:
    """One isolated run; `trace`, when given, receives {phase: monotonic time it ended} (bench_sandbox --phases)."""
    def mark(name: str) -> None:
        if trace is not None:
            trace[name] = time.monotonic()

    mark("start")
    staging = tempfile.mkdtemp(prefix="mr1-sandbox-")  # 0700, root's: the program never sees it
    cgroup = None
    trace_r, trace_w = os.pipe() if trace is not None else (-1, -1)
    try:
        work = os.path.join(staging, "work")
        os.mkdir(work)
        os.mkdir(os.path.join(staging, "root"))
        _write_files(work, source, files)
        Path(staging, "stdin.txt").write_text(stdin, encoding="utf-8")
        as_root = plan.mechanism == "namespaces"
        uid = _new_run_uid() if as_root else 0
        mark("staged")
        if plan.cgroups is not None:
            cgroup = RunCgroup(plan.cgroups, os.path.basename(staging), (limits.memory_mb + _LAUNCHER_MB) << 20,
                               limits.max_processes + 1, limits.cpu_cores)
        memory = limits.memory_mb << 20
        rlimits = {"RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1), "RLIMIT_AS": (memory, memory),
                   "RLIMIT_FSIZE": (limits.output_bytes, limits.output_bytes),
                   "RLIMIT_NOFILE": (limits.open_files, limits.open_files), "RLIMIT_CORE": (0, 0)}
        if as_root or cgroup is None:  # per-run uid: a per-run quota; otherwise the pids cgroup is the quota
            rlimits["RLIMIT_NPROC"] = (limits.max_processes, limits.max_processes)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": WORKDIR,
               "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        # -S: `site` (the venv's .pth imports) is most of a venv interpreter's start-up; boot.py sets the prefix and
        # sys.path that `site` would and defines exit()/quit().
        argv = [plan.python, "-I", "-S", "-B", "/.sandbox/boot.py"] + ([] if audit_hook else ["--no-audit-hook"])
        argv += list(plan.site_args) + ["program.py"]
        status_r, status_w = os.pipe()
        spec = {"root": os.path.join(staging, "root"), "work_src": work, "workdir": WORKDIR, "boot": _BOOT,
                "binds": plan.view.binds, "symlinks": plan.view.symlinks, "uid": uid, "gid": uid,
                "drop_uid": as_root, "user_namespace": plan.mechanism == "user-namespaces",
                "proc_optional": not as_root, "scratch_mb": limits.scratch_mb,
                "cgroup_procs": cgroup.procs_files if cgroup else [], "rlimits": rlimits, "argv": argv, "env": env}
        mark("cgroup-created")
        start = time.monotonic()
        conn = None
        try:
            with open(os.path.join(staging, "stdin.txt"), "rb") as fin, \
                    open(os.path.join(staging, "stdout.txt"), "wb") as fout, \
                    open(os.path.join(staging, "stderr.txt"), "wb") as ferr:
                fds = [fin.fileno(), fout.fileno(), ferr.fileno(), status_w] + ([trace_w] if trace is not None else [])
                conn = _Launcher.start_run(spec, fds)
            mark("spawned")
            os.close(status_w)
            status_w = -1
            if trace is not None:
                os.close(trace_w)
                trace_w = -1
            timed_out = _wait_readable(conn.fileno(), limits, cgroup)
            mark("exited")
            if timed_out:
                if cgroup is not None:
                    cgroup.kill()  # the launcher and, through the PID namespace, everything the program started
                else:
                    conn.send(b"k")  # the launcher kills PID 1, and with it the PID namespace
            conn.settimeout(5.0)
            try:
                answer = conn.recv(64)
            except (TimeoutError, OSError):
                answer = b""
            # The launcher reports PID 1's exit as a returncode; killed (the cgroup kill, the OOM killer): SIGKILL.
            returncode = int(answer) if answer else -signal.SIGKILL
            if cgroup is not None:
                cgroup.kill()  # nothing should be left (PID 1 is gone): the launcher itself, about to exit
            mark("cgroup-emptied")
            elapsed = time.monotonic() - start
            with os.fdopen(status_r, "rb") as status:
                status_r = -1
                setup_error = status.read(4096).decode("utf-8", errors="replace")
            mark("reaped")
            if trace is not None:
                with os.fdopen(trace_r, "rb") as marks:
                    trace_r = -1
                    for line in marks.read().decode().splitlines():
                        name, _, t = line.partition(" ")
                        trace[name] = float(t)
        finally:
            if conn is not None:
                conn.close()
            for fd in (status_r, status_w):
                if fd >= 0:
                    os.close(fd)
        if setup_error:
            raise SandboxSetupError(setup_error)
        result = SandboxResult(returncode, _read_output(os.path.join(staging, "stdout.txt"), limits.output_bytes),
                               _read_output(os.path.join(staging, "stderr.txt"), limits.output_bytes), timed_out,
                               elapsed, oom_killed=cgroup.oom_killed() if cgroup else False, isolated=True)
        mark("collected")
        return result
    finally:
        if cgroup is not None:
            cgroup.remove()
            mark("cgroup-removed")
        shutil.rmtree(staging, ignore_errors=True)
        for fd in (trace_r, trace_w):
            if fd >= 0:
                os.close(fd)
        mark("cleaned")


def _run_unisolated(source: str, stdin: str, limits: SandboxLimits, python: str | None, audit_hook: bool,
                    files: dict | None = None) -> SandboxResult:
    caps = unisolated_capabilities(python)
    workdir = tempfile.mkdtemp(prefix="mr1-sandbox-")
    try:
        program = os.path.join(workdir, "program.py")
        _write_files(workdir, source, files)
        Path(workdir, "stdin.txt").write_text(stdin, encoding="utf-8")
        # The boot script is copied in: the sandbox uid may not be able to read our install directory.
        boot = os.path.join(workdir, "_boot.py")
        shutil.copyfile(_BOOT, boot)
        uid = _new_run_uid() if caps.per_run_uid else None
        if uid is not None:
            for p in [workdir] + [os.path.join(workdir, n) for n in os.listdir(workdir)]:
                os.chown(p, uid, uid)
            os.chmod(workdir, 0o700)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": workdir,
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        # Output goes to files: RLIMIT_FSIZE then caps it in the kernel (a pipe would need us to police it).
        with open(os.path.join(workdir, "stdin.txt"), "rb") as fin, \
                open(os.path.join(workdir, "stdout.txt"), "wb") as fout, \
                open(os.path.join(workdir, "stderr.txt"), "wb") as ferr:
            argv = [caps.python, "-I", "-B"] + ([boot, program] if audit_hook else [program])
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr,
                                    cwd=workdir, env=env, close_fds=True,
                                    preexec_fn=_preexec(limits, caps.network_namespace, uid))
            timed_out = _wait(proc, limits, None)
            _kill_session(proc.pid)  # also reaps leftovers (e.g. forked children) of a program that exited
            if uid is not None:
                _kill_uid(uid)  # and what left the session (setsid + double fork): nothing else has this uid
            proc.wait()
        elapsed = time.monotonic() - start
        return SandboxResult(proc.returncode, _read_output(os.path.join(workdir, "stdout.txt"), limits.output_bytes),
                             _read_output(os.path.join(workdir, "stderr.txt"), limits.output_bytes), timed_out,
                             elapsed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
