"""Process settings that only take effect at interpreter start: glibc's malloc on transparent huge pages,
and libtpu kept quiet on machines without a TPU.

Why: XLA:CPU allocates each execution's buffers afresh. glibc serves large blocks with mmap and hands
them back at free, so every training step faults every 4 KiB page in again: about 190k page faults and
0.3 s of kernel time per step of the tiny config on 2 cores; the step takes 15-30% longer. With
`glibc.malloc.hugetlb=1` glibc asks for transparent huge pages (2 MiB), and the faults drop ~190x (to ~1k).
Allocator tunables are read once at process start, hence a re-exec (same pid, argv and environment
plus the tunable) at the top of the command-line entry points, before anything is imported or printed.
JAX deployments often preload tcmalloc (`LD_PRELOAD`) for the same reason; this needs nothing installed.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "CODEGEN_JAX_MALLOC_TUNING"  # set to 0 to keep the process's allocator settings as they are
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def tuned_environ(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-exec with, or None when there is nothing to do: not glibc, opted out,
    the tunable already set (by us or by the user), or huge pages not in `madvise` mode (with
    `always` the kernel already uses them, with `never` asking is useless)."""
    if environ.get(OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        with open(_THP_MODE) as f:
            if "[madvise]" not in f.read():
                return None
    except OSError:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def reexec_with_tuned_malloc() -> None:
    """Replace this process with the same command under `tuned_environ`; returns only if there is
    nothing to do. Call it first thing in a `__main__` entry point, never from library code."""
    env = tuned_environ(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


# What libtpu asks for when it finds no TPU of its own (it then prints a screen of warnings at the first
# jax call): placeholders, set only on a host with no TPU device, so that TPU topology compiles
# (`plan --topology`) and plain CPU runs start quietly. On a TPU VM they are left alone.
_NO_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-8",
               "TPU_WORKER_HOSTNAMES": "localhost"}


def has_tpu_device() -> bool:
    """A TPU chip on this host: /dev/accel* (v2-v5p) or /dev/vfio/<n> (v5e, v6e)."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu_without_tpu(environ=os.environ) -> None:
    """Set `_NO_TPU_ENV` (unless the user set them) when libtpu is installed but no TPU is attached.
    Must run before jax initializes its backends; `codegen_jax/__init__.py` calls it."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None or has_tpu_device():
        return
    for key, value in _NO_TPU_ENV.items():
        environ.setdefault(key, value)
