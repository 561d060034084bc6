"""What an isolated sandbox run may see, and which isolation mechanism this machine offers.

The run's filesystem is built by `_sandbox_init.py` from the view computed here: read-only bind mounts of the
system's shared libraries and of the Python installation that runs the program (its prefix, base prefix and the
directories of its executable, so a venv or a pyenv under a 0700 /root works), the loader's cache, and nothing
else of the host: no /home, /root, /tmp, /work, repository, /sys or host /proc. An interpreter installed under the
host's /tmp is bound at its own path inside the run's otherwise empty /tmp.

Mechanisms, strongest first: "namespaces" (root: mount/PID/net/IPC/UTS/cgroup namespaces, a uid of its own per run)
and "user-namespaces" (not root: the same inside a fresh user namespace, the caller's uid mapped to root there, no
uid drop). bubblewrap is not needed: it uses the same kernel features, and where they are disabled for users
(kernel.unprivileged_userns_clone=0 and no setuid bwrap) neither works; pip cannot install it either.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

# Top-level system paths bound read-only when they are directories, re-created when they are symlinks (merged /usr).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
WORKDIR = "/sandbox"
# Paths of the run's own mounts: a bind of a host path there would be hidden or would hide them.
RESERVED = (WORKDIR, "/dev", "/proc", "/.sandbox")
# The run's empty /tmp: an interpreter under the host's /tmp (CI's `mktemp -d` venv) is bound over it, after it is
# mounted (`_sandbox_init.build_root` mounts binds under SCRATCH last), so only /tmp itself and its ancestors clash.
SCRATCH = "/tmp"

_PY_PATHS = ("import sys, os, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
             "sys.base_exec_prefix, os.path.dirname(sys.executable), "
             "os.path.dirname(os.path.realpath(sys.executable))]))")


@dataclass(frozen=True)
class FilesystemView:
    """Read-only binds (host path, path in the run) and symlinks (target, path in the run)."""

    binds: tuple[tuple[str, str], ...]
    symlinks: tuple[tuple[str, str], ...]


def _symlink_chain(path: str) -> list[str]:
    """The directories of every hop of a symlinked executable (a venv's python -> pyenv's python -> ...)."""
    dirs, seen = [], set()
    while os.path.islink(path) and path not in seen:
        seen.add(path)
        dirs.append(os.path.dirname(path))
        target = os.readlink(path)
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    dirs.append(os.path.dirname(path))
    return dirs


def python_paths(python: str) -> list[str]:
    """The directories the interpreter needs at run time, asked from the interpreter itself."""
    out = subprocess.run([python, "-I", "-c", _PY_PATHS], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout) + _symlink_chain(python)


_SITE = ("import sys, json; before = list(sys.path); import site; site.main(); "
         "print(json.dumps([sys.prefix, sys.exec_prefix, [p for p in sys.path if p not in before]]))")


def site_boot_args(python: str) -> tuple[str, ...]:
    """What `site` does to `python -I` (a venv's sys.prefix, site-packages and .pth path lines), as boot options.

    Isolated runs start the interpreter with -S (no `site`: ~12 ms less per run for a venv, whose .pth files import
    setuptools' and editable installs' finders) and the boot script applies these instead, so sys.prefix and the
    importable third-party packages are what they would be; what .pth files would execute does not run.
    """
    out = subprocess.run([python, "-I", "-S", "-c", _SITE], capture_output=True, text=True, timeout=60, check=True)
    prefix, exec_prefix, paths = json.loads(out.stdout)
    return ("--prefix", prefix, "--exec-prefix", exec_prefix) + tuple(a for p in paths for a in ("--path", p))


def _covered(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def filesystem_view(python: str, extra_ro: tuple[str, ...] = ()) -> FilesystemView:
    """The read-only part of a run's root for `python` (plus `extra_ro` host paths a task needs)."""
    binds: list[str] = []
    symlinks = []
    for p in SYSTEM_PATHS:
        if os.path.islink(p):
            symlinks.append((os.readlink(p), p))
        elif os.path.isdir(p):
            binds.append(p)
    wanted = python_paths(python) + list(extra_ro)
    candidates = [os.path.normpath(p) for p in wanted] + [os.path.realpath(p) for p in wanted]
    # Shortest first so a prefix's bind covers its subdirectories; paths under a bound system dir need nothing.
    for p in sorted(dict.fromkeys(candidates), key=len):
        if os.path.exists(p) and not _covered(p, binds) and not _covered(p, [s[1] for s in symlinks]):
            binds.append(p)
    binds += [p for p in ETC_FILES if os.path.exists(p)]
    clash = [p for p in binds if _covered(p, list(RESERVED)) or any(_covered(r, [p]) for r in RESERVED + (SCRATCH,))]
    if clash:
        raise ValueError(f"the interpreter needs {clash}, which overlap the run's own mounts {RESERVED}")
    return FilesystemView(tuple((p, p) for p in binds), tuple(symlinks))
