"""`codegen-jax` command line: builds the parser from the verb modules in `commands/` and dispatches.

Exit codes: 0 success, 2 user error (one line on stderr, no traceback), 1 bug.
"""

from __future__ import annotations

import argparse
import os
import sys

from codegen_jax.errors import UserError

# Options whose paths must be local: files other tools read from disk, or ones too small to be worth
# staging. --workdir, --checkpoint, --init-from, --prompts-file and data paths may be gs:// / s3:// URLs.
_LOCAL_ONLY = ("config", "out", "hf", "samples", "problems")


def build_parser() -> argparse.ArgumentParser:
    from codegen_jax.commands import data, eval as eval_cmd, generate, hf, plan, serve, tokenizer, train

    parser = argparse.ArgumentParser(prog="codegen-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in (train, generate, hf, eval_cmd, tokenizer, data, plan, serve):
        module.register(sub)
    return parser


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
        from codegen_jax.storage import require_local

        for name in _LOCAL_ONLY:
            require_local(getattr(args, name, None), "--" + name)
        args.run(args)
        return 0
    except UserError as e:
        print(f"codegen-jax {args.verb}: error: {e}", file=sys.stderr)
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
