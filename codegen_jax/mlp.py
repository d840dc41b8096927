"""The decoder's MLPs: SwiGLU (Llama) and GELU-tanh (StarCoder2), each with optional LoRA adapters;
`model.mlp` picks one through `MLPS`."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from codegen_jax import lora as lora_lib
from codegen_jax.config import ModelConfig
from codegen_jax.layers import dense, param
from codegen_jax.sharding import constrain


def _adapted(module: nnx.Module, target: str, x: jax.Array, y: jax.Array, key) -> jax.Array:
    """y plus the LoRA delta of `target` on x, if the module has that adapter."""
    delta = lora_lib.delta(module, target, x, 1, key)
    return y if delta is None else y + delta


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: Any = None):
        d, f, pd = cfg.d_model, cfg.d_ff, cfg.param_dtype
        self.w_gate_df = param(rngs, (d, f), ("embed", "mlp"), pd)
        self.w_up_df = param(rngs, (d, f), ("embed", "mlp"), pd)
        self.w_down_fd = param(rngs, (f, d), ("mlp", "embed"), pd)
        lora_lib.attach(self, lora, "mlp", rngs)

    def __call__(self, x_btd: jax.Array, key=None) -> jax.Array:
        dt = x_btd.dtype
        gate_btf = jax.nn.silu(_adapted(self, "gate", x_btd, dense(x_btd, self.w_gate_df[...].astype(dt)), key))
        h_btf = gate_btf * _adapted(self, "up", x_btd, dense(x_btd, self.w_up_df[...].astype(dt)), key)
        if h_btf.ndim == 3:
            h_btf = constrain(h_btf, "batch", "length", "mlp")
        return _adapted(self, "down", h_btf, dense(h_btf, self.w_down_fd[...].astype(dt)), key)


class GeluMLP(nnx.Module):
    """StarCoder2's MLP: proj(gelu(fc(x))), GELU's tanh approximation (HF `gelu_pytorch_tanh`), with
    biases when `model.mlp_bias`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: Any = None):
        d, f, pd = cfg.d_model, cfg.d_ff, cfg.param_dtype
        self.w_fc_df = param(rngs, (d, f), ("embed", "mlp"), pd)
        self.w_proj_fd = param(rngs, (f, d), ("mlp", "embed"), pd)
        self.bias = cfg.mlp_bias
        if cfg.mlp_bias:
            self.b_fc_f = param(rngs, (f,), ("mlp",), pd, std=0.0)
            self.b_proj_d = param(rngs, (d,), ("embed",), pd, std=0.0)
        lora_lib.attach(self, lora, "mlp", rngs)

    def __call__(self, x_btd: jax.Array, key=None) -> jax.Array:
        dt = x_btd.dtype
        h_btf = _adapted(self, "fc", x_btd, dense(x_btd, self.w_fc_df[...].astype(dt)), key)
        if self.bias:
            h_btf = h_btf + self.b_fc_f[...].astype(dt)
        h_btf = jax.nn.gelu(h_btf, approximate=True)
        if h_btf.ndim == 3:
            h_btf = constrain(h_btf, "batch", "length", "mlp")
        y_btd = _adapted(self, "proj", h_btf, dense(h_btf, self.w_proj_fd[...].astype(dt)), key)
        return y_btd + self.b_proj_d[...].astype(dt) if self.bias else y_btd


MLPS = {"swiglu": MLP, "gelu_tanh": GeluMLP}  # model.mlp -> module
