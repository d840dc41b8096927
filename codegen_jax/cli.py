"""`codegen-jax` command line: parses arguments and calls one function per verb.

Exit codes: 0 success, 2 user error (one line on stderr, no traceback), 1 bug.
"""

from __future__ import annotations

import argparse
import os
import sys

from codegen_jax.errors import UserError


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codegen-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("train", help="train or fine-tune a model")
    _config_args(p)
    p.add_argument("--workdir", help="run directory (default runs/<config name>)")
    p.add_argument("--init-from", help="load params only from this checkpoint (fresh optimizer)")
    p.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-process runs)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)

    p = sub.add_parser("generate", help="generate code from prompts with a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a run's workdir (latest step) or a step dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", help="JSONL with a 'prompt' (and optional 'id') per line")
    p.add_argument("--out", help="JSONL output (default: print completions)")
    _sampling_args(p)
    p.add_argument("--stop", nargs="*", default=None, help="stop strings")
    p.add_argument("--truncate", action="store_true", help="left-truncate prompts longer than the context")

    p = sub.add_parser("export-hf", help="write a Hugging Face Llama checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")

    p = sub.add_parser("import-hf", help="read a Hugging Face Llama/Mistral/Qwen2 checkpoint")
    p.add_argument("--hf", required=True, help="local HF model directory (safetensors)")
    p.add_argument("--out", required=True, help="workdir to write our checkpoint into")

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

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_verb", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE code tokenizer")
    t.add_argument("--data", nargs="+", required=True, help="files or directories of text/code")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    d = dsub.add_parser("inspect", help="corpus, cleaning and packing report")
    _config_args(d)
    d.add_argument("--workdir")

    p = sub.add_parser("plan", help="parameters, FLOPs and per-device memory for a config")
    _config_args(p)
    return parser


def _load_config(args: argparse.Namespace):
    from codegen_jax.config import load_config

    return load_config(args.config, args.overrides)


# Options whose paths must be local: files other tools read from disk, or ones too small to be worth
# staging. --workdir, --checkpoint, --init-from, --prompts-file and data paths may be gs:// / s3:// URLs.
_LOCAL_ONLY = ("config", "out", "hf", "samples", "problems")


def run(args: argparse.Namespace) -> int:
    from codegen_jax.storage import require_local

    for name in _LOCAL_ONLY:
        require_local(getattr(args, name, None), "--" + name)
    verb = args.verb
    if verb == "train":
        cfg = _load_config(args)
        from codegen_jax.train.loop import train_cli

        train_cli(cfg, args)
    elif verb == "generate":
        from codegen_jax.sample import generate_cli

        generate_cli(args)
    elif verb == "export-hf":
        from codegen_jax.hf import export_hf

        export_hf(args.checkpoint, args.out, dtype=args.dtype)
    elif verb == "import-hf":
        from codegen_jax.hf import import_hf

        import_hf(args.hf, args.out)
    elif verb == "eval":
        from codegen_jax.eval.humaneval import run_humaneval

        try:
            k = tuple(int(x) for x in args.k.split(",") if x)
        except ValueError:
            raise UserError(f"--k must be comma-separated integers, e.g. 1,10; got {args.k!r}") from None
        run_humaneval(checkpoint=args.checkpoint, samples=args.samples, problems=args.problems,
                      num_samples=args.num_samples, k=k, temperature=args.temperature,
                      top_p=args.top_p, limit=args.limit, out=args.out, workers=args.workers,
                      timeout=args.timeout)
    elif verb == "tokenizer":
        from codegen_jax.data.tokenizer import train_tokenizer_cli

        train_tokenizer_cli(args.data, args.vocab_size, args.out)
    elif verb == "data":
        cfg = _load_config(args)
        from codegen_jax.data.inspect import inspect_data

        inspect_data(cfg, workdir=args.workdir)
    elif verb == "plan":
        cfg = _load_config(args)
        from codegen_jax.plan import plan_cli

        plan_cli(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    # key=value overrides may come before or after options (`--workdir DIR train.steps=6`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return run(args)
    except UserError as e:
        print(f"codegen-jax {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("codegen_jax"):
            raise
        print(f"codegen-jax {args.verb}: error: not implemented yet ({e.name})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"codegen-jax {args.verb}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `codegen-jax` console script and `python -m codegen_jax.cli`: `main` in a process whose
    allocator is tuned for XLA (see hostenv.py; a re-exec, so before anything is imported)."""
    from codegen_jax.hostenv import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()
    sys.exit(main())


if __name__ == "__main__":
    entry()
