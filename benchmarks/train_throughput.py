"""Training throughput: our jitted step vs HF transformers' LlamaForCausalLM + torch AdamW (CPU), same
config, same weights, same batches, measured in the same run.

    .venv/bin/python benchmarks/train_throughput.py [--configs tiny,small] [--steps 5]

Prints tokens/s, MFU against the measured matmul peak (causal-half attention FLOPs, as MaxText counts)
and the ratio to PyTorch. The targets (issue "Training") are MFU >= 55% for small and >= 1.3x PyTorch.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codegen_jax.config import load_config
from codegen_jax.hf_config import transformers_config
from codegen_jax.hf_params import to_hf_state_dict
from codegen_jax.flops import flops_per_token
from codegen_jax.model import create_model
from codegen_jax.sharding import make_mesh, state_shardings
from codegen_jax.train.metrics import matmul_probe_flops
from codegen_jax.train.optim import make_optimizer, schedule
from codegen_jax.train.step import TrainState, make_train_step

# CPU-sized shapes per config: (batch, seq_len). fp32 compute; each config keeps its remat policy
# (small's dots_saveable measured faster here than no remat: less memory traffic on 2 cores).
SHAPES = {"tiny": (16, 256), "small": (4, 512)}


def _batch(b: int, t: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    tokens = np.random.RandomState(seed).randint(0, vocab, (b, t)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": np.ones_like(tokens)}


def bench_ours(cfg, batches, steps: int) -> tuple[float, list[float]]:
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    model = create_model(cfg.model, mesh, seed=0)
    graphdef, st = nnx.split(model)
    params, params_sh = nnx.to_pure_dict(st), nnx.to_pure_dict(state_shardings(st, mesh))
    opt = make_optimizer(cfg.optim, 1000)
    state = TrainState(jnp.int32(0), params, opt.init(params))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = make_train_step(graphdef, opt, schedule(cfg.optim, 1000), mesh, TrainState(rep, params_sh, None))
    batches = [jax.tree.map(jnp.asarray, b) for b in batches]
    for _ in range(2):  # compile (the second call sees committed, sharded state: warm it up too)
        state, m = step(state, batches[0])
    jax.block_until_ready(m)
    losses = []
    t = time.perf_counter()
    for i in range(steps):
        state, m = step(state, batches[(i + 1) % len(batches)])
        losses.append(m["loss"])
    jax.block_until_ready(state)
    return time.perf_counter() - t, [float(x) for x in losses]


def bench_torch(cfg, batches, steps: int) -> tuple[float, list[float]]:
    import torch
    import transformers

    m = cfg.model
    hf_cfg = transformers_config(m)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    params = nnx.to_pure_dict(nnx.state(create_model(cfg.model, seed=0)))
    hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(params, m).items()})
    o = cfg.optim
    opt = torch.optim.AdamW(hf.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    tensors = [torch.from_numpy(b["tokens"]).long() for b in batches]

    def one(tokens):
        loss = hf(input_ids=tokens, labels=tokens).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.clip_norm)
        opt.step()
        return loss.detach()

    for _ in range(2):  # warm-up, as for ours
        one(tensors[0])
    losses = []
    t = time.perf_counter()
    for i in range(steps):
        losses.append(one(tensors[(i + 1) % len(tensors)]))
    return time.perf_counter() - t, [float(x) for x in losses]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    peak = matmul_probe_flops()
    print(f"devices: {jax.devices()[0].device_kind} x{jax.device_count()}; measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    for name in args.configs.split(","):
        b, t = SHAPES[name]
        cfg = load_config(f"configs/{name}.yaml", ["model.dtype=float32", f"data.seq_len={t}",
                                                   f"train.batch_size={b}"])
        batches = [_batch(b, t, cfg.model.vocab_size, seed) for seed in range(3)]
        ours_s, ours_losses = bench_ours(cfg, batches, args.steps)
        torch_s, torch_losses = bench_torch(cfg, batches, args.steps)
        tokens = args.steps * b * t
        fpt = flops_per_token(cfg.model, t)
        ours_tps, torch_tps = tokens / ours_s, tokens / torch_s
        print(f"{name:6s} batch {b}x{t}: ours {ours_tps:8.0f} tok/s (MFU {ours_tps * fpt / peak:5.1%}) | "
              f"torch {torch_tps:8.0f} tok/s (MFU {torch_tps * fpt / peak:5.1%}) | ratio {ours_tps / torch_tps:.2f}x"
              f" | first losses {ours_losses[0]:.4f} vs {torch_losses[0]:.4f}")


if __name__ == "__main__":
    from codegen_jax.hostenv import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()  # ours and torch share this process and its allocator
    main()
