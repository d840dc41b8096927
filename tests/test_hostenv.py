"""The allocator re-exec of the command-line entry points (codegen_jax/hostenv.py)."""

import os
import subprocess
import sys

import pytest

from codegen_jax import hostenv

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
THP_MADVISE = os.path.exists(THP) and "[madvise]" in open(THP).read()  # else there is nothing to ask for


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT)}


def test_no_tunable_without_madvise_huge_pages():
    if THP_MADVISE:
        pytest.skip("transparent huge pages are in madvise mode here: the re-exec applies")
    assert hostenv.tuned_environ(_clean_env()) is None


def test_tuned_environ_appends_once_and_respects_the_user():
    if not THP_MADVISE:
        pytest.skip("transparent huge pages are not in madvise mode here: nothing to re-exec for")
    env = _clean_env()
    tuned = hostenv.tuned_environ(env)
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


def test_libtpu_is_kept_quiet_only_without_a_tpu(monkeypatch):
    import importlib.util

    env: dict[str, str] = {}
    monkeypatch.setattr(hostenv, "has_tpu_device", lambda: True)
    hostenv.quiet_libtpu_without_tpu(env)
    assert env == {}  # a TPU VM: libtpu must find its real chips
    monkeypatch.setattr(hostenv, "has_tpu_device", lambda: False)
    env = {"TPU_ACCELERATOR_TYPE": "v6e-8"}
    hostenv.quiet_libtpu_without_tpu(env)
    if importlib.util.find_spec("libtpu") is None:
        assert env == {"TPU_ACCELERATOR_TYPE": "v6e-8"}
    else:
        assert env["TPU_SKIP_MDS_QUERY"] == "1" and env["TPU_ACCELERATOR_TYPE"] == "v6e-8"  # the user's kept
    proc = subprocess.run([sys.executable, "-c", "import codegen_jax, jax; print(jax.devices()[0].platform)"],
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                if not k.startswith("TPU_")}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu" and proc.stderr == "", proc.stderr[-2000:]
