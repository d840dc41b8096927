"""LoRA (Hu et al. 2021) on the decoder's projections, in PEFT's conventions, so adapters round-trip
with `peft.PeftModel`.

A target projection y = x W gains y += (alpha / rank) * (dropout(x) A) B, with A [in..., rank]
initialised as PEFT does (Kaiming-uniform, bound 1/sqrt(fan_in)) and B [rank, out...] zero, so a fresh
adapter leaves the model unchanged. A and B are NNX parameters beside their base weight, named by
target and shape like it (`lora_a_q_dr` / `lora_b_q_rhk` beside `w_q_dhk`; r the rank), with the base weight's input / output logical axes (sharded
like it). Training updates them alone: the base weights are frozen and get neither gradients nor
optimizer state (`trainable`). Export merges them into the base weights (`merge`) or writes PEFT's
adapter files (`peft_tensors`, `peft_config`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codegen_jax.layers import dense, param


PREFIX = "lora_"

# target -> (module attribute in the Block, base weight name, how many leading axes are its input)
TARGETS = {
    "q": ("attn", "w_q_dhk", 1), "k": ("attn", "w_k_dgk", 1), "v": ("attn", "w_v_dgk", 1),
    "o": ("attn", "w_o_hkd", 2),
    "gate": ("mlp", "w_gate_df", 1), "up": ("mlp", "w_up_df", 1), "down": ("mlp", "w_down_fd", 1),  # SwiGLU
    "fc": ("mlp", "w_fc_df", 1), "proj": ("mlp", "w_proj_fd", 1),  # StarCoder2's GELU MLP
}
def param_names(target: str) -> tuple[str, str]:
    """(A, B) attribute names of a target's adapter: its base weight's shape suffix split at the input
    axes, r (the rank) between them: w_o_hkd -> lora_a_o_hkr, lora_b_o_rd."""
    _, name, n_in = TARGETS[target]
    axes = name.rsplit("_", 1)[1]
    return f"{PREFIX}a_{target}_{axes[:n_in]}r", f"{PREFIX}b_{target}_r{axes[n_in:]}"


def targets_of(module_name: str, lora: Any) -> list[str]:
    """The enabled targets that live in the Block's `module_name` ("attn" or "mlp")."""
    if lora is None or not lora.enabled:
        return []
    return [t for t in lora.targets if TARGETS[t][0] == module_name]


def attach(module: nnx.Module, lora: Any, module_name: str, rngs: nnx.Rngs) -> None:
    """Give `module` its adapters (call at the end of its __init__, after the base weights exist)."""
    module.lora_targets = tuple(targets_of(module_name, lora))
    module.lora_scale = lora.alpha / lora.rank if module.lora_targets else 0.0
    module.lora_dropout = lora.dropout if module.lora_targets else 0.0
    for t in module.lora_targets:
        _, name, n_in = TARGETS[t]
        base = getattr(module, name)
        shape, names = base[...].shape, base.get_metadata()["out_sharding"]
        fan_in = math.prod(shape[:n_in])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(rngs.lora(), (*shape[:n_in], lora.rank), base[...].dtype, -bound, bound)
        a_name, b_name = param_names(t)
        setattr(module, a_name, nnx.Param(a, out_sharding=(*names[:n_in], "lora")))
        setattr(module, b_name, param(rngs, (lora.rank, *shape[n_in:]), ("lora", *names[n_in:]),
                                      base[...].dtype, std=0.0))


def delta(module: nnx.Module, target: str, x: jax.Array, n_in: int, key: jax.Array | None) -> jax.Array | None:
    """The adapter's contribution to projection `target` of input x (None when it has none)."""
    if target not in getattr(module, "lora_targets", ()):
        return None
    if key is not None and module.lora_dropout > 0:
        keep = 1.0 - module.lora_dropout
        x = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, list(TARGETS).index(target)), keep, x.shape),
                      x / keep, 0.0).astype(x.dtype)
    a_name, b_name = param_names(target)
    a_in_r = getattr(module, a_name)[...].astype(x.dtype)
    b_r_out = getattr(module, b_name)[...].astype(x.dtype)
    return dense(dense(x, a_in_r, n_in), b_r_out) * jnp.asarray(module.lora_scale, x.dtype)


def is_adapter(path: tuple) -> bool:
    """Whether a leaf path of the params is an adapter."""
    return any(str(getattr(p, "key", p)).startswith(PREFIX) for p in path)


def trainable(params: Any, lora: Any) -> Any:
    """The leaves training updates: the adapters with LoRA on, else everything (bool tree)."""
    on = lora is not None and lora.enabled
    return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter(p) or not on, params)


def split(params: dict, mask: Any) -> tuple[dict, dict]:
    """(trainable, frozen) halves of a params dict by a bool tree (absent leaves pruned)."""
    from flax import traverse_util

    flat, flags = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    pick = lambda want: traverse_util.unflatten_dict({k: v for k, v in flat.items() if flags[k] == want})  # noqa: E731
    return pick(True), pick(False)


def trained(params: dict, lora: Any) -> dict:
    """The part of `params` training updates (the adapters with LoRA on, else all of it)."""
    return split(params, trainable(params, lora))[0]


def join(trainable_params: dict, frozen: dict) -> dict:
    """The params dict `split` took apart."""
    from flax import traverse_util

    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable_params)})


def _blocks(params: dict, scanned: bool, n_layers: int):
    """(layer index or None for stacked, the block dict) pairs."""
    blocks = params["blocks"]
    return [(None, blocks)] if scanned else [(i, blocks[i]) for i in range(n_layers)]


def merge(params: dict, model_cfg: Any, lora: Any) -> dict:
    """Params without adapters, each target's base weight W + (alpha / rank) A B (what export writes)."""
    params = jax.tree.map(np.asarray, params)
    for _, block in _blocks(params, model_cfg.scan_layers, model_cfg.n_layers):
        for t in lora.targets:
            module, name, n_in = TARGETS[t]
            m = block[module]
            # float32: numpy's einsum has no bfloat16, and the sum should not round twice
            a, b = (m.pop(n).astype(np.float32) for n in param_names(t))
            w = m[name]
            lead = a.ndim + b.ndim - 2 - w.ndim  # 1 when layers are stacked, else 0
            # [l?, in..., r] x [l?, r, out...] -> [l?, in..., out...]
            ab_io = np.einsum("...ir,...ro->...io", a.reshape(*a.shape[:lead], -1, a.shape[-1]),
                              b.reshape(*b.shape[:lead], b.shape[lead], -1))
            m[name] = (w.astype(np.float32) + (lora.alpha / lora.rank) * ab_io.reshape(w.shape)).astype(w.dtype)
    return params


def strip(params: dict) -> dict:
    """Params without their adapter leaves."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter(k)})


@dataclasses.dataclass(frozen=True)
class PeftTensor:
    """One tensor of adapter_model.safetensors: its PEFT name and value."""

    name: str
    value: np.ndarray


def peft_tensors(params: dict, model_cfg: Any, lora: Any) -> list[PeftTensor]:
    """PEFT's adapter_model.safetensors tensors: `base_model.model.<HF module>.lora_A.weight` [r, in] and
    `lora_B.weight` [out, r] per target and layer, in HF module names from the architecture's table."""
    from codegen_jax import hf_params

    table = hf_params.table_for(model_cfg)
    hf_name = {row.ours: row.hf for row in table.layer}
    out = []
    for i in range(model_cfg.n_layers):
        block = params["blocks"] if model_cfg.scan_layers else params["blocks"][i]
        for t in lora.targets:
            module, name, n_in = TARGETS[t]
            a_name, b_name = param_names(t)
            a, b = np.asarray(block[module][a_name]), np.asarray(block[module][b_name])
            if model_cfg.scan_layers:
                a, b = a[i], b[i]
            base = hf_name[(module, name)].format(i=i).removesuffix(".weight")
            out.append(PeftTensor(f"base_model.model.{base}.lora_A.weight",
                                  np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)))
            out.append(PeftTensor(f"base_model.model.{base}.lora_B.weight",
                                  np.ascontiguousarray(b.reshape(b.shape[0], -1).T)))
    return out


def peft_config(model_cfg: Any, lora: Any, base: str | None) -> dict[str, Any]:
    """adapter_config.json, as `peft.LoraConfig(...).save_pretrained` writes it; `base` names the base
    model for `AutoPeftModel` (a hub id or HF directory; None when there is none to name)."""
    from codegen_jax import hf_params

    table = hf_params.table_for(model_cfg)
    hf_name = {row.ours: row.hf for row in table.layer}
    modules = sorted({hf_name[TARGETS[t][0], TARGETS[t][1]].split(".")[-2] for t in lora.targets})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
            "base_model_name_or_path": base, "revision": None}
