"""`codegen-jax generate --checkpoint DIR (--prompt TEXT | --prompts-file IN.jsonl) [--out OUT.jsonl] ...`:
prompts from --prompt or a JSONL file; JSONL out (--out, or stdout for a file), or the prompt +
completion text on stdout for --prompt. Timing goes to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from codegen_jax.errors import UserError


def sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate code from prompts with a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a run's workdir (latest step) or a step dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", help="JSONL with a 'prompt' (and optional 'id') per line")
    p.add_argument("--out", help="JSONL output (default: print completions)")
    sampling_args(p)
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="HF's repetition penalty (1: off)")
    p.add_argument("--no-repeat-ngram", type=int, default=0,
                   help="never repeat an n-gram of this size (0: off)")
    p.add_argument("--stop", nargs="*", default=None, help="stop strings")
    p.add_argument("--truncate", action="store_true", help="left-truncate prompts longer than the context")
    p.set_defaults(run=run)


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """JSONL records with a string `prompt` (other fields pass through); one clear UserError if not."""
    from codegen_jax.jsonl import read_jsonl

    records = []
    for n, rec in read_jsonl(path, "prompts"):
        if not isinstance(rec.get("prompt"), str):
            raise UserError(f"prompts file {path}, line {n}: each line needs a string 'prompt' field")
        records.append(rec)
    if not records:
        raise UserError(f"prompts file {path} holds no prompts")
    return records


def unescape(s: str) -> str:
    r"""Shell-typed escapes in stop strings: `--stop '\ndef'` means newline + def."""
    return s.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def run(args: argparse.Namespace) -> None:
    from codegen_jax import storage
    from codegen_jax.sample import Generator, check_options

    check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p,
                  args.num_samples, args.repetition_penalty, args.no_repeat_ngram)
    if args.prompts_file:
        records = read_prompts(storage.local_copy(args.prompts_file))
    else:
        records = [{"prompt": args.prompt}]
    stop = None if args.stop is None else [unescape(s) for s in args.stop]
    gen = Generator.from_checkpoint(args.checkpoint)
    results = gen.generate([r["prompt"] for r in records], max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           min_p=args.min_p, num_samples=args.num_samples, stop=stop, seed=args.seed,
                           truncate=args.truncate, repetition_penalty=args.repetition_penalty,
                           no_repeat_ngram=args.no_repeat_ngram)
    lines = []
    for rec, samples in zip(records, results):
        for c in samples:
            extra = {"sample": c.sample_index} if args.num_samples > 1 else {}
            lines.append(json.dumps({**rec, **extra, "completion": c.text, "tokens": c.tokens,
                                     "finish_reason": c.finish_reason}))
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {args.out}: {e.strerror or e}") from None
    elif args.prompts_file:
        sys.stdout.write("".join(line + "\n" for line in lines))
    else:
        for c in results[0]:
            if args.num_samples > 1:
                sys.stdout.write(f"=== sample {c.sample_index} ({c.finish_reason}) ===\n")
            sys.stdout.write(args.prompt + c.text + "\n")
    st = gen.last_stats
    print(f"generated {st['new_tokens']} tokens in {st['run_s']:.2f}s ({st['tokens_per_s']:.1f} tok/s), "
          f"compile {st['compile_s']:.2f}s", file=sys.stderr)
