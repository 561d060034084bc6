"""Per-run cgroups for the code sandbox: memory, process count and CPU of one run, not of a uid or the machine.

rlimits are per process (a fork bomb of 200 MB processes each stays under RLIMIT_AS) and RLIMIT_NPROC is per uid
(concurrent runs would share it), so the quotas that must hold per run live in a cgroup made for that run under
the trainer's own cgroup, removed after it. Both layouts are handled: cgroup v1 (one hierarchy per controller, e.g.
`/sys/fs/cgroup/memory/...`) and the unified cgroup v2. memory and pids are required; cpu (a bandwidth cap) and CPU
accounting (the run's total CPU seconds, enforced by the caller) are used when present.
"""
from __future__ import annotations

import atexit
import errno
import os
import signal
import time
from dataclasses import dataclass, field

_PREFIX = "mr1-sandbox-"
_REQUIRED = ("memory", "pids")


@dataclass(frozen=True)
class CgroupRoot:
    """Where this process creates its runs' cgroups: controller -> directory (v2: the same directory for all)."""

    version: int
    dirs: dict[str, str] = field(default_factory=dict)


def _mountinfo() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = (right.split() + ["", "", ""])[:3]
            if fstype in ("cgroup", "cgroup2"):
                out.append((left.split()[4], fstype, set(opts.split(","))))
    return out


def _own_cgroups() -> dict[str, str]:
    """controller -> our cgroup path (v2 under the key "")."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def _sweep_stale(base_parent: str) -> None:
    """Remove empty run cgroups left by trainers that died (their pid is in the name)."""
    try:
        names = [n for n in os.listdir(base_parent) if n.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _remove_tree(os.path.join(base_parent, name))


def _remove_tree(path: str) -> None:
    for sub in sorted((os.path.join(d, s) for d, subs, _ in os.walk(path) for s in subs), key=len, reverse=True):
        try:
            os.rmdir(sub)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _make_base(parent: str) -> str:
    _sweep_stale(parent)
    base = os.path.join(parent, f"{_PREFIX}{os.getpid()}")
    os.makedirs(base, exist_ok=True)
    atexit.register(_remove_tree, base)
    return base


def _v1_root(mounts, own) -> CgroupRoot:
    dirs = {}
    for mp, fstype, opts in mounts:
        if fstype != "cgroup":
            continue
        for c in ("memory", "pids", "cpu", "cpuacct"):
            if c in opts and c in own and c not in dirs:
                dirs[c] = _make_base(mp + own[c])
    missing = [c for c in _REQUIRED if c not in dirs]
    if missing:
        raise OSError(errno.ENOENT, f"cgroup v1 controller(s) {', '.join(missing)} not mounted")
    return CgroupRoot(1, dirs)


def _v2_root(mounts, own) -> CgroupRoot:
    mp = next((m for m, fstype, _ in mounts if fstype == "cgroup2"), None)
    if mp is None or "" not in own:
        raise OSError(errno.ENOENT, "no cgroup v2 mount")
    here = os.path.normpath(mp + own[""])
    available = set(open(os.path.join(here, "cgroup.controllers")).read().split())
    missing = [c for c in _REQUIRED if c not in available]
    if missing:
        raise OSError(errno.ENOENT, f"cgroup v2 controller(s) {', '.join(missing)} not enabled for {here}")
    wanted = [c for c in ("memory", "pids", "cpu") if c in available]
    last: OSError | None = None
    # Our own cgroup holds processes, which v2 forbids to also delegate controllers (EBUSY); its parent usually
    # holds none, so the runs' cgroups become our siblings there.
    for parent in (here, os.path.dirname(here)):
        try:
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join("+" + c for c in wanted))
            base = _make_base(parent)
        except OSError as e:
            last = e
            continue
        return CgroupRoot(2, {**{c: base for c in wanted}, "cpuacct": base})  # cpu.stat is always there
    raise OSError(last.errno if last else errno.EPERM, f"cannot delegate {' '.join(wanted)} under {here}: {last}")


def find_cgroup_root() -> tuple[CgroupRoot | None, str]:
    """The cgroup layout runs can use, or None and the reason (for the capability report)."""
    try:
        mounts, own = _mountinfo(), _own_cgroups()
    except OSError as e:
        return None, f"cgroups: {e}"
    reasons = []
    for make in (_v1_root, _v2_root):
        try:
            return make(mounts, own), ""
        except OSError as e:
            reasons.append(e.strerror or str(e))
    return None, "cgroups: " + "; ".join(reasons)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class RunCgroup:
    """The cgroup(s) of one sandbox run: limits set at creation, joined by the launcher, removed by `remove()`."""

    def __init__(self, root: CgroupRoot, name: str, memory_bytes: int, max_pids: int, cpu_cores: float | None):
        self.root = root
        self.paths = {c: os.path.join(d, name) for c, d in root.dirs.items()}
        for p in dict.fromkeys(self.paths.values()):
            os.mkdir(p)
        try:
            self._limit(memory_bytes, max_pids, cpu_cores)
        except OSError:
            self.remove()
            raise

    def _limit(self, memory_bytes: int, max_pids: int, cpu_cores: float | None) -> None:
        mem, pids = self.paths["memory"], self.paths["pids"]
        period = 100_000
        if self.root.version == 1:
            _write(f"{mem}/memory.limit_in_bytes", str(memory_bytes))
            if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):  # no escape into swap
                _write(f"{mem}/memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(f"{pids}/pids.max", str(max_pids))
            if cpu_cores and "cpu" in self.paths:
                _write(f"{self.paths['cpu']}/cpu.cfs_period_us", str(period))
                _write(f"{self.paths['cpu']}/cpu.cfs_quota_us", str(max(1000, int(cpu_cores * period))))
        else:
            _write(f"{mem}/memory.max", str(memory_bytes))
            if os.path.exists(f"{mem}/memory.swap.max"):
                _write(f"{mem}/memory.swap.max", "0")
            _write(f"{pids}/pids.max", str(max_pids))
            if cpu_cores and "cpu" in self.paths:
                _write(f"{self.paths['cpu']}/cpu.max", f"{max(1000, int(cpu_cores * period))} {period}")

    @property
    def procs_files(self) -> list[str]:
        """The files the launcher writes its pid to, joining every hierarchy before it does anything else."""
        return [os.path.join(p, "cgroup.procs") for p in dict.fromkeys(self.paths.values())]

    def members(self) -> set[int]:
        pids: set[int] = set()
        for f in self.procs_files:
            try:
                pids.update(int(x) for x in open(f).read().split())
            except OSError:
                pass
        return pids

    def cpu_seconds(self) -> float | None:
        """CPU time used by every process of the run so far (None without CPU accounting)."""
        acct = self.paths.get("cpuacct")
        try:
            if acct is None:
                return None
            if self.root.version == 1:
                return int(open(f"{acct}/cpuacct.usage").read()) / 1e9
            for line in open(f"{acct}/cpu.stat"):
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        except (OSError, ValueError):
            return None
        return None

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer ended a process of this run (the memory quota was hit)."""
        name = "memory.oom_control" if self.root.version == 1 else "memory.events"
        try:
            for line in open(os.path.join(self.paths["memory"], name)):
                if line.startswith("oom_kill "):
                    return int(line.split()[1]) > 0
        except OSError:
            pass
        return False

    def kill(self, patience: float = 5.0) -> None:
        """SIGKILL every process of the run until none is left (new forks are bounded by pids.max)."""
        deadline = time.monotonic() + patience
        while True:
            members = self.members()
            if not members or time.monotonic() > deadline:
                return
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    def remove(self) -> None:
        """Kill what is left and delete the cgroup directories (retried: the kernel frees them asynchronously)."""
        self.kill()
        for p in dict.fromkeys(self.paths.values()):
            for _ in range(200):
                try:
                    os.rmdir(p)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    time.sleep(0.005)
