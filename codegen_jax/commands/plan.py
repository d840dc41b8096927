"""`codegen-jax plan --config FILE [--topology NAME] [--search] [--json OUT] [key=value ...]`:
parameters, FLOPs and per-device memory; with a TPU topology, the real programs compiled by libtpu."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codegen_jax.commands import config_args, load_config
from codegen_jax.errors import UserError

GIB = 1024**3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="parameters, FLOPs and per-device memory for a config")
    config_args(p)
    p.add_argument("--topology", help="compile for a TPU slice: v5e-8, v5litepod-16, v5p-128, v6e-16, v4-32, "
                                      "v5e:2x4 (needs libtpu: pip install 'codegen-jax[tpu]')")
    p.add_argument("--search", action="store_true",
                   help="with --topology: compile candidate settings and print the fastest that fits")
    p.add_argument("--json", help="also write the report here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    if args.search and not args.topology:
        raise UserError("--search needs --topology (it compiles for a TPU slice), e.g. --topology v5e-8")
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json {args.json} is a directory; give a file name")
    report = _topology(cfg, args) if args.topology else _local(cfg)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write --json {args.json}: {e.strerror or e}") from None


def _local(cfg) -> dict:
    from codegen_jax.plan import ACCELERATORS, plan

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
    return p


def _topology(cfg, args) -> dict:
    from codegen_jax.plan import plan_topology, search

    report = plan_topology(cfg, args.topology)
    _print_topology(report)
    if args.search or not report["fits"]:
        found = search(cfg, args.topology)
        report["search"] = found
        _print_search(found)
    return report


def _print_topology(r: dict) -> None:
    print(f"config {r['config']}: {r['params'] / 1e9:.3f}B parameters, {r['flops_per_token'] / 1e9:.2f} "
          f"GFLOPs/token (train)")
    print(f"TPU {r['topology']} = {r['topology_name']}: {r['chips']} {r['chip']} chips, mesh {r['mesh']}, "
          f"HBM {r['hbm_bytes'] / GIB:.2f} GiB per chip (as the compiler reports it)")
    print(f"  {'program':<11}{'args':>8}{'outputs':>9}{'temps':>8}{'code':>7}{'total':>8}  {'fits':<22}compile")
    for name, p in r["programs"].items():
        fits = "yes" if p["fits"] else f"NO: {p['excess_gib']:.2f} GiB over"
        temps = p["temp_bytes"] if p["needed_temp_bytes"] is None else p["needed_temp_bytes"]
        print(f"  {name:<11}{p['argument_bytes'] / GIB:8.2f}{p['output_bytes'] / GIB:9.2f}{temps / GIB:8.2f}"
              f"{p['code_bytes'] / GIB:7.2f}{p['per_device_bytes'] / GIB:8.2f}  {fits:<22}{p['compile_s']:.0f} s")
    print("  (GiB per chip; total = args + outputs not aliased to them + temps + code)")
    e = r.get("estimate")
    if e:
        step = f"{e['step_s']:.3f} s" if e["step_s"] >= 0.1 else f"{e['step_s'] * 1e3:.2f} ms"
        serial = e["step_s_no_overlap"]
        print(f"estimated train step (roofline, not a measurement): {step}, {e['bound']}-bound, "
              f"MFU {e['mfu']:.1%} of {e['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak with compute and ICI "
              f"overlapped, {e['mfu_no_overlap']:.1%} ({serial:.3g} s) with no overlap; remat factor "
              f"{e['remat_factor']:.2f}")
        print(f"  FLOPs check: the compiler counts {e['check_ratio']:.3f}x our analytic FLOPs on "
              f"{e['check_program']} (as compiled, loop bodies count once and Pallas kernels not at all: "
              f"{e['compiler_flops_as_counted']:.3g} for the real step)")
    d = r.get("decode_estimate")
    if d:
        print(f"estimated decode step (roofline): {d['step_s'] * 1e3:.2f} ms, {d['bound']}-bound, "
              f"{d['tokens_per_s']:,.0f} tokens/s at the config's sample.batch_size")


def _print_search(found: dict) -> None:
    for t in found["tried"]:
        o = " ".join(f"{k}={v}" for k, v in t["overrides"].items())
        print(f"  tried {o}: {t['per_device_bytes'] / GIB:.2f} GiB, "
              f"{'fits' if t['fits'] else 'does not fit'}, est. {t['estimated_step_s']:.3f} s/step")
    if found["best"] is None:
        print("search: no candidate fits with 10% of HBM to spare; lower train.batch_size or use more chips")
    else:
        print("search: fastest setting that fits: " + " ".join(f"{k}={v}" for k, v in found["best"].items()))
