"""The shipped configs compiled for the TPU slices they name, by libtpu's compiler on this host (no TPU
needed): per-chip HBM (arguments, temporaries, total) against the chip's HBM, fits, the roofline
estimate of step time and MFU, and how long each compile took here.

    python benchmarks/tpu_plan.py                          # small on v5e-8, 1b on v5e-16, 7b on v5p-128
    python benchmarks/tpu_plan.py --rows 7b-maxtext        # 7b on v5p-64 at 4 x 4096 per chip
    python benchmarks/tpu_plan.py --configs-dir /tmp/old_configs   # the configs of another version
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {  # name: (config, topology, overrides)
    "small": ("configs/small.yaml", "v5e-8", []),
    "1b": ("configs/1b.yaml", "v5e-16", []),
    "7b": ("configs/7b.yaml", "v5p-128", []),
    # like for like with MaxText's llama2-7b train_compile (per_device_batch_size=4, 4096 tokens, remat
    # full) on v5p-64 (32 chips): 14.7 GiB temporaries + 2.4 GiB arguments per chip
    "7b-maxtext": ("configs/7b.yaml", "v5p-64", ["mesh.fsdp=32", "train.batch_size=128"]),
}
GIB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=["small", "1b", "7b"], choices=sorted(ROWS))
    ap.add_argument("--override", nargs="*", default=[], help="key=value applied to every row")
    ap.add_argument("--no-estimate", action="store_true", help="skip the FLOPs-check compile")
    ap.add_argument("--configs-dir", default=str(ROOT / "configs"),
                    help="read the YAML files from here (e.g. an older version's, for before/after)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from codegen_jax.config import load_config
    from codegen_jax.plan import plan_topology

    rows = []
    for name in args.rows:
        path, topology, overrides = ROWS[name]
        cfg = load_config(Path(args.configs_dir) / Path(path).name, overrides + list(args.override))
        t0 = time.perf_counter()
        r = plan_topology(cfg, topology, programs=("train_step",), estimate=not args.no_estimate)
        p = r["programs"]["train_step"]
        e = r.get("estimate") or {}
        temps = p["temp_bytes"] if p["fits"] or p["needed_temp_bytes"] is None else p["needed_temp_bytes"]
        row = {"row": name, "topology": topology, "chips": r["chips"], "batch": cfg.train.batch_size,
               "seq": cfg.data.seq_len, "args_gib": p["argument_bytes"] / GIB, "temps_gib": temps / GIB,
               "total_gib": p["per_device_bytes"] / GIB, "hbm_gib": r["hbm_bytes"] / GIB, "fits": p["fits"],
               "spare": 1 - p["per_device_bytes"] / r["hbm_bytes"], "step_s": e.get("step_s"),
               "mfu": e.get("mfu"), "mfu_no_overlap": e.get("mfu_no_overlap"), "flops_check": e.get("check_ratio"), "compile_s": p["compile_s"],
               "plan_s": time.perf_counter() - t0}
        rows.append(row)
        est = (f"est. step {row['step_s']:.2f} s, MFU {row['mfu']:.1%} (no overlap: {row['mfu_no_overlap']:.1%}), "
               f"FLOPs check {row['flops_check']:.3f}"
               if row["step_s"] else "no estimate")
        print(f"{name:<11}{topology:<9}{r['chips']:>4} chips  batch {row['batch']}x{row['seq']}: args "
              f"{row['args_gib']:6.2f} + temps {row['temps_gib']:6.2f} = {row['total_gib']:6.2f} of "
              f"{row['hbm_gib']:.2f} GiB ({'fits, ' + format(row['spare'], '.0%') + ' spare' if row['fits'] else 'DOES NOT FIT'}); "
              f"{est}; compile {row['compile_s']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
