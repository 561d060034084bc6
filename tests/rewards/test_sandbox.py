"""Attacks on the code sandbox: each must be stopped, and the test process (the "trainer") must be unharmed.

These run on the default path (isolated where the machine allows, see test_sandbox_isolation.py for the attacks
on the filesystem view, stragglers and per-run quotas); tests of the unisolated layers pass `isolation="off"`.
"""
import os
import resource
import socket
import time
from pathlib import Path

import pytest

from megatron_r1.rewards.sandbox import _UID_BASE, SandboxLimits, run_python, unisolated_capabilities

# Wall limit generous enough for interpreter start-up on a loaded 2-core CI machine; CPU limits stop loops first.
FAST = SandboxLimits(wall_seconds=8.0, cpu_seconds=2, memory_mb=256, max_processes=32, output_bytes=64 << 10)
CAPS = unisolated_capabilities()
needs_root_layers = pytest.mark.skipif(not CAPS.per_run_uid or not CAPS.network_namespace,
                                       reason="uid drop and network namespace need root")


def live_sandbox_processes() -> list[int]:
    """Live processes owned by a sandbox uid (leftovers of a fork bomb would show up here; zombies excluded).

    Runs as root, isolated or not, each have their own uid from _UID_BASE up.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                owner = os.stat(f"/proc/{entry}").st_uid
                owned = owner >= _UID_BASE
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if owned and state != "Z":
                pids.append(int(entry))
    return pids


def test_runs_a_normal_program():
    r = run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "1 2 3", FAST)
    assert (r.returncode, r.stdout, r.timed_out) == (0, "6\n", False)


@pytest.mark.parametrize("source", ["while True:\n    pass\n",
                                    pytest.param("import time\ntime.sleep(60)\n", marks=pytest.mark.slow)])
def test_infinite_loop_is_killed(source):
    start = time.monotonic()
    r = run_python(source, "", FAST)
    assert r.returncode != 0
    assert time.monotonic() - start < FAST.wall_seconds + 10


@pytest.mark.parametrize("audit_hook", [True, False])
def test_fork_bomb_is_contained(audit_hook):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    r = run_python(bomb, "", FAST, audit_hook=audit_hook)
    assert r.returncode != 0
    assert time.monotonic() - start < FAST.wall_seconds + 10
    if CAPS.per_run_uid:
        assert live_sandbox_processes() == []  # every forked child was killed
    assert os.fork  # and we can still fork ourselves
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


def test_memory_bomb_fails_inside_the_sandbox():
    r = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n", "", FAST, audit_hook=False)
    assert r.returncode != 0 and "MemoryError" in r.stderr
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # our own limits untouched
    big = bytearray(300 << 20)  # more than the sandbox's whole address space: fine here
    assert len(big) == 300 << 20


def test_output_flood_is_capped():
    r = run_python("while True:\n    print('x' * 1000)\n", "", FAST)
    assert r.returncode != 0 and len(r.stdout) <= FAST.output_bytes


def test_writing_outside_its_directory_is_refused(tmp_path):
    os.chmod(tmp_path, 0o777)  # world-writable, like /tmp: only the audit hook guards it
    targets = [tmp_path / "escaped.txt", Path(__file__).with_name("escaped.txt")]
    for target in targets:
        r = run_python(f"open({str(target)!r}, 'w').write('pwned')", "", FAST)
        assert r.returncode != 0 and "sandbox: writing outside" in r.stderr
        assert not target.exists()
    # Inside its own directory writing is allowed (scratch files), and the directory is removed afterwards.
    r = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd())", "", FAST)
    assert r.returncode == 0 and not Path(r.stdout.strip()).exists()


@needs_root_layers
def test_unprivileged_uid_cannot_write_our_files_even_without_the_hook():
    target = Path(__file__).with_name("escaped.txt")
    r = run_python(f"open({str(target)!r}, 'w').write('pwned')", "", FAST, audit_hook=False, isolation="off")
    assert r.returncode != 0 and "PermissionError" in r.stderr and not target.exists()


@pytest.mark.parametrize("audit_hook", [True, pytest.param(False, marks=needs_root_layers)])
def test_socket_cannot_reach_a_listening_server(audit_hook):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        r = run_python(program, "", FAST, audit_hook=audit_hook, isolation="off")
        assert r.returncode != 0 and "connected" not in r.stdout
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever arrived
    finally:
        server.close()
    # The trainer's own networking still works.
    with socket.create_server(("127.0.0.1", 0)) as s2:
        socket.create_connection(s2.getsockname()).close()


def test_subprocess_and_ctypes_are_refused():
    for program in ["import subprocess\nsubprocess.run(['ls'])", "import os\nos.system('ls')",
                    "import ctypes\nctypes.CDLL(None)"]:
        r = run_python(program, "", FAST)
        assert r.returncode != 0 and "sandbox:" in r.stderr, program
