"""Run one untrusted program (prompt + completion, then its tests) and classify the outcome.

This module owns process isolation for the evaluator. The evaluator's own process never executes
candidate code: `run_program` starts `_harness.py` in a fresh interpreter (``python -I -S -B``,
stdlib only) and a new session, and the harness does the isolating (see its docstring for the
process tree). What each program gets:

- its own subprocess tree, killed as a whole on a wall-clock timeout: a new pid namespace when
  the kernel allows (killing its init kills everything in it, even processes that called
  setsid), otherwise the process group;
- rlimits: CPU seconds, address space, file size, process count, open files, no core dumps;
- when started as root: the user code runs as an unprivileged uid (``nobody`` by default), since
  RLIMIT_NPROC is not enforced for root and root could write anywhere;
- a fresh temporary working directory (``$HOME`` and ``$TMPDIR`` point there), removed afterwards;
  with a private mount namespace it and ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock`` are
  private size-capped tmpfs mounts that vanish with the program;
- a stripped environment (PATH, HOME, TMPDIR, LANG only);
- no network: a new network namespace (no interfaces up, not even loopback) where the kernel
  allows, otherwise socket creation is disabled in Python before user code runs;
- a verdict that counts as a pass only when the harness itself has called ``check(entry_point)``
  and it returned, proven by a per-run random nonce on a private pipe, and the program then
  exited with status 0. ``sys.exit(0)`` or ``os._exit(0)`` before the tests is a failure.

Statuses: ``passed``, ``assertion`` (an AssertionError, i.e. a failed test), ``exception`` (any
other error, a crash, a kill by a limit other than CPU, an early exit), ``timeout`` (wall clock or
CPU limit) and ``syntax`` (the program or its test does not compile).

The tests and ``check`` run with a fresh copy of the builtins and with trace/profile hooks
removed, so monkeypatching ``builtins`` (``abs``, ``AssertionError``, ...) or a ``sys.settrace``
hook that jumps over asserts does not turn a failure into a pass.

Limits of the guarantees: code written to defeat the checker from inside the interpreter (walking
frames or ``gc`` to read the nonce, objects whose ``__eq__`` is always true, patching modules the
tests import) can still produce a false pass; it cannot escape the sandbox. Without namespaces
(kernel refuses them, or ``Limits(namespaces=False)``) the socket guard is Python-level (ctypes or
class introspection can get around it), ``/tmp`` is the shared one (files written there are not
removed), and programs sharing the sandbox uid could signal each other. Not enforced at all:
total memory across a program's processes (RLIMIT_AS is per process; NPROC bounds the count).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from codegen_jax.eval._harness import wait_exit as _wait_exit  # the harness is stdlib-only: safe to share

HARNESS = Path(__file__).with_name("_harness.py")
STATUSES = ("passed", "assertion", "exception", "timeout", "syntax")
NOBODY = 65534
STARTUP_GRACE_S = 20.0  # extra wall clock the harness gets to start before the evaluator kills it
MAX_REPORT_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits for one program. ``uid``/``gid`` apply only when the evaluator is root."""

    as_bytes: int = 1 << 30  # RLIMIT_AS (virtual memory)
    fsize_bytes: int = 16 << 20  # RLIMIT_FSIZE (largest file it may write)
    nproc: int = 64  # RLIMIT_NPROC (processes + threads of the sandbox uid)
    nofile: int = 256  # RLIMIT_NOFILE
    tmpfs_bytes: int = 64 << 20  # size of each private tmpfs (workdir, /tmp, ...)
    uid: int | None = None  # sandbox uid when running as root (default: nobody, 65534)
    gid: int | None = None  # default: same number as the uid
    namespaces: bool = True  # False: rlimits + privilege drop + socket guard only


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: str  # one of STATUSES
    detail: str = ""  # exception text, signal, or why it timed out
    duration_s: float = 0.0
    isolation: tuple[str, ...] = ()  # namespaces obtained: "net", "mnt", "pid", "user"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def sandbox_ids(limits: Limits) -> tuple[int | None, int | None]:
    """(uid, gid) the user code runs as; (None, None) when not root (no change possible)."""
    if os.geteuid() != 0:
        return None, None
    uid = NOBODY if limits.uid is None else limits.uid
    return uid, uid if limits.gid is None else limits.gid


def run_program(
    code: str,
    test: str = "",
    entry_point: str | None = None,
    *,
    timeout: float = 3.0,
    limits: Limits | None = None,
) -> SandboxResult:
    """Run ``code`` then ``test`` and, when ``entry_point`` is given, ``check(<entry_point>)``.

    Without ``entry_point`` the program passes when ``code`` and ``test`` run to the end.
    ``timeout`` is wall-clock seconds for the user code (interpreter start-up not included).
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("the sandbox needs Linux (namespaces, rlimits, /proc)")
    limits = limits or Limits()
    uid, gid = sandbox_ids(limits)
    workdir = tempfile.mkdtemp(prefix="codegen-jax-sandbox-")
    try:
        os.chmod(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, gid)
        cfg = {
            "code": code, "test": test, "entry_point": entry_point or "",
            "workdir": workdir, "uid": uid, "gid": gid, "timeout": float(timeout),
            "namespaces": limits.namespaces, "nonce": secrets.token_hex(16),
            "limits": {
                "as_bytes": limits.as_bytes, "fsize_bytes": limits.fsize_bytes,
                "nproc": limits.nproc, "nofile": limits.nofile,
                "tmpfs_bytes": limits.tmpfs_bytes, "cpu_s": math.ceil(timeout) + 1,
            },
        }
        return _launch(cfg)
    finally:
        _remove_tree(workdir)


def _remove_tree(path: str) -> None:
    """rmtree that also copes with dirs the program made unreadable (matters when not root)."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, _ in os.walk(path):  # top-down: a dir is made searchable before the descent
        for name in [root, *(os.path.join(root, d) for d in dirs)]:
            try:
                os.chmod(name, 0o700, follow_symlinks=False)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def sandbox_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _launch(cfg: dict) -> SandboxResult:
    start = time.monotonic()
    res_r, res_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    cfg.update(result_fd=res_w, ctl_fd=ctl_w)
    try:
        with tempfile.TemporaryFile() as errfile:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", str(HARNESS)],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errfile,
                    pass_fds=(res_w, ctl_w), start_new_session=True, cwd=cfg["workdir"],
                    env=sandbox_env(cfg["workdir"]),
                )
            finally:
                os.close(res_w)
                os.close(ctl_w)
            killed = _feed_and_wait(proc, cfg, ctl_r)
            errfile.seek(0)
            stderr = errfile.read(8192).decode("utf-8", "replace")
        ctl = _read_available(ctl_r).decode("utf-8", "replace").split("\n")
        report = _find_report(_read_available(res_r), cfg["nonce"])
    finally:
        os.close(res_r)
        os.close(ctl_r)
    result = _classify(ctl, report, killed, proc.returncode, stderr, cfg["timeout"])
    return dataclasses.replace(result, duration_s=time.monotonic() - start)


def _feed_and_wait(proc: subprocess.Popen, cfg: dict, ctl_r: int) -> bool:
    """Send the config, wait for the harness; returns True if the evaluator had to kill it."""
    try:
        proc.stdin.write(json.dumps(cfg).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    ready = _wait_exit(proc.pid, cfg["timeout"] + STARTUP_GRACE_S)
    if not ready:  # the harness itself is stuck: kill its child (the pid namespace's init)
        ctl = _peek(ctl_r).split("\n")
        pids = [int(line.split()[1]) for line in ctl if line.startswith("pid ")]
        if pids and "reaped" not in ctl:  # not reaped yet, so the pid cannot have been reused
            _kill(lambda: os.kill(pids[0], signal.SIGKILL))
    # The harness has not been reaped yet, so its process group id cannot have been reused:
    # kill whatever is left in the group (stragglers only exist without a pid namespace).
    _kill(lambda: os.killpg(proc.pid, signal.SIGKILL))
    proc.wait()
    return not ready


def _kill(fn) -> None:
    try:
        fn()
    except (ProcessLookupError, PermissionError):
        pass


def _set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def _read_available(fd: int) -> bytes:
    """Whatever is in the pipe now, without waiting for writers that may still be alive."""
    _set_nonblocking(fd)
    chunks, total = [], 0
    while total < MAX_REPORT_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _peek(fd: int) -> str:
    return _read_available(fd).decode("utf-8", "replace")


def _find_report(data: bytes, nonce: str) -> dict | None:
    for line in data.split(b"\n"):
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("nonce") == nonce:
            return msg
    return None


def _classify(ctl, report, killed, returncode, stderr, timeout) -> SandboxResult:
    namespaces = next((line.split()[1] for line in ctl if line.startswith("namespaces ")), "-")
    isolation = tuple(n for n in namespaces.split(",") if n and n != "-")
    exits = [int(line.split()[1]) for line in ctl if line.startswith("exit ")]
    if killed or "timeout" in ctl:
        return SandboxResult("timeout", f"exceeded the {timeout:g} s wall-clock limit", 0.0, isolation)
    if not exits:
        raise RuntimeError(f"sandbox harness failed (exit {returncode}): {stderr.strip()[-2000:]}")
    code = exits[-1]
    if report is not None and report.get("status") in STATUSES:
        status, detail = report["status"], str(report.get("detail", ""))
        if status == "passed" and code != 0:
            status, detail = "exception", f"exit code {code} after the tests passed"
        return SandboxResult(status, detail, 0.0, isolation)
    if code > 128:
        sig = code - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGXCPU:
            return SandboxResult("timeout", "CPU time limit exceeded (SIGXCPU)", 0.0, isolation)
        return SandboxResult("exception", f"killed by {name}", 0.0, isolation)
    return SandboxResult("exception", f"exited with code {code} before the check ran", 0.0, isolation)
