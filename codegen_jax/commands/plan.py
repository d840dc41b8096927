"""`codegen-jax plan --config FILE [key=value ...]`: parameters, FLOPs and per-device memory."""

from __future__ import annotations

import argparse

from codegen_jax.commands import config_args, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="parameters, FLOPs and per-device memory for a config")
    config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from codegen_jax.plan import ACCELERATORS, GIB, plan

    cfg = load_config(args)
    p = plan(cfg)
    g = lambda x: f"{x / GIB:8.2f} GiB"  # noqa: E731
    print(f"config {cfg.name}: {p['params'] / 1e9:.3f}B parameters, {p['flops_per_token'] / 1e9:.2f} "
          f"GFLOPs/token (train), {p['tokens_per_step']:,} tokens/step")
    print(f"mesh {p['mesh']} on {p['devices']} devices, remat={cfg.model.remat}; per device:")
    for key in ("params", "optimizer", "grads", "activations"):
        note = f"  ({p['activations_source']})" if key == "activations" else ""
        print(f"  {key:<12}{g(p[key + '_bytes'])}{note}")
    print(f"  {'total':<12}{g(p['per_device_bytes'])}")
    for name, hbm in ACCELERATORS.items():
        fits = p["per_device_bytes"] <= hbm * GIB * 0.9  # leave room for XLA's own buffers
        print(f"  {name:<10} {hbm:4d} GiB: {'fits' if fits else 'WARNING: will not fit'}")
