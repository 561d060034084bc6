"""Warm launcher of isolated runs, `python -I -S _sandbox_init.py CONTROL_FD`: forks a fresh launcher per run.

One server per trainer (`serve`), started once: a run then costs a fork instead of an interpreter start and its
imports (~20 ms). Each forked launcher runs as root (or as root of a fresh user namespace when the trainer is not
root) and builds its run; steps, each needed for one guarantee (see docs/sandbox.md):
1. join the run's own cgroups, then unshare mount, PID, network, IPC, UTS and cgroup namespaces (plus a user
   namespace when not root): fresh ones per run, never the server's;
2. fork: the child is PID 1 of the new PID namespace, so when it exits the kernel kills every process left in the
   namespace (setsid'd or double-forked stragglers included); the launcher waits and reports its exit status;
3. in the child: a private tmpfs root holding read-only bind mounts of the Python installation and system
   libraries, a private writable /work, an empty /tmp and /dev/shm, a few device nodes and a /proc of its own;
   pivot_root into it and detach the host's tree, so nothing else of the host is reachable;
4. drop to the run's uid, no_new_privs, rlimits, then exec the interpreter (PID 1 becomes the program).

It is a standalone script (stdlib only) that imports nothing from the trainer's tree. Setup failures are written
to `status_fd` (closed on exec, so the untrusted program cannot forge them) and exit 125.
"""
import _signal as signal  # `signal` would import enum: not needed
import ctypes
import marshal
import os
import resource
import select
import socket
import sys
import time

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}.get(os.uname().machine)
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]


def mark(spec: dict, name: str) -> None:
    """Record when a phase ended (only when the caller asked for a trace: profiling, not a guarantee)."""
    fd = spec.get("trace_fd")
    if fd is not None:
        os.write(fd, f"{name} {time.monotonic()}\n".encode())


class SetupError(Exception):
    pass


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {err})")


def mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    check(libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {src} -> {target}")


def locked_flags(path: str) -> int:
    """Per-mount flags of the mount holding `path` that a remount must keep (a user namespace may not drop them)."""
    f = os.statvfs(path).f_flag
    flags = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            flags |= ms
    return flags


def mount_points_under(path: str) -> list[str]:
    """`path` and every mount below it, from /proc/self/mountinfo (field 5 is the mount point, octal-escaped)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                out.append(mp)
    return out


def copy_file(src: str, dst: str, uid: int, gid: int) -> None:
    """Copy `src` to a new file `dst` owned by uid:gid (shutil.copyfile without importing shutil)."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            while os.sendfile(fout, fin, None, 1 << 20):
                pass
            os.fchown(fout, uid, gid)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def bind_readonly(src: str, dst: str) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    mount(src, dst, None, MS_BIND | MS_REC)
    for mp in mount_points_under(dst):  # MS_RDONLY on a bind needs a remount, per mount (submounts included)
        mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | locked_flags(mp))


def build_root(spec: dict) -> None:
    root = spec["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=0755")
    late = [(src, dst) for src, dst in spec["binds"] if dst.startswith("/tmp/")]  # over the run's /tmp tmpfs
    for src, dst in spec["binds"]:
        if (src, dst) not in late:
            bind_readonly(src, root + dst)
    for target, link in spec["symlinks"]:
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        if not os.path.lexists(root + link):
            os.symlink(target, root + link)
    uid, gid = spec["uid"], spec["gid"]
    owner = f"uid={uid},gid={gid}"
    scratch = MS_NOSUID | MS_NODEV | MS_NOEXEC
    dev = root + "/dev"
    os.makedirs(dev + "/shm", exist_ok=True)
    for name in DEVICES:
        open(f"{dev}/{name}", "a").close()
        mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    size = f"size={spec['scratch_mb']}m"
    mount("tmpfs", dev + "/shm", "tmpfs", scratch, f"{size},mode=1777")
    os.makedirs(root + "/tmp")
    mount("tmpfs", root + "/tmp", "tmpfs", scratch, f"{size},mode=1777")
    for src, dst in late:  # an interpreter under the host's /tmp (a CI venv): read-only, in the empty /tmp
        bind_readonly(src, root + dst)
    work = root + spec["workdir"]
    os.makedirs(work)
    mount("tmpfs", work, "tmpfs", scratch, f"{size},mode=0700,{owner}")
    for name in os.listdir(spec["work_src"]):
        dst = os.path.join(work, name)
        copy_file(os.path.join(spec["work_src"], name), dst, uid, gid)
    os.makedirs(root + "/.sandbox")
    copy_file(spec["boot"], root + "/.sandbox/boot.py", 0, 0)
    os.makedirs(root + "/proc")
    try:  # our own PID namespace's /proc: the trainer and other runs are not in it
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError:
        if not spec["proc_optional"]:
            raise  # as root it must work; in a user namespace a masked host /proc may forbid it: run without
    mark(spec, "mounted")
    os.chdir(root)
    if SYS_PIVOT_ROOT is not None:
        check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")  # the old root is stacked on the new one
        check(libc.umount2(b".", MNT_DETACH), "detach the host root")
    else:
        os.chroot(".")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    mark(spec, "pivoted")


def drop_and_exec(spec: dict, status_fd: int) -> None:
    if spec["drop_uid"]:
        os.setgroups([])
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # after setuid, which clears it
    for name, (soft, hard) in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir(spec["workdir"])
    mark(spec, "exec")
    try:
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        raise SetupError(f"exec {spec['argv'][0]}: {e}") from None


def fail(status_fd: int, msg: str) -> None:
    os.write(status_fd, msg.encode(errors="replace")[:4000])
    os._exit(125)


def enter_user_namespace(flags: int) -> None:
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWUSER | flags), "unshare (user namespace)")
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def serve(control_fd: int) -> None:
    """The warm launcher: one process per trainer, started once, forking a fresh launcher per run.

    Each request on `control_fd` (a SOCK_SEQPACKET socket) is one message: the marshalled spec, with the run's
    stdin, stdout, stderr, status pipe, a socket of its own (`conn`) and optionally the trace pipe attached. This
    process never joins a cgroup or a namespace itself: everything of a run happens in the forked child, exactly as
    a freshly started launcher would do it, so a run shares nothing with another but the code already imported.
    It exits when the trainer's end of `control_fd` closes.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked launchers are reaped by the kernel
    control = socket.socket(fileno=control_fd)
    while True:
        msg, fds, _, _ = socket.recv_fds(control, 1 << 20, 8)
        if not msg:
            return
        if len(fds) < 5:  # not a request of ours (a truncated message): nothing to run, nowhere to report
            for fd in fds:
                os.close(fd)
            continue
        go_r, go_w = os.pipe()
        child = os.fork()
        if child == 0:
            control.close()
            os.close(go_w)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an ignored SIGCHLD would also survive the exec
            if os.read(go_r, 1) != b"x":  # not in its cgroups: the server said why on the status pipe
                os._exit(125)
            os.close(go_r)
            run_forked(msg, fds)
        os.close(go_r)
        # Moved into the run's cgroups while it waits (moving a running task into a new cpu cgroup costs it
        # milliseconds of scheduling), before it does anything else.
        try:
            for procs in marshal.loads(msg)["cgroup_procs"]:
                with open(procs, "w") as f:
                    f.write(str(child))
            os.write(go_w, b"x")
        except OSError as e:
            os.write(fds[3], f"sandbox setup: join cgroup {procs}: {e}".encode(errors="replace")[:4000])
        os.close(go_w)
        for fd in fds:
            os.close(fd)


def run_forked(msg: bytes, fds: list) -> None:
    """In the forked launcher: take the run's descriptors, build the run, report PID 1's exit on `conn`."""
    stdio, status_fd, conn_fd = fds[:3], fds[3], fds[-1]  # [stdin, stdout, stderr, status, (trace,) conn]
    spec = marshal.loads(msg)  # from the trainer (trusted): plain data
    spec["status_fd"], spec["conn_fd"] = status_fd, conn_fd
    spec["trace_fd"] = fds[4] if len(fds) > 5 else None
    try:
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
            os.close(fd)
        for fd in fds[3:]:
            os.set_inheritable(fd, False)  # received descriptors are inheritable: none may reach the program
        launch(spec)
    except Exception as e:  # noqa: BLE001 - whatever breaks here is a setup failure the trainer must hear about
        fail(status_fd, f"sandbox setup: {type(e).__name__}: {e}")
    os._exit(0)


def launch(spec: dict) -> None:
    status_fd = spec["status_fd"]
    mark(spec, "launcher-started")
    mark(spec, "cgroup-joined")  # by the server, before this process ran
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    try:
        if spec["user_namespace"]:
            enter_user_namespace(flags)
        else:
            check(libc.unshare(flags), "unshare")
    except (SetupError, OSError) as e:
        fail(status_fd, f"sandbox setup: {e}")
    mark(spec, "unshared")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    child = os.fork()
    if child == 0:
        try:
            mark(spec, "forked-pid1")
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
            os.close(spec["conn_fd"])
            build_root(spec)
            drop_and_exec(spec, status_fd)
        except Exception as e:  # noqa: BLE001 - PID 1 must never fall through to the parent's code below
            fail(status_fd, f"sandbox setup: {type(e).__name__}: {e}")
    # Stays outside the PID namespace and waits for PID 1, or for the trainer to say stop (or to go away: EOF on
    # conn), then kills PID 1 (PID 1's parent-death signal covers a kill of this process), and reports the exit.
    pidfd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(spec["conn_fd"], select.POLLIN)
    ready: list[int] = []
    while not ready:
        ready = [fd for fd, _ in poller.poll()]
    if pidfd not in ready:  # the trainer said stop, or is gone
        os.kill(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    os.write(spec["conn_fd"], str(os.waitstatus_to_exitcode(status)).encode())


if __name__ == "__main__":
    serve(int(sys.argv[1]))
