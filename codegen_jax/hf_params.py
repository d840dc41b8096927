"""The tensor mapping between our parameters and Hugging Face checkpoints: one declarative table per
architecture, read by both import and export (as Tunix keeps checkpoint mapping apart from the model).

A table row says: this leaf of ours (a path in the model's pure-dict state; per-layer rows name the
path inside one Block) is this HF tensor, through this `Layout` (how our array becomes torch's
[out, in] Linear layout and back), when the model config has the feature the row needs. Nothing else
in the code knows an HF tensor name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from codegen_jax.config import ModelConfig
from codegen_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an array of ours is laid out in torch: `to_hf(x)`, `from_hf(y, our_shape)`, and the torch
    shape of one of our shapes (computed without data, for planning files and checking shapes)."""

    name: str
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray, tuple], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


SAME = Layout("same", lambda x: x, lambda y, shape: y.reshape(shape), tuple)
TRANSPOSE = Layout("transpose", lambda x: x.T, lambda y, shape: y.T, lambda s: tuple(reversed(s)))
# [d, h, k] -> Linear weight [h*k, d]: the heads' outputs concatenated
HEADS_OUT = Layout("[d,h,k]->[h*k,d]", lambda x: x.reshape(x.shape[0], -1).T,
                   lambda y, shape: y.T.reshape(shape), lambda s: (math.prod(s[1:]), s[0]))
# [h, k, d] -> Linear weight [d, h*k]: the heads' inputs concatenated
HEADS_IN = Layout("[h,k,d]->[d,h*k]", lambda x: x.reshape(-1, x.shape[-1]).T,
                  lambda y, shape: y.T.reshape(shape), lambda s: (s[-1], math.prod(s[:-1])))
# [h, k] -> bias [h*k]
FLAT = Layout("[h,k]->[h*k]", lambda x: x.reshape(-1), lambda y, shape: y.reshape(shape),
              lambda s: (math.prod(s),))


def always(_: ModelConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Row:
    ours: tuple[str, ...]
    hf: str  # "{i}" stands for the layer index in per-layer rows
    layout: Layout
    when: Callable[[ModelConfig], bool] = always


@dataclasses.dataclass(frozen=True)
class Table:
    """One architecture: rows before the layers, rows of every layer, rows after the layers."""

    first: tuple[Row, ...]
    layer: tuple[Row, ...]
    last: tuple[Row, ...]


def _untied(c: ModelConfig) -> bool:
    return not c.tie_embeddings


def _qkv_bias(c: ModelConfig) -> bool:
    return c.attention_bias


def _o_bias(c: ModelConfig) -> bool:
    return c.attention_out_bias


def _mlp_bias(c: ModelConfig) -> bool:
    return c.mlp_bias


# attention: the same names in every architecture here (q/k/v biases and the o_proj bias when the
# config has them)
_ATTENTION = (
    Row(("attn", "w_q_dhk"), "model.layers.{i}.self_attn.q_proj.weight", HEADS_OUT),
    Row(("attn", "w_k_dgk"), "model.layers.{i}.self_attn.k_proj.weight", HEADS_OUT),
    Row(("attn", "w_v_dgk"), "model.layers.{i}.self_attn.v_proj.weight", HEADS_OUT),
    Row(("attn", "w_o_hkd"), "model.layers.{i}.self_attn.o_proj.weight", HEADS_IN),
    Row(("attn", "b_q_hk"), "model.layers.{i}.self_attn.q_proj.bias", FLAT, _qkv_bias),
    Row(("attn", "b_k_gk"), "model.layers.{i}.self_attn.k_proj.bias", FLAT, _qkv_bias),
    Row(("attn", "b_v_gk"), "model.layers.{i}.self_attn.v_proj.bias", FLAT, _qkv_bias),
    Row(("attn", "b_o_d"), "model.layers.{i}.self_attn.o_proj.bias", SAME, _o_bias),
)
_EMBED = Row(("embed_vd",), "model.embed_tokens.weight", SAME)
_LM_HEAD = Row(("lm_head_dv",), "lm_head.weight", TRANSPOSE, _untied)

# Llama, Mistral and Qwen2: RMSNorm, SwiGLU
LLAMA = Table(
    first=(_EMBED,),
    layer=(*_ATTENTION,
           Row(("mlp", "w_gate_df"), "model.layers.{i}.mlp.gate_proj.weight", TRANSPOSE),
           Row(("mlp", "w_up_df"), "model.layers.{i}.mlp.up_proj.weight", TRANSPOSE),
           Row(("mlp", "w_down_fd"), "model.layers.{i}.mlp.down_proj.weight", TRANSPOSE),
           Row(("attn_norm", "weight"), "model.layers.{i}.input_layernorm.weight", SAME),
           Row(("mlp_norm", "weight"), "model.layers.{i}.post_attention_layernorm.weight", SAME)),
    last=(Row(("final_norm", "weight"), "model.norm.weight", SAME), _LM_HEAD),
)

# StarCoder2 (`Starcoder2ForCausalLM`): LayerNorm with bias, GELU MLP c_fc -> c_proj
STARCODER2 = Table(
    first=(_EMBED,),
    layer=(*_ATTENTION,
           Row(("mlp", "w_fc_df"), "model.layers.{i}.mlp.c_fc.weight", TRANSPOSE),
           Row(("mlp", "b_fc_f"), "model.layers.{i}.mlp.c_fc.bias", SAME, _mlp_bias),
           Row(("mlp", "w_proj_fd"), "model.layers.{i}.mlp.c_proj.weight", TRANSPOSE),
           Row(("mlp", "b_proj_d"), "model.layers.{i}.mlp.c_proj.bias", SAME, _mlp_bias),
           Row(("attn_norm", "weight"), "model.layers.{i}.input_layernorm.weight", SAME),
           Row(("attn_norm", "b_d"), "model.layers.{i}.input_layernorm.bias", SAME),
           Row(("mlp_norm", "weight"), "model.layers.{i}.post_attention_layernorm.weight", SAME),
           Row(("mlp_norm", "b_d"), "model.layers.{i}.post_attention_layernorm.bias", SAME)),
    last=(Row(("final_norm", "weight"), "model.norm.weight", SAME),
          Row(("final_norm", "b_d"), "model.norm.bias", SAME), _LM_HEAD),
)

# (model.norm, model.mlp) -> table; other pairs have no HF architecture here
TABLES = {("rms", "swiglu"): LLAMA, ("layer", "gelu_tanh"): STARCODER2}


def table_for(cfg: ModelConfig) -> Table:
    """The table of the model's architecture (a UserError for a norm/MLP pair no table describes)."""
    table = TABLES.get((cfg.norm, cfg.mlp))
    if table is None:
        raise UserError(f"model.norm={cfg.norm} with model.mlp={cfg.mlp} has no Hugging Face architecture; "
                        "use rms with swiglu (Llama) or layer with gelu_tanh (StarCoder2)")
    return table


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor of a model: its name, our leaf path, the layer index into a stacked leaf (None
    when the path is the array itself), and the layout."""

    hf: str
    ours: tuple
    layer: int | None
    layout: Layout


def tensors(cfg: ModelConfig) -> Iterator[Tensor]:
    """Every HF tensor of a model with config `cfg`, in file order (embedding, layers, norm, head).
    With scanned layers a per-layer leaf is stacked and `layer` indexes its first axis; otherwise the
    path names the layer (`("blocks", i, ...)`)."""
    table = table_for(cfg)
    yield from (Tensor(r.hf, r.ours, None, r.layout) for r in table.first if r.when(cfg))
    for i in range(cfg.n_layers):
        for r in table.layer:
            if r.when(cfg):
                path = ("blocks", *r.ours) if cfg.scan_layers else ("blocks", i, *r.ours)
                yield Tensor(r.hf.format(i=i), path, i if cfg.scan_layers else None, r.layout)
    yield from (Tensor(r.hf, r.ours, None, r.layout) for r in table.last if r.when(cfg))


def leaf(tree: Any, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def our_shape(t: Tensor, params: Any) -> tuple:
    """Shape of the array behind `t` (one layer's slice of a stacked leaf)."""
    shape = tuple(leaf(params, t.ours).shape)
    return shape if t.layer is None else shape[1:]


def to_hf_state_dict(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """All tensors in torch layout (the whole model in memory: for tests and small models)."""
    out = {}
    for t in tensors(cfg):
        x = leaf(params, t.ours)
        x = np.asarray(x if t.layer is None else x[t.layer])
        out[t.hf] = np.ascontiguousarray(t.layout.to_hf(x))
    return out
