"""`codegen-jax tokenizer train --data PATH ... --vocab-size N --out DIR`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_verb", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE code tokenizer")
    t.add_argument("--data", nargs="+", required=True, help="files or directories of text/code")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    from codegen_jax.data.corpus import texts_from_paths
    from codegen_jax.data.tokenizer import train_tokenizer

    tok = train_tokenizer(texts_from_paths(args.data), args.vocab_size, args.out)
    print(f"trained a {tok.vocab_size}-token byte-level BPE; saved to {args.out}")
