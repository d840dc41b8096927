"""`codegen-jax data prepare --config FILE --out DIR [--executor local|slurm|ray] [--tasks N] [--workers W]
[--partition P --time T] [key=value ...]`: the config's data section -> ArrayRecord shards + manifest."""

from __future__ import annotations

import argparse

from codegen_jax.commands import config_args, load_config
from codegen_jax.commands._console import Console


def add_parser(dsub: argparse._SubParsersAction) -> None:
    d = dsub.add_parser("prepare", help="prepare a corpus once into ArrayRecord shards (datatrove: local, Slurm, Ray)")
    config_args(d)
    d.add_argument("--out", required=True, help="output directory (new or empty; or one to resume)")
    d.add_argument("--executor", default="local", help="local (default: processes on this machine), slurm or ray")
    d.add_argument("--tasks", type=int, help="tasks per stage, fixing the shards (default: the number DIR was "
                                             "made with, else --workers)")
    d.add_argument("--workers", type=int, help="tasks run at once (default: all cores)")
    slurm = d.add_argument_group("slurm")
    slurm.add_argument("--partition", help="partition to submit to (--executor slurm)")
    slurm.add_argument("--time", default="24:00:00", help="time limit per job (default 24:00:00)")
    slurm.add_argument("--cpus-per-task", type=int, default=1)
    slurm.add_argument("--mem-per-cpu-gb", type=float, default=2)
    d.add_argument("--verbose", action="store_true", help="datatrove's task logs on stderr (default: DIR/logs)")
    d.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> None:
    from codegen_jax.data.prepare import prepare
    from codegen_jax.data.prepare.report import manifest_report

    slurm = {"partition": args.partition, "time": args.time, "cpus_per_task": args.cpus_per_task,
             "mem_per_cpu_gb": args.mem_per_cpu_gb}
    result = prepare(load_config(args), args.out, executor=args.executor, tasks=args.tasks, workers=args.workers,
                     slurm=slurm, progress=Console(), quiet=not args.verbose)
    if "submitted" in result:
        print(f"submitted Slurm jobs {', '.join(map(str, result['submitted']))}; train with data.source=prepared "
              f"data.paths=[{args.out}] once {args.out}/manifest.json exists")
        return
    print(manifest_report(result, args.out))
    print(f"train on it: codegen-jax train --config {args.config} data.source=prepared data.paths=[{args.out}]")
