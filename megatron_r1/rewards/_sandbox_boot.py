"""Runs inside the sandbox before the untrusted program: installs an audit hook, then executes the program.

The hook is defence in depth, not the boundary: it refuses sockets, subprocess/exec, ctypes and file writes outside
the sandbox directory. The OS limits set by the parent (rlimits, unprivileged uid, network namespace) are the wall.
Everything the hook uses lives in a closure, so the program cannot patch it through `sys.modules["__main__"]`.
Isolated runs start the interpreter with -S (faster); this script then gives the program what `site` would: the
prefix and site-packages paths (`--prefix`, `--path`) and exit()/quit()/help().
"""
import sys


def _install_hook_and_run(program: str, audit_hook: bool = True, site_like: dict | None = None) -> None:
    import os

    if sys.flags.no_site:  # isolated runs start with -S: what `site` gives a program, minus .pth code
        import site

        site.setquit()
        site.setcopyright()
        site.sethelper()
        site_like = site_like or {}
        sys.prefix = site_like.get("prefix", sys.prefix)
        sys.exec_prefix = site_like.get("exec_prefix", sys.exec_prefix)
        sys.path.extend(p for p in site_like.get("paths", []) if p not in sys.path)

    root = os.path.realpath(os.getcwd())
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    blocked = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.forkpty", "pty.spawn",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.kill", "os.killpg"})
    path_events = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                             "os.chown", "os.truncate", "os.utime", "shutil.rmtree"})

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor; its open() was checked
        try:
            real = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + sep)

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing outside the sandbox directory: {path!r}")
        elif event in path_events:
            for a in args[:2]:
                if isinstance(a, (str, bytes)) and not inside(a):
                    raise PermissionError(f"sandbox: {event} outside the sandbox directory")

    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv = ["program.py"]
    sys.path[0] = root
    if audit_hook:
        sys.addaudithook(hook)
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})


def _main(argv: list[str]) -> None:
    """`boot.py [--no-audit-hook] [--prefix P] [--exec-prefix P] [--path DIR]... program.py` (no argparse: it
    would slow down every run's start)."""
    audit_hook = True
    site_like: dict = {"paths": []}
    while len(argv) > 1:
        flag = argv.pop(0)
        if flag == "--no-audit-hook":
            audit_hook = False
        elif flag == "--path":
            site_like["paths"].append(argv.pop(0))
        elif flag in ("--prefix", "--exec-prefix"):
            site_like[flag[2:].replace("-", "_")] = argv.pop(0)
        else:
            raise SystemExit(f"sandbox boot: unknown option {flag!r}")
    _install_hook_and_run(argv[0], audit_hook, site_like)


if __name__ == "__main__":
    _main(sys.argv[1:])
