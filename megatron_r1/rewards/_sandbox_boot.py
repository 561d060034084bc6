"""Runs inside the sandbox before the untrusted program: installs an audit hook, then executes the program.

The hook is defence in depth, not the boundary: it refuses sockets, subprocess/exec, ctypes and file writes outside
the sandbox directory. The OS limits set by the parent (rlimits, unprivileged uid, network namespace) are the wall.
Everything the hook uses lives in a closure, so the program cannot patch it through `sys.modules["__main__"]`.
"""
import sys


def _install_hook_and_run(program: str) -> None:
    import os

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
    sys.addaudithook(hook)
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})


if __name__ == "__main__":
    _install_hook_and_run(sys.argv[1])
