"""Sandbox harness: the program `sandbox.run_program` starts, one per candidate program.

It is run as ``python -I -S -B _harness.py`` (stdlib only, never imports codegen_jax) in a fresh
session, reads its whole configuration as one JSON object on stdin, and then:

H (this process; root or the invoking user, trusted)
    enters new namespaces where the kernel allows (network, mount, pid), makes the shared
    world-writable directories private size-capped tmpfs mounts, forks C and waits for it with a
    wall-clock deadline, and reports on the control pipe (which user code never holds):
    ``namespaces <list>``, ``pid <C>``, ``timeout``, ``reaped``, ``exit <code>``.
C (trusted; pid 1 of the new pid namespace when there is one)
    mounts a /proc of its own, forks D, reaps every orphan, and exits with D's exit code
    (128 + signal when killed). When it exits the kernel kills whatever is left in the
    namespace, fork bombs included. Without a pid namespace C runs the user code itself (there
    is no D) and H, a child subreaper, kills its whole subtree before it exits.
D (untrusted from the moment user code starts)
    sets rlimits, drops privileges (to the sandbox uid when started as root), installs the socket
    guard when there is no private network, executes ``prompt + completion`` and then ``test``
    with a fresh copy of the builtins, calls ``check(entry_point)`` itself, and only then writes
    ``{"nonce", "status", "detail"}`` to the result pipe. The nonce is known to nothing but the
    harness, so an early ``sys.exit(0)``/``os._exit(0)`` or forged output never counts as a pass.

User-visible failures are reported as statuses; a bug in this file shows up on H's stderr.
"""

import builtins
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
DETAIL_CHARS = 2000

# Captured before any user code runs: user code may monkeypatch builtins, os, sys, json.
_PRISTINE_BUILTINS = dict(builtins.__dict__)
_write, _exit, _getpid, _close = os.write, os._exit, os.getpid, os.close
_dumps, _settrace, _setprofile = json.dumps, sys.settrace, sys.setprofile
_BaseException, _AssertionError, _SyntaxError = BaseException, AssertionError, SyntaxError
_ValueError, _type, _str, _dict = ValueError, type, str, dict
_compile, _exec = compile, exec

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags):
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _mount(source, target, fstype, flags, data):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    return _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def enter_namespaces(cfg):
    """Unshare what the kernel allows; returns the set of namespaces obtained."""
    got = set()
    if not cfg["namespaces"]:
        return got
    if os.geteuid() == 0:
        if _unshare(CLONE_NEWNET):
            got.add("net")
        if _unshare(CLONE_NEWNS):
            got.add("mnt")
        if _unshare(CLONE_NEWPID):
            got.add("pid")
    elif _unshare(CLONE_NEWUSER | CLONE_NEWNET):
        got.update({"user", "net"})
    if "mnt" in got and not private_tmp_mounts(cfg):
        got.discard("mnt")
    return got


def private_tmp_mounts(cfg):
    """Replace the shared world-writable dirs and the workdir by private size-capped tmpfs."""
    # Propagation must be private before any mount, or the mounts would leak to the host.
    if not _mount(None, "/", None, MS_REC | MS_PRIVATE, None):
        return False
    size = cfg["limits"]["tmpfs_bytes"]
    ok = True
    for path in SHARED_WRITABLE_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            ok &= _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},nr_inodes=4096,mode=1777")
    workdir = cfg["workdir"]
    if os.path.isdir(workdir):  # not under a dir just covered: cover the workdir itself
        ok &= _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},nr_inodes=4096,mode=0700")
    else:
        os.makedirs(workdir, mode=0o700)
    if cfg["uid"] is not None:
        os.chown(workdir, cfg["uid"], cfg["gid"])
    return ok


def set_limits(limits):
    """Soft and hard limits; never above the current hard limit (non-root cannot raise it)."""
    cpu = limits["cpu_s"]
    for res, (soft, hard) in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (limits["as_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (limits["fsize_bytes"],) * 2),
        (resource.RLIMIT_NPROC, (limits["nproc"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["nofile"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        cur_hard = resource.getrlimit(res)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(res, (soft, hard))


def drop_privileges(uid, gid):
    """As root: become uid/gid with no groups. Import paths are kept reachable through fds
    opened now, since the interpreter may live under a directory only root can search."""
    moved = {}
    for i, entry in enumerate(sys.path):
        if os.path.isdir(entry):
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            moved[entry] = sys.path[i] = f"/proc/self/fd/{fd}"
    for module in list(sys.modules.values()):  # packages imported already: submodule lookups
        search = getattr(module, "__path__", None)
        if isinstance(search, list):
            for j, entry in enumerate(search):
                for old, new in moved.items():
                    if entry == old or entry.startswith(old + os.sep):
                        search[j] = new + entry[len(old):]
                        break
    sys.path_importer_cache.clear()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise RuntimeError("could not drop privileges")


def install_socket_guard():
    """No private network namespace: make socket creation fail before user code runs."""
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the sandbox")

    class GuardedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    for mod in (socket, _socket):
        for name in ("socket", "SocketType"):
            if hasattr(mod, name):
                setattr(mod, name, GuardedSocket)
        for name in ("socketpair", "fromfd", "create_connection", "create_server", "dup"):
            if hasattr(mod, name):
                setattr(mod, name, refuse)


def describe(exc):
    try:
        message = _str(exc)
        text = f"{_type(exc).__name__}: {message}" if message else _type(exc).__name__
    except _BaseException:
        text = "<exception that cannot be printed>"
    return text[:DETAIL_CHARS]


def run_user_code(cfg):
    """Execute the program; returns (status, detail). Runs after privileges are dropped."""
    namespace = {"__name__": "__candidate__", "__builtins__": _dict(_PRISTINE_BUILTINS)}
    try:
        code = _compile(cfg["code"], "<candidate>", "exec")
        test = _compile(cfg["test"], "<test>", "exec")
    except (_SyntaxError, _ValueError) as exc:
        return "syntax", describe(exc)
    try:
        _exec(code, namespace)
        # The tests and check() see untouched builtins and no tracer installed by the candidate.
        namespace["__builtins__"] = _dict(_PRISTINE_BUILTINS)
        _settrace(None)
        _setprofile(None)
        _exec(test, namespace)
        entry = cfg["entry_point"]
        if entry:
            check, candidate = namespace["check"], namespace[entry]
            _settrace(None)
            _setprofile(None)
            check(candidate)
    except _AssertionError as exc:
        return "assertion", describe(exc)
    except _BaseException as exc:
        return "exception", describe(exc)
    return "passed", ""


def user_process(cfg, result_fd, need_guard):
    """D: from here on nothing is trusted. Never returns."""
    pid = _getpid()
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.chdir(cfg["workdir"])
        set_limits(cfg["limits"])
        if cfg["uid"] is not None:
            drop_privileges(cfg["uid"], cfg["gid"])
        if need_guard:
            install_socket_guard()
        status, detail = run_user_code(cfg)
    except _BaseException as exc:  # setup failure or an escape from run_user_code
        status, detail = "exception", describe(exc)
    if _getpid() != pid:  # a process forked by the candidate never reports
        _exit(1)
    try:
        msg = _dumps({"nonce": cfg["nonce"], "status": status, "detail": detail}) + "\n"
        _write(result_fd, msg.encode("utf-8", "replace"))
    finally:
        _exit(0 if status == "passed" else 1)


def exit_code(wait_status):
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


def init_process(cfg, result_fd, private_mounts):
    """C as pid 1 of the new namespace: run D, reap orphans, exit with D's code."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if private_mounts:  # a /proc that shows only this namespace's processes (best effort)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    child = os.fork()
    if child == 0:
        user_process(cfg, result_fd, need_guard=False)
    _close(result_fd)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            _exit(1)
        if pid == child:
            _exit(exit_code(status))


def _descendants():
    """Every live process under H (orphans come back to H, the child subreaper)."""
    found, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def sweep():
    """Without a pid namespace: kill the whole subtree (setsid does not leave it) round after
    round until H has no children left. A fork bomb converges: each round kills every process
    it sees, and a process with SIGKILL pending cannot complete a fork."""
    for _ in range(2000):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        for pid in _descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        select.select([], [], [], 0.002)


def wait_exit(pid, timeout):
    """True once ``pid`` (our child) has exited, False at the timeout; it is not reaped."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # kernel < 5.3: poll without reaping
        deadline = time.monotonic() + timeout
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def supervise(cfg, child, ctl_fd, pid_namespace):
    """H: wait for C until the deadline, killing it (and so its pid namespace) on timeout."""
    os.write(ctl_fd, f"pid {child}\n".encode())
    if not wait_exit(child, cfg["timeout"]):
        os.kill(child, signal.SIGKILL)
        os.write(ctl_fd, b"timeout\n")
    _, status = os.waitpid(child, 0)
    os.write(ctl_fd, b"reaped\n")
    if not pid_namespace:
        sweep()
    os.write(ctl_fd, f"exit {exit_code(status)}\n".encode())
    return exit_code(status)


def main():
    cfg = json.loads(sys.stdin.buffer.read())
    result_fd, ctl_fd = cfg["result_fd"], cfg["ctl_fd"]
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    got = enter_namespaces(cfg)
    os.write(ctl_fd, f"namespaces {','.join(sorted(got)) or '-'}\n".encode())
    child = os.fork()
    if child == 0:
        _close(ctl_fd)
        if "pid" in got:
            init_process(cfg, result_fd, private_mounts="mnt" in got)
        user_process(cfg, result_fd, need_guard="net" not in got)
    _close(result_fd)
    sys.exit(supervise(cfg, child, ctl_fd, pid_namespace="pid" in got))


if __name__ == "__main__":
    main()
