"""`codegen-jax eval humaneval (--checkpoint DIR | --samples FILE) [--num-samples N] [--k 1,10] ...`."""

from __future__ import annotations

import argparse
import sys

from codegen_jax.commands._console import Console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    e = esub.add_parser("humaneval", help="HumanEval pass@k in a sandbox")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--samples", help="existing samples JSONL ({task_id, completion} lines)")
    e.add_argument("--num-samples", type=int, default=1)
    e.add_argument("--k", default="1", help="comma-separated k values, e.g. 1,10")
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--problems", help="problem set JSONL in the HumanEval schema")
    e.add_argument("--out", help="output directory")
    e.add_argument("--workers", type=int, default=None)
    e.add_argument("--timeout", type=float, default=3.0)
    e.set_defaults(run=run_humaneval)


def run_humaneval(args: argparse.Namespace) -> None:
    from codegen_jax.eval import humaneval

    summary = humaneval.run_humaneval(
        checkpoint=args.checkpoint, samples=args.samples, problems=args.problems,
        num_samples=args.num_samples, k=args.k, temperature=args.temperature, top_p=args.top_p,
        limit=args.limit, out=args.out, workers=args.workers, timeout=args.timeout,
        progress=Console(unit="prog"))
    for note in summary["notes"]:
        print(note, file=sys.stderr)
    print(humaneval.format_table(summary))
