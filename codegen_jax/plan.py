"""Planning a config on its mesh: parameters, FLOPs per token and per-device memory of a config on its mesh.

Parameter, optimizer and gradient bytes are exact: each array's shard shape under the rules table.
Activations come from the compiled train step's memory analysis when the mesh fits this machine's
devices and the model is small enough to compile here; otherwise from an analytic estimate.
"""

from __future__ import annotations

import math
import types
from typing import Any

import jax
import numpy as np

from codegen_jax.config import Config, mesh_shape
from codegen_jax.model import abstract_model, flops_per_token, param_count
from codegen_jax.sharding import logical_to_spec

GIB = 1024**3
# usable HBM per device (GiB) of accelerators people train on
ACCELERATORS = {"TPU v5e": 16, "TPU v4": 32, "TPU v5p": 95, "TPU v6e": 32, "A100-80GB": 80, "H100": 80,
                "H200": 141}
_COMPILE_LIMIT = 300_000_000  # parameters: above this, compiling the step on CPU costs too much


def _target_devices(cfg: Config, devices: int | None) -> int:
    if devices:
        return devices
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    return math.prod(sizes) if all(s > 0 for s in sizes) else jax.device_count()


def shard_bytes(cfg: Config, sizes: dict[str, int]) -> tuple[int, int]:
    """(total, per-device) parameter bytes: every array divided by the mesh axes the rules give it."""
    from flax import nnx

    mesh = types.SimpleNamespace(shape=sizes)  # logical_to_spec only reads axis sizes
    _, state = abstract_model(cfg.model)
    total = per_device = 0
    for _, v in nnx.to_flat_state(state):
        spec = logical_to_spec(v.get_metadata().get("out_sharding"), v.shape, mesh)
        shards = math.prod(math.prod(sizes[a] for a in ((ax,) if isinstance(ax, str) else ax))
                           for ax in spec if ax is not None)
        nbytes = math.prod(v.shape) * np.dtype(v.dtype).itemsize
        total += nbytes
        per_device += nbytes // shards
    return total, per_device


def activation_bytes(cfg: Config, sizes: dict[str, int]) -> int:
    """Analytic per-device activation memory of one microbatch's forward+backward (Korthikanti et al.
    2022 per-layer counts, scaled to our compute dtype), plus fp32 logits and their gradient."""
    m = cfg.model
    b = cfg.train.batch_size // (sizes["data"] * sizes["fsdp"]) // cfg.optim.grad_accum
    t, d, f, h = cfg.data.seq_len, m.d_model, m.d_ff, m.n_heads
    elem = np.dtype(m.dtype).itemsize
    tp = sizes["tensor"]
    full_layer = b * t * (10 * d + (3 * h * m.head_dim + 3 * f) / tp) * elem + 2 * b * h * t * t * elem / tp
    saved = {"none": full_layer * m.n_layers,
             "dots_saveable": b * t * (4 * d + (2 * h * m.head_dim + 3 * f) / tp) * elem * m.n_layers + full_layer,
             "full": b * t * d * elem * m.n_layers + full_layer}[m.remat]
    logits = 2 * b * t * m.vocab_size * 4 / tp
    return int(saved + logits)


def compiled_activation_bytes(cfg: Config) -> int | None:
    """Temp memory of the compiled train step on this machine's devices (None if it can't be done)."""
    from codegen_jax.sharding import make_mesh

    if param_count(cfg.model) > _COMPILE_LIMIT:
        return None
    try:
        return _compile_step_temp_bytes(cfg, make_mesh(mesh_shape(cfg.mesh, jax.device_count())))
    except Exception:  # noqa: BLE001 - planning falls back to the analytic estimate
        return None


def _compile_step_temp_bytes(cfg: Config, mesh) -> int:
    from codegen_jax.train.optim import make_optimizer, schedule
    from codegen_jax.train.step import make_train_step, train_state_layout

    graphdef, abs_state = abstract_model(cfg.model)
    opt = make_optimizer(cfg.optim, cfg.train.steps)
    state_sh, state = train_state_layout(abs_state, opt, mesh)
    step = make_train_step(graphdef, opt, schedule(cfg.optim, cfg.train.steps), mesh, state_sh,
                           cfg.optim.grad_accum, cfg.optim.z_loss)
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), np.int32)
             for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    return int(step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def plan(cfg: Config, devices: int | None = None) -> dict[str, Any]:
    n = _target_devices(cfg, devices)
    sizes = mesh_shape(cfg.mesh, n)
    total, params_dev = shard_bytes(cfg, sizes)
    act = compiled_activation_bytes(cfg) if n == jax.device_count() else None
    out = {"devices": n, "mesh": sizes, "params": param_count(cfg.model),
           "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
           "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
           "params_bytes_total": total, "params_bytes": params_dev,
           "optimizer_bytes": 2 * params_dev,  # Adam's mu and nu, in the parameter dtype
           "grads_bytes": params_dev,
           "activations_bytes": act if act is not None else activation_bytes(cfg, sizes),
           "activations_source": "compiled" if act is not None else "analytic"}
    out["per_device_bytes"] = sum(out[k] for k in ("params_bytes", "optimizer_bytes", "grads_bytes",
                                                   "activations_bytes"))
    return out
