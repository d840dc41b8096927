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

    e = esub.add_parser("parse", help="share of greedy function completions that parse as Python")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--prompts", help="JSONL of {\"prompt\": ...} lines (default: the built-in signatures)")
    e.add_argument("--max-new-tokens", type=int, default=160)
    e.add_argument("--no-repeat-ngram", type=int, default=None,
                   help="forbid repeating n-grams (0: off; default: the checkpoint's sample.no_repeat_ngram, "
                        "what its training run's closing check used)")
    e.add_argument("--out", help="write every completion and the rate to this JSON file")
    e.set_defaults(run=run_parse)


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


def run_parse(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from codegen_jax.eval.parse import load_prompts, run_parse_eval
    from codegen_jax.sample import Generator, check_options

    check_options(max_new_tokens=args.max_new_tokens, no_repeat_ngram=args.no_repeat_ngram)
    prompts = load_prompts(args.prompts)
    gen = Generator.from_checkpoint(args.checkpoint)
    s = gen.sample_cfg  # the run's own settings, so this repeats the figure its training run printed
    ngram = s.no_repeat_ngram if args.no_repeat_ngram is None else args.no_repeat_ngram
    report = run_parse_eval(gen, prompts, max_new_tokens=args.max_new_tokens,
                            repetition_penalty=s.repetition_penalty, no_repeat_ngram=ngram)
    print(format_parse(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def format_parse(report: dict, failures: int = 3) -> str:
    """The rate (and how many failures ran to the token limit inside their function), then the first few
    failures (what was generated, and the parser's complaint)."""
    controls = [f"{report['no_repeat_ngram']}-grams blocked" if report.get("no_repeat_ngram") else "",
                f"repetition penalty {report['repetition_penalty']:g}"
                if report.get("repetition_penalty", 1.0) != 1.0 else ""]
    controls = ", ".join(c for c in controls if c)
    lines = [f"parse rate {report['parse_rate']:.0%} ({report['parsed']} of {report['total']} greedy function "
             f"completions parse as Python{'; ' + controls if controls else ''})"]
    if report.get("unfinished"):
        lines[0] += (f"; {report['unfinished']} of the {len(report['failures'])} failures were still inside "
                     f"their function at the {report['max_new_tokens']}-token limit")
    for f in report["failures"][:failures]:
        first = f["prompt"].splitlines()[0]
        lines.append(f"  failed: {first} ... -> {f['error']}")
    return "\n".join(lines)
