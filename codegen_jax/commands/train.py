"""`codegen-jax train --config C [--workdir DIR] [--init-from CKPT] [key=value ...]`."""

from __future__ import annotations

import argparse

from codegen_jax.commands import config_args, load_config
from codegen_jax.commands._console import Console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model")
    config_args(p)
    p.add_argument("--workdir", help="run directory (default runs/<config name>)")
    p.add_argument("--init-from", help="load params only from this checkpoint (fresh optimizer)")
    p.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-process runs)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Join the other processes if any, train, then print the greedy samples (process 0)."""
    cfg = load_config(args)
    from codegen_jax import distributed
    from codegen_jax.train.loop import train

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    console = Console(enabled=distributed.is_main(), unit="step")
    result = train(cfg, workdir=args.workdir, init_from=args.init_from, progress=console)
    if not distributed.is_main():
        return
    for text in result.get("samples", []):
        print("-" * 60 + "\n" + text)
    if result.get("samples"):
        print("-" * 60)
    print(summary(result, cfg))


def summary(result: dict, cfg) -> str:
    """The run in three lines: length and time, held-out quality (and parse rate), where things are."""
    from pathlib import Path

    minutes, seconds = divmod(int(result["train_s"]), 60)
    lines = [f"trained {result['steps']} steps ({result['tokens'] / 1e6:.1f}M tokens) in {minutes}m{seconds:02d}s"
             + (" (stopped early: preempted)" if result["preempted"] else "")]
    ev = result.get("eval") or {}
    quality = f"held-out {ev['eval_bpb']:.3f} bits/byte (loss {ev['eval_loss']:.3f} nats/token)" if ev else ""
    if "parse" in result:
        from codegen_jax.commands.eval import format_parse

        quality += ("; " if quality else "") + format_parse(result["parse"], failures=0)
    if quality:
        lines.append(quality)
    workdir = Path(result["workdir"])
    lines.append(f"checkpoint {result['checkpoint']}; loss plot {workdir / 'loss.png'}; "
                 f"metrics {workdir / 'metrics.jsonl'}")
    return "\n".join(lines)
