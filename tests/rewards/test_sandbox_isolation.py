"""Attacks on the isolated sandbox: each would score or leave a trace without isolation, and must not with it.

Most attacks run twice: isolated (must fail) and, as a control, on the unisolated path with the audit hook off
(must succeed there), so a test cannot pass because the attack itself is broken. The OS layers are tested with
the audit hook off: it is defence in depth, not the wall.
"""
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_r1.errors import ConfigError
from megatron_r1.rewards import code as code_module
from megatron_r1.rewards import get_reward
from megatron_r1.rewards import sandbox as sandbox_module
from megatron_r1.rewards.sandbox import (_UID_BASE, Capabilities, SandboxLimits, SandboxUnavailable, run_python,
                                         sandbox_capabilities, unisolated_capabilities)

LIMITS = SandboxLimits(wall_seconds=20.0, cpu_seconds=3, memory_mb=256, max_processes=32, output_bytes=64 << 10)
CAPS = sandbox_capabilities()
UNISOLATED = unisolated_capabilities()
isolated = pytest.mark.skipif(CAPS.isolation is None, reason=f"no isolation mechanism here: {CAPS.missing}")
with_cgroups = pytest.mark.skipif(CAPS.cgroups is None, reason=f"no per-run cgroups here: {CAPS.missing}")
# Controls need the unisolated path to run as another uid than ours (root drops to a per-run uid), like a trainer.
# They show what isolation prevents (the same attack succeeds without it); the full suite runs them, the fast lane
# keeps the isolated side only.
_needs_uid_drop = pytest.mark.skipif(not UNISOLATED.per_run_uid, reason="the unisolated control needs root (uid drop)")


def control(test):
    return pytest.mark.slow(_needs_uid_drop(test))


def run(program: str, isolated_run: bool, **kw):
    return run_python(program, kw.pop("stdin", ""), kw.pop("limits", LIMITS), audit_hook=False,
                      isolation="auto" if isolated_run else "off", **kw)


def sandbox_processes() -> list[int]:
    """Live processes of any sandbox uid (as root every run, isolated or not, has a uid of its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                owner = os.stat(f"/proc/{entry}").st_uid
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if owner >= _UID_BASE and state != "Z":
                found.append(int(entry))
    return found


@pytest.fixture
def secrets(tmp_path_factory):
    """World-readable secrets planted where a hostile program looks: /tmp, a home directory, the repository."""
    token = uuid.uuid4().hex
    home = Path("/home") / f"mr1-test-{token[:8]}"
    places = [Path("/tmp") / f"expected-{token[:8]}.txt", home / "answers.txt",
              Path(__file__).with_name(f"_planted_{token[:8]}.txt")]
    home.mkdir(mode=0o755)
    for p in places:
        p.write_text(f"SECRET-{token}")
        p.chmod(0o644)
    yield token, places
    for p in places:
        p.unlink()
    home.rmdir()


def reader_program(places: list[Path]) -> str:
    """Tries every way to read the planted files: open, os.open, listing their directories, and /proc."""
    return f"""
import os
paths = {[str(p) for p in places]!r}
found = []
def grab(p):
    try:
        found.append(open(p).read())
    except OSError:
        pass
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:  # closed each time: the run's RLIMIT_NOFILE is small and /proc lists every host process
        found.append(os.read(fd, 100).decode())
    except OSError:
        pass
    finally:
        os.close(fd)
for p in paths:
    grab(p)
    d = os.path.dirname(p)
    try:
        for name in os.listdir(d):
            grab(os.path.join(d, name))
    except OSError:
        pass
    for pid in ["1", "self", str({os.getpid()}), str(os.getppid())] + [e for e in os.listdir("/proc") if e.isdigit()]:
        for via in ("root", "cwd"):
            grab(f"/proc/{{pid}}/{{via}}" + p)
    grab(f"/proc/{os.getpid()}/environ")
print("\\n".join(f for f in found if "SECRET-" in f))
"""


@isolated
def test_planted_secrets_cannot_be_read(secrets):
    token, places = secrets
    r = run(reader_program(places), True)
    assert r.returncode == 0, r.stderr
    assert token not in r.stdout


@control
def test_control_planted_secrets_are_read_without_isolation(secrets):
    token, places = secrets
    r = run(reader_program(places), False)
    assert r.stdout.count(token) >= len(places)  # the attack works where nothing stops it


WRITER = """
import os
wrote = []
for p in {targets!r}:
    try:
        with open(p, "w") as f:
            f.write("pwned")
        wrote.append(p)
    except OSError:
        pass
print(wrote)
"""


@isolated
def test_writes_land_in_private_scratch_and_vanish(tmp_path):
    tag = uuid.uuid4().hex[:8]
    tmp_path.chmod(0o777)  # world-writable, like /tmp
    host_targets = [f"/tmp/mr1-pwned-{tag}", f"/dev/shm/mr1-pwned-{tag}", str(tmp_path / "pwned")]
    r = run(WRITER.format(targets=host_targets + [f"scratch-{tag}"]), True)
    assert r.returncode == 0, r.stderr
    # /tmp and /dev/shm are the run's own (writable), so those writes succeed there, and the host never sees them.
    assert eval(r.stdout) == [f"/tmp/mr1-pwned-{tag}", f"/dev/shm/mr1-pwned-{tag}", f"scratch-{tag}"]
    assert not any(Path(p).exists() for p in host_targets)
    check = run("import os\nprint(sorted(os.listdir('/tmp')), os.listdir('/dev/shm'), sorted(os.listdir('.')))", True)
    # The next run starts empty; its /tmp holds only the mount point of an interpreter installed under /tmp (CI).
    interpreter_dirs = sorted({dst.split("/")[2] for _, dst in CAPS.plan.view.binds if dst.startswith("/tmp/")})
    assert check.stdout.strip() == f"{interpreter_dirs} [] ['program.py']"


@control
def test_control_writes_to_host_tmp_succeed_without_isolation():
    target = f"/tmp/mr1-pwned-{uuid.uuid4().hex[:8]}"
    try:
        r = run(WRITER.format(targets=[target]), False)
        assert target in r.stdout and Path(target).read_text() == "pwned"
    finally:
        Path(target).unlink(missing_ok=True)


# Run A writes a marker in its working directory, then checks it after B had its chance to tamper with it.
VICTIM = "import time\nopen('answer.txt', 'w').write('mine')\ntime.sleep(3)\nprint(open('answer.txt').read())\n"
TAMPER = """
import glob, os, time
hit = []
deadline = time.time() + 2.5
while time.time() < deadline and not hit:
    cands = glob.glob('/tmp/mr1-sandbox-*/answer.txt') + glob.glob('/proc/*/cwd/answer.txt')
    for p in cands:
        try:
            open(p, 'w').write('tampered')
            hit.append(p)
        except OSError:
            pass
    time.sleep(0.05)
print(hit)
"""


def _victim_and_tamper(isolated_run: bool):
    with ThreadPoolExecutor(2) as ex:
        victim = ex.submit(run, VICTIM, isolated_run)
        tamper = ex.submit(run, TAMPER, isolated_run)
        return victim.result(), tamper.result()


@isolated
def test_a_concurrent_run_cannot_touch_another_runs_directory():
    victim, tamper = _victim_and_tamper(True)
    assert victim.stdout.strip() == "mine" and tamper.stdout.strip() == "[]", (victim, tamper)


@pytest.fixture
def shared_uid(monkeypatch):
    """The unisolated path with every run on one uid (what `nobody` gave): the condition the attacks need. The uid
    sweep is off too: with a shared uid it would kill the other run's processes."""
    monkeypatch.setattr(sandbox_module, "_new_run_uid", lambda: _UID_BASE + 0xFFFE)
    monkeypatch.setattr(sandbox_module, "_kill_uid", lambda uid, patience=5.0: None)


@control
def test_control_concurrent_runs_share_a_uid_without_isolation(shared_uid):
    victim, tamper = _victim_and_tamper(False)
    assert victim.stdout.strip() == "tampered"


@control
def test_unisolated_runs_as_root_cannot_tamper_with_each_other():
    victim, tamper = _victim_and_tamper(False)
    assert victim.stdout.strip() != "tampered"


STRAGGLER = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print("straggler", os.getpid(), flush=True)
        time.sleep(8)  # bounded, so the control run's survivor goes away by itself
        os._exit(0)
    os._exit(0)
time.sleep(0.5)
"""


@isolated
def test_a_setsid_double_forked_straggler_dies_with_the_run():
    r = run(STRAGGLER, True)
    assert "straggler" in r.stdout and r.returncode == 0
    assert sandbox_processes() == []


@control
def test_unisolated_root_run_sweeps_its_uid(monkeypatch):
    # Control first: the session kill alone leaves the setsid'd grandchild alive (the attack works)...
    monkeypatch.setattr(sandbox_module, "_kill_uid", lambda uid, patience=5.0: None)
    r = run(STRAGGLER, False)
    pid = int(r.stdout.split()[1])
    assert Path(f"/proc/{pid}").exists() and os.stat(f"/proc/{pid}").st_uid >= _UID_BASE
    os.kill(pid, 9)
    monkeypatch.undo()
    # ...and the sweep of the run's own uid kills it, with no PID namespace.
    r = run(STRAGGLER, False)
    assert "straggler" in r.stdout and sandbox_processes() == []


def test_unisolated_runs_do_not_share_a_uid_with_other_processes():
    # A shared `nobody` counts every overflow-uid process of the host against RLIMIT_NPROC (a CI runner's did).
    first, second = sandbox_module._new_run_uid(), sandbox_module._new_run_uid()
    assert first != second and min(first, second) >= _UID_BASE and sandbox_module._PROBE_UID not in (first, second)


# Forks as many sleeping children as it can (up to 40) and holds them for a moment; prints how many it got.
FORKER = """
import os, time
kids = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(3)
        os._exit(0)
    kids += 1
print(kids, flush=True)
time.sleep(3)
"""


def _two_forkers(isolated_run: bool, limits: SandboxLimits) -> list[int]:
    """How many children each of two concurrent runs got (0: the run could not even start)."""

    def one():
        try:
            return int(run(FORKER, isolated_run, limits=limits).stdout.split()[0])
        except (BlockingIOError, IndexError):  # exec refused (EAGAIN) / no output: the other run took the quota
            return 0

    with ThreadPoolExecutor(2) as ex:
        return [f.result() for f in [ex.submit(one) for _ in range(2)]]


@isolated
def test_process_quota_is_per_run_and_holds():
    limits = SandboxLimits(wall_seconds=30.0, cpu_seconds=5, memory_mb=256, max_processes=24)
    counts = _two_forkers(True, limits)
    # Each run gets its own quota (PID 1 counts as one process): concurrent runs do not eat each other's.
    assert all(20 <= c < 24 for c in counts), counts
    assert sandbox_processes() == []
    dirs = CAPS.plan.cgroups.dirs.values() if CAPS.plan.cgroups else []
    leftover = [os.path.join(d, n) for d in dirs for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))]
    assert leftover == []  # each run's cgroups are removed after it


@control
def test_control_process_quota_is_shared_when_runs_share_a_uid(shared_uid):
    limits = SandboxLimits(wall_seconds=30.0, cpu_seconds=5, memory_mb=256, max_processes=24)
    counts = _two_forkers(False, limits)
    assert sum(counts) < 2 * 20, counts


def forking(n: int, child: str, done: str) -> str:
    """A program that forks `n` children running `child` (one line), waits for all of them and prints `done` if
    every one exited cleanly: n processes that are each under a per-process limit and together over the run's."""
    return f"""
import os, time
kids = []
for _ in range({n}):
    pid = os.fork()
    if pid == 0:
        {child}
        os._exit(0)
    kids.append(pid)
statuses = [os.waitpid(k, 0)[1] for k in kids]
print({done!r} if not any(statuses) else "a child died")
"""


# Four processes of 100 MB each: every one is under the per-process address-space limit, together over the run's.
HOG = forking(4, 'block = bytearray(100 << 20); block[::4096] = b"x" * len(block[::4096]); time.sleep(2)',
              "held 400 MB")
HOG_LIMITS = SandboxLimits(wall_seconds=30.0, cpu_seconds=5, memory_mb=160, max_processes=16)


@control
def test_control_memory_hog_succeeds_with_per_process_limits_only():
    r = run(HOG, False, limits=HOG_LIMITS)
    assert "held 400 MB" in r.stdout, r


# Three processes each spinning for 0.9 s of CPU: each is under RLIMIT_CPU, together over the run's 1 s.
SPINNERS = forking(3, "while time.process_time() < 0.9: pass", "all done")
CPU_LIMITS = SandboxLimits(wall_seconds=60.0, cpu_seconds=1, memory_mb=128, max_processes=16, cpu_cores=2.0)


@with_cgroups
@pytest.mark.parametrize("program,limits,printed,stopped_by", [
    (HOG, HOG_LIMITS, "held 400 MB", "oom_killed"), (SPINNERS, CPU_LIMITS, "all done", "timed_out"),
], ids=["memory", "cpu_time"])
def test_quota_covers_all_processes_of_a_run(program, limits, printed, stopped_by):
    r = run(program, True, limits=limits)
    assert printed not in r.stdout and getattr(r, stopped_by), r


@isolated
def test_network_is_unreachable_even_without_the_audit_hook():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')", True)
        assert r.returncode != 0 and "connected" not in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()


@isolated
def test_a_correct_program_with_stdin_task_files_and_stdlib_works():
    program = """
import collections, fractions, heapq, json, re, statistics, sys, tempfile
weights = json.load(open("weights.json"))
words = re.findall(r"[a-z]+", sys.stdin.read())
counts = collections.Counter(words)
open("scratch.txt", "w").write("ok")
with tempfile.NamedTemporaryFile("w") as t:
    t.write("tmp ok")
score = sum(weights.get(w, 0) * c for w, c in counts.items())
print(score, heapq.nlargest(1, counts)[0], fractions.Fraction(score, 4), statistics.mean([1, 2, 3]),
      open("scratch.txt").read())
"""
    r = run_python(program, "a b b c", LIMITS, files={"weights.json": '{"a": 1, "b": 2, "c": 3}'})
    assert (r.returncode, r.stdout, r.isolated) == (0, "8 c 2 2 ok\n", True), r.stderr


@isolated
@pytest.mark.slow
def test_code_reward_scores_a_correct_program_next_to_bombs():
    reward = get_reward("code", wall_seconds=20.0, cpu_seconds=3, memory_mb=128, max_processes=16, max_parallel=3)
    fork_bomb = "```python\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n```"
    memory_bomb = "```python\nimport os\nfor _ in range(3):\n    os.fork()\nblocks = []\nwhile True:\n" \
                  "    blocks.append(bytearray(20 << 20))\n```"
    correct = "```python\nimport sys\nw = open('w.txt').read().split()\nprint(sum(map(int, sys.stdin.read().split()))" \
              " * int(w[0]))\n```"
    tests = [{"input": "1 2", "output": "6"}, {"input": "5 5", "output": "20"}]
    samples = [{"tests": tests, "files": {"w.txt": "2"}}] * 2 + [{"tests": tests, "files": {"w.txt": "2"}}]
    assert reward([fork_bomb, memory_bomb, correct], samples) == [0.0, 0.0, 1.0]
    assert sandbox_processes() == []


def test_no_isolation_refuses_unless_allowed(monkeypatch, caplog):
    none = Capabilities(None, None, "python3", ("namespaces: unshare: Operation not permitted (errno 1)",))
    monkeypatch.setattr(sandbox_module, "sandbox_capabilities", lambda python=None: none)
    monkeypatch.setattr(code_module, "sandbox_capabilities", lambda python=None: none)
    with pytest.raises(SandboxUnavailable, match="unshare: Operation not permitted.*allow_unisolated=true"):
        run_python("print(1)")
    with pytest.raises(ConfigError, match="no isolation mechanism.*allow_unisolated=true"):
        get_reward("code")
    reward = get_reward("code", allow_unisolated=True, wall_seconds=20.0)
    with caplog.at_level("WARNING"):
        assert reward(["```python\nprint(input())\n```"], [{"tests": [{"input": "x", "output": "x"}]}]) == [1.0]
    assert "Running unisolated because allow_unisolated is set" in caplog.text


@isolated
def test_an_interpreter_installed_under_tmp_is_bound_into_the_runs_own_tmp(tmp_path):
    # CI builds its venv with `mktemp -d /tmp/...`: the run's empty /tmp must not hide it, nor expose the host /tmp.
    import subprocess
    import sys
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (tmp_path / "host-secret.txt").write_text("secret")
    program = ("import os, sys\nprint(sys.prefix)\nprint(os.path.exists(%r))\n"
               "try:\n    open(os.path.join(sys.prefix, 'x'), 'w')\nexcept OSError:\n    print('read-only')\n"
               % str(tmp_path / "host-secret.txt"))
    r = run_python(program, "", LIMITS, python=str(venv / "bin" / "python"), audit_hook=False)
    assert r.isolated and r.returncode == 0, r
    assert r.stdout.split() == [str(venv), "False", "read-only"]


@isolated
def test_a_run_without_site_sees_what_site_would_give_it():
    # Runs start the interpreter with -S (faster); boot.py must restore what `site` gives a program: the venv's
    # sys.prefix, its site-packages on sys.path, exit()/quit(). Reference: the same interpreter run plainly.
    import json
    import subprocess
    probe = "import json, sys\nprint(json.dumps([sys.prefix, sys.exec_prefix, sys.path[1:]]))\n"
    ref = json.loads(subprocess.run([CAPS.python, "-I", "-c", probe], capture_output=True, text=True,
                                    check=True).stdout)
    for audit_hook in (True, False):
        r = run_python(probe + "exit(3)\n", "", LIMITS, audit_hook=audit_hook)
        assert r.isolated and r.returncode == 3, r
        prefix, exec_prefix, path = json.loads(r.stdout)
        assert [prefix, exec_prefix] == ref[:2]
        assert [p for p in ref[2] if "-packages" in p] == [p for p in path if "-packages" in p] != []


NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")
# Held for a while: the kernel reuses a dead namespace's inode number, so only live ones can be told apart.
NS_PROGRAM = ("import os, time\nprint(' '.join(os.readlink('/proc/self/ns/' + n) for n in %r), flush=True)\n"
              "time.sleep(3)\n" % (NAMESPACES,))


@isolated
def test_runs_forked_by_the_warm_launcher_get_fresh_namespaces_each():
    # The launcher server is started once and forks a launcher per run: the namespaces must still be per run,
    # none shared with another run, the trainer or the server itself.
    with ThreadPoolExecutor(3) as ex:
        runs = [r.stdout.split() for r in ex.map(lambda _: run_python(NS_PROGRAM, "", LIMITS), range(3))]
    server = sandbox_module._Launcher._current.proc.pid
    outside = {os.readlink(f"/proc/{pid}/ns/{n}") for pid in (os.getpid(), server) for n in NAMESPACES}
    seen = [ns for r in runs for ns in r]
    assert all(len(r) == len(NAMESPACES) for r in runs), runs
    assert len(set(seen)) == len(seen) and not outside & set(seen)


@isolated
def test_a_dead_launcher_server_is_replaced():
    assert run_python("print(1)", "", LIMITS).stdout == "1\n"
    server = sandbox_module._Launcher._current.proc
    server.kill()
    server.wait()
    r = run_python("print(2)", "", LIMITS)
    assert (r.returncode, r.stdout, r.isolated) == (0, "2\n", True), r
    assert sandbox_module._Launcher._current.proc.pid != server.pid
