"""The command line, one module per verb: each has `register(subparsers)`, which adds its parser and
sets `run(args)` as the handler. Commands parse, call the library, and print; the library returns
values and raises `UserError` (codegen_jax/cli.py turns that into one stderr line and exit code 2)."""

from __future__ import annotations

import argparse

from codegen_jax.errors import UserError


def config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def load_config(args: argparse.Namespace):
    from codegen_jax.config import load_config as load

    return load(args.config, args.overrides)


__all__ = ["UserError", "config_args", "load_config"]
