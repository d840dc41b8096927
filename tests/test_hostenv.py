"""The allocator re-exec of the command-line entry points (codegen_jax/hostenv.py)."""

import os
import subprocess
import sys

from codegen_jax import hostenv

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
THP_MADVISE = os.path.exists(THP) and "[madvise]" in open(THP).read()  # else there is nothing to ask for


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}


def test_tuned_environ_appends_once_and_respects_the_user():
    env = _clean_env()
    tuned = hostenv.tuned_environ(env)
    if not THP_MADVISE:
        assert tuned is None
        return
    assert tuned["GLIBC_TUNABLES"] == hostenv.TUNABLE
    assert hostenv.tuned_environ(tuned) is None  # after the re-exec: no second one
    other = hostenv.tuned_environ({**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert other["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hostenv.TUNABLE}"
    assert hostenv.tuned_environ({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # user's
    assert hostenv.tuned_environ({**env, hostenv.OPT_OUT: "0"}) is None


def test_reexec_keeps_pid_and_argv_and_sets_the_tunable():
    code = ("import os, sys; from codegen_jax.hostenv import reexec_with_tuned_malloc; "
            "reexec_with_tuned_malloc(); print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, "a b", "c"], env=_clean_env(),
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    pid, tunables, argv = out.split(" ", 2)
    assert int(pid) == proc.pid  # exec, not a child: signals (SIGTERM saves a checkpoint) reach the trainer
    assert tunables == (hostenv.TUNABLE if THP_MADVISE else "None")
    assert argv.strip() == "['a b', 'c']"
