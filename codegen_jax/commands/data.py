"""`codegen-jax data inspect --config FILE [--workdir DIR] [key=value ...]` and `codegen-jax data prepare`
(commands/prepare.py)."""

from __future__ import annotations

import argparse

from codegen_jax.commands import config_args, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    d = dsub.add_parser("inspect", help="corpus, cleaning and packing report")
    config_args(d)
    d.add_argument("--workdir")
    d.set_defaults(run=run_inspect)
    from codegen_jax.commands import prepare

    prepare.add_parser(dsub)


def run_inspect(args: argparse.Namespace) -> None:
    from codegen_jax.data.inspect import inspect_data

    cfg = load_config(args)
    if cfg.data.source == "prepared":  # the manifest's report: per-language documents and tokens, drops
        from codegen_jax.data.prepare.report import inspect_prepared

        print(inspect_prepared(cfg))
        return
    print(inspect_data(cfg, workdir=args.workdir))
