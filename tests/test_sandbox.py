"""Sandbox: verdicts, and adversarial programs contained and counted as failures.

Every adversarial program is "attack, then a correct solution", so a pass would mean the attack
went through unnoticed. As root (here and in CI) the user code runs under a random uid that no
other process uses, so "no process of the sandbox uid is left" is an exact check.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time

import pytest

from codegen_jax.eval.sandbox import Limits, SandboxResult, run_program

IS_ROOT = os.geteuid() == 0
UID = random.randint(3_000_000, 3_999_999) if IS_ROOT else None
TEST = "def check(candidate):\n    assert candidate(1) == 2\n    assert abs(candidate(2) - 3) < 1e-9\n"
GOOD = "def f(x):\n    return x + 1\n"
NS = Limits(uid=UID)
FALLBACK = Limits(uid=UID, namespaces=False)
PROBE = run_program("pass", limits=NS)
HAS_NAMESPACES = {"net", "mnt", "pid"} <= set(PROBE.isolation)
needs_ns = pytest.mark.skipif(not HAS_NAMESPACES, reason=f"kernel gave only {PROBE.isolation}")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="privilege drop (and so NPROC for root) needs root")
MODES = [pytest.param(NS, id="namespaces", marks=needs_ns),
         pytest.param(FALLBACK, id="fallback", marks=needs_root)]


def run(attack: str, limits: Limits = NS, timeout: float = 3.0, code: str = GOOD) -> SandboxResult:
    return run_program(attack + "\n" + code, TEST, "f", timeout=timeout, limits=limits)


def sandbox_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    uid_line = next(line for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            if int(uid_line.split()[1]) == UID:
                pids.append(int(entry))
    return pids


def assert_no_leftovers():
    assert IS_ROOT
    deadline = time.monotonic() + 2.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


# --- verdicts -------------------------------------------------------------------------------


def test_pass_and_failure_types():
    assert run_program(GOOD, TEST, "f").status == "passed"
    assert run_program("def f(x):\n    return x\n", TEST, "f").status == "assertion"
    result = run_program("def f(x):\n    return 1 / 0\n", TEST, "f")
    assert (result.status, result.detail) == ("exception", "ZeroDivisionError: division by zero")
    assert run_program("def f(x):\n    return (x +\n", TEST, "f").status == "syntax"
    assert run_program(GOOD, "def check(c):\n  assert (", "f").status == "syntax"
    assert run_program("def g(x):\n    return x\n", TEST, "f").status == "exception"  # no entry point
    assert run_program(GOOD, "", "f").status == "exception"  # no check()


def test_without_entry_point_the_program_must_run_to_the_end():
    assert run_program("x = 1", "assert x == 1").passed
    assert run_program("x = 1", "assert x == 2").status == "assertion"


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run("def f(x):\n    while True:\n        pass\n", code="", timeout=1.0)
    assert result.status == "timeout"
    assert time.monotonic() - start < 6


def test_sleeping_forever_times_out():
    assert run("import time\ntime.sleep(1000)", timeout=1.0).status == "timeout"


def test_stdlib_is_importable_and_output_is_discarded():
    code = "import collections.abc, hashlib, math, re, json, itertools, fractions\nprint('x' * 10**6)\n"
    assert run(code).passed


@needs_root
def test_runs_unprivileged_in_a_fresh_empty_dir_with_a_stripped_env():
    probe = ("import os, json\nraise AssertionError(json.dumps([os.getuid(), os.getgid(), os.getgroups(), "
             "os.getcwd(), os.listdir('.'), dict(os.environ)]))")
    result = run_program(probe)
    assert result.status == "assertion"
    import json

    uid, gid, groups, cwd, listing, env = json.loads(result.detail.split(": ", 1)[1])
    assert (uid, gid, groups, listing) == (65534, 65534, [], [])
    assert set(env) == {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL"}
    assert env["HOME"] == cwd and os.path.basename(cwd).startswith("codegen-jax-sandbox-")
    assert not os.path.exists(cwd)  # removed afterwards


# --- adversarial programs --------------------------------------------------------------------


@pytest.mark.parametrize("limits", MODES)
@pytest.mark.parametrize("setsid", [False, True], ids=["plain", "setsid"])
def test_fork_bomb_is_contained(limits, setsid):
    escape = "        if os.fork() == 0:\n            os.setsid()\n" if setsid else "        os.fork()\n"
    attack = f"import os\nwhile True:\n    try:\n{escape}    except OSError:\n        pass\n"
    result = run(attack, limits, timeout=1.5)
    assert not result.passed and result.status in ("timeout", "exception")
    assert_no_leftovers()


@pytest.mark.parametrize("limits", MODES)
def test_shell_fork_bomb_and_sleepers_are_killed(limits):
    attack = ("import os, time\nos.system(':(){ :|:& };:')\n"
              "for _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(1000)\n")
    run(attack, limits, timeout=1.5)
    assert_no_leftovers()


@pytest.mark.parametrize("limits", MODES)
def test_memory_bomb(limits):
    result = run("x = b'x' * (8 * 2**30)", limits)
    assert (result.status, result.detail) == ("exception", "MemoryError")
    gradual = run("x = []\nwhile True:\n    x.append(bytearray(2**26))", limits, timeout=5)
    assert not gradual.passed and gradual.status in ("exception", "timeout")


@pytest.mark.parametrize("limits", MODES)
def test_huge_file_write(limits, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run("with open('big', 'wb') as f:\n    for _ in range(64):\n        f.write(bytes(2**20))", limits)
    assert result.status == "exception" and "File too large" in result.detail
    assert os.listdir(tmp_path) == []  # the working directory is gone


@needs_ns
def test_many_files_hit_the_private_tmpfs_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    attack = "for i in range(100):\n    with open(f'f{i}', 'wb') as f:\n        f.write(bytes(2**20))"
    result = run(attack)
    assert result.status == "exception" and "No space left" in result.detail
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("limits", MODES)
def test_rm_rf_home_against_a_decoy_home(limits, tmp_path, monkeypatch):
    decoy = tmp_path / "home"
    (decoy / ".ssh").mkdir(parents=True)
    (decoy / ".ssh" / "id_ed25519").write_text("secret")
    monkeypatch.setenv("HOME", str(decoy))
    attack = (f"import os, shutil\nos.system('rm -rf ~ ~/.ssh')\nshutil.rmtree(os.path.expanduser('~'))\n"
              f"shutil.rmtree({str(decoy)!r})")
    assert not run(attack, limits).passed
    assert (decoy / ".ssh" / "id_ed25519").read_text() == "secret"
    env = run_program("import os\nraise AssertionError(repr(dict(os.environ)))", limits=limits)
    assert str(decoy) not in env.detail


@pytest.mark.parametrize("limits", MODES)
def test_writing_outside_the_temp_dir(limits, tmp_path):
    target = tmp_path / "outside"
    target.mkdir()
    target.chmod(0o755)
    attack = f"open({str(target / 'pwned')!r}, 'w').write('x')"
    assert run(attack, limits).status == "exception"
    assert os.listdir(target) == []


@needs_ns
def test_other_processes_are_invisible():
    result = run_program("import os\nraise AssertionError(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert result.detail == "AssertionError: [1, 2]"  # the namespace's init and the program


@needs_ns
def test_shared_tmp_dirs_are_private():
    name = f"codegen-jax-escape-{random.getrandbits(64):x}"
    attack = "".join(f"open('{d}/{name}', 'w').write('x')\n" for d in ("/tmp", "/var/tmp", "/dev/shm"))
    run(attack + "raise ValueError")
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        assert not os.path.exists(f"{d}/{name}")


@pytest.mark.parametrize("limits", MODES)
def test_no_network_to_localhost(limits):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        attack = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'pwned')"
        result = run(attack, limits)
        assert result.status == "exception"
        with pytest.raises(TimeoutError):
            server.accept()


@pytest.mark.parametrize("limits", MODES)
@pytest.mark.parametrize("attack", [
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "raise SystemExit(0)",
    "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"nonce\": \"0\", \"status\": \"passed\"}\\n')\n"
    "    except OSError:\n        pass\nos._exit(0)",
    "import atexit, os\natexit.register(os._exit, 0)\nraise ValueError('then exit 0 at exit')",
    "import os\nif os.fork():\n    os._exit(0)",  # the child runs the tests, the parent exits 0 first
], ids=["sys.exit", "os._exit", "SystemExit", "forged-report", "atexit", "fork-exit"])
def test_exit_before_the_tests_is_a_failure(limits, attack):
    assert not run(attack, limits, code="def f(x):\n    return 0\n").passed
    assert not run(attack, limits).passed  # even with a correct solution after it


@pytest.mark.parametrize("limits", MODES)
def test_killing_the_parent(limits):
    assert not run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", limits).passed
    assert not run("import os, signal\nos.killpg(0, signal.SIGKILL)", limits).passed
    # kill(-1) signals every process the caller may signal, never the evaluator: alone in its pid
    # namespace the program finds none (ProcessLookupError); under its own uid it signals only itself's
    # kin, of which there are none, and the tests then pass
    expected = "exception" if limits.namespaces else "passed"
    assert run("import os, signal\nos.kill(-1, signal.SIGKILL)", limits).status == expected
    if IS_ROOT:  # unprivileged user code: the evaluator cannot be hit (else this test dies)
        assert not run(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", limits).passed


WRONG = "def f(x):\n    return 0\n"


@pytest.mark.parametrize("attack", [
    "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.AssertionError = Warning\nbuiltins.dict = lambda *a: {}",
    "__builtins__['abs'] = lambda x: 0",
    "import sys\nsys.settrace(lambda *a: None)\nsys.setprofile(lambda *a: None)",
    # a tracer that jumps over every line of check() (this cheat passes with plain exec)
    "import sys\ndef _local(frame, event, arg):\n    if event == 'line':\n"
    "        last = max(l for _, _, l in frame.f_code.co_lines() if l)\n"
    "        if frame.f_lineno != last:\n            frame.f_lineno = last\n    return _local\n"
    "sys.settrace(lambda frame, event, arg: _local if frame.f_code.co_name == 'check' else None)",
], ids=["builtins-module", "builtins-dict", "trace-hooks", "jump-tracer"])
def test_monkeypatching_assert_related_builtins(attack):
    test = "def check(candidate):\n    assert abs(candidate(1) - 2) < 1e-9\n    assert candidate(2) == 3\n    return\n"
    result = run_program(attack + "\n" + WRONG, test, "f")
    assert result.status == "assertion"


def test_parallel_runs_are_independent():
    from concurrent.futures import ThreadPoolExecutor

    programs = [GOOD if i % 2 else WRONG for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda code: run_program(code, TEST, "f"), programs))
    assert [r.passed for r in results] == [bool(i % 2) for i in range(8)]


def test_works_without_pidfd(monkeypatch):
    monkeypatch.delattr("os.pidfd_open")  # the evaluator side polls waitid(WNOWAIT) instead
    assert run_program(GOOD, TEST, "f").passed
    assert run("import time\ntime.sleep(1000)", timeout=0.5).status == "timeout"


# --- started by an unprivileged user (no privilege drop; a user namespace instead) ----------

_UNPRIVILEGED = r'''
import json, socket, sys
from codegen_jax.eval.sandbox import run_program
TEST, GOOD, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
attacks = {
    "good": "",
    "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')",
    "fork-bomb": "import os\nwhile True:\n    os.fork()",
    "busy-loop": "while True:\n    pass",
}
out = {}
for name, attack in attacks.items():
    r = run_program(attack + "\n" + GOOD, TEST, "f", timeout=2.0)
    out[name] = [r.status, list(r.isolation)]
print(json.dumps(out))
'''


@needs_root
def test_started_by_an_unprivileged_user():
    """The evaluator run as uid 65534 (no root, so no privilege drop): verdicts are the same and
    the attacks are contained, by a user + network namespace where the kernel allows one."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    # the sandbox and harness are stdlib-only: copy them where an unprivileged user can read them,
    # and run them with an interpreter outside /root (the venv's base may not be readable)
    pkg = Path(__file__).resolve().parents[1] / "codegen_jax"
    tmp_path = Path(tempfile.mkdtemp(prefix="codegen-jax-unprivileged-"))  # pytest's tmp is root-only
    (tmp_path / "codegen_jax" / "eval").mkdir(parents=True)
    for rel in ("__init__.py", "hostenv.py", "eval/__init__.py", "eval/sandbox.py", "eval/_harness.py"):
        shutil.copy(pkg / rel, tmp_path / "codegen_jax" / rel)
    os.chmod(tmp_path, 0o755)
    for p in tmp_path.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                               _UNPRIVILEGED, TEST, GOOD, str(server.getsockname()[1])],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path)})
        shutil.rmtree(tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with pytest.raises(TimeoutError):
            server.accept()  # nothing got through
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["good"][0] == "passed"
    assert out["network"][0] == "exception" and out["fork-bomb"][0] == "exception"
    assert out["busy-loop"][0] == "timeout"
    if "user" in out["good"][1]:
        assert "net" in out["good"][1]
