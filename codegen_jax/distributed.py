"""Multi-process start-up: `jax.distributed.initialize` on clusters (TPU pods, Slurm, GKE) or when
given coordinator / process flags (several local processes over 127.0.0.1 in tests and CI)."""

from __future__ import annotations

import os

import jax

from codegen_jax.errors import UserError

# Environment variables that mean "this process is one of several that jax can discover on its own".
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JOBSET_NAME")


def _in_cluster() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or any(k in os.environ for k in _CLUSTER_ENV[1:])


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the job's processes; a no-op for a single process. Call before any other jax use."""
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise UserError("give all of --coordinator, --num-processes and --process-id, or none of them")
    if coordinator is None and not _in_cluster():
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU processes need a collectives backend to talk to each other
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()  # cluster auto-detection (TPU, Slurm, GKE)
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_main() -> bool:
    return jax.process_index() == 0
