"""LoRA against full fine-tuning, measured in one run.

1. Memory (`plan`, analytic, per device): optimizer state and gradients of the small config with LoRA
   (rank 16 on q, k, v, o) against full fine-tuning.
2. Speed on this machine: train tokens/s of the small config's step (fp32, batch 4 x 256), LoRA vs full.
3. Learning: from a trained tiny run (`make train` writes runs/tiny), fine-tune on its docstring->code
   pairs alone (data.pair_ratio=1) for --steps steps with LoRA rank 16 and with full fine-tuning (same
   data, same steps, each at its own usual learning rate); held-out pair loss before and after.

    python benchmarks/lora_finetune.py --base runs/tiny [--steps 100] [--skip-speed]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = ["lora.enabled=true", "lora.rank=16", "lora.alpha=32", "lora.targets=[q,k,v,o]"]


def memory() -> None:
    from codegen_jax.config import load_config
    from codegen_jax.plan import plan

    gib = 2**30
    for name, extra in (("full", []), ("lora r16 qkvo", LORA)):
        p = plan(load_config(ROOT / "configs" / "small.yaml", extra), devices=8)
        print(f"small on 8 devices, {name:14s}: params {p['params_bytes'] / gib:6.3f} GiB, optimizer "
              f"{p['optimizer_bytes'] / gib:6.3f} GiB, gradients {p['grads_bytes'] / gib:6.3f} GiB per device", flush=True)


def speed(steps: int = 4) -> None:
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from codegen_jax import lora
    from codegen_jax.config import load_config
    from codegen_jax.model import create_model
    from codegen_jax.sharding import make_mesh, state_shardings
    from codegen_jax.train.optim import make_optimizer, schedule
    from codegen_jax.train.step import TrainState, make_train_step

    b, t = 4, 256
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    rep = NamedSharding(mesh, P())
    tokens = np.random.RandomState(0).randint(0, 32000, (b, t)).astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": np.ones_like(tokens)}
    batch = jax.tree.map(jnp.asarray, batch)
    rates = {}
    for name, extra in (("full", []), ("lora", LORA)):
        cfg = load_config(ROOT / "configs" / "small.yaml", ["model.dtype=float32", f"data.seq_len={t}",
                                                            f"train.batch_size={b}", "optim.grad_accum=1", *extra])
        model = create_model(cfg.model, mesh, seed=0, lora=cfg.lora)
        graphdef, st = nnx.split(model)
        params, params_sh = nnx.to_pure_dict(st), nnx.to_pure_dict(state_shardings(st, mesh))
        opt = make_optimizer(cfg.optim, 1000)
        trained = lora.trained(params, cfg.lora)
        step = make_train_step(graphdef, opt, schedule(cfg.optim, 1000), mesh, TrainState(rep, params_sh, None),
                               lora_cfg=cfg.lora)
        state = TrainState(jnp.int32(0), params, opt.init(trained))
        for _ in range(2):  # compile, then one with committed state
            state, m = step(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch)
        jax.block_until_ready(state)
        rates[name] = steps * b * t / (time.perf_counter() - t0)
        print(f"small {name}: {rates[name]:.0f} train tokens/s (batch {b}x{t}, fp32)", flush=True)
        del state, model
    print(f"LoRA / full: {rates['lora'] / rates['full']:.2f}x", flush=True)


def learning(base: str, steps: int) -> None:
    from codegen_jax.config import load_config
    from codegen_jax.train.loop import train

    src = Path(base)
    cfg_file = src / "config.yaml"
    common = ["data.pair_ratio=1.0", f"train.steps={steps}", "train.time_budget_s=0", "optim.schedule=cosine",
              "optim.warmup_steps=10", "train.eval_every=100000", "train.eval_batches=16",
              "checkpoint.every=100000", "train.sample_prompts=[]", "train.parse_eval=false"]
    # before: one step of fresh adapters (B = 0) at a vanishing learning rate, i.e. the base as it is
    runs = {"before": [*LORA, "optim.lr=1e-12", "train.steps=1", "optim.warmup_steps=0"],
            "full FT": ["optim.lr=1e-3"], "LoRA r16": [*LORA, "optim.lr=5e-3"]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            cfg = load_config(cfg_file, [*common, *extra])
            t0 = time.perf_counter()
            r = train(cfg, workdir=f"{tmp}/{name.replace(' ', '_')}", init_from=str(src), samples=False)
            print(f"{name:9s}: held-out pair loss {r['eval']['eval_loss']:.4f} ({r['steps']} steps, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a trained run dir (runs/tiny) for the learning figure")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    from codegen_jax.train.metrics import matmul_probe_flops

    print(f"matmul probe {matmul_probe_flops() / 1e9:.0f} GFLOP/s", flush=True)
    memory()
    if not args.skip_speed:
        speed()
    if args.base:
        learning(args.base, args.steps)


if __name__ == "__main__":
    from codegen_jax.hostenv import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()
    main()
