"""The Llama-family decoder in Flax NNX: the same function as HF transformers' `LlamaForCausalLM`
(and, through `model.norm` / `model.mlp` and the bias flags, `Starcoder2ForCausalLM`).

Read top to bottom: attention (RoPE and its scalings: `rope.py`) -> Block -> Decoder. The norms and
the flat matmul are in `layers.py`, the SwiGLU / GELU MLPs in `mlp.py`, the KV cache in
`kv_cache.py`. The norm and MLP kinds pick modules when the model is built, so the Llama path has no
per-call branches. Each layer has two entry points sharing its projection, RoPE and
masking code:
- `__call__` runs whole rows: training on packed rows (segment ids, positions), and prefill, which
  also returns every layer's keys and values for the KV cache;
- `decode` runs one new token per row against a `KVCache`.
The attention kernels themselves live in `attention.py`. Shape suffixes: b batch, t query length,
s key length (cache slots), d model, h heads, g kv heads, k head dim, f mlp, v vocab, l layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from codegen_jax import attention
from codegen_jax import lora as lora_lib
from codegen_jax.config import ModelConfig
from codegen_jax.kv_cache import K_BGKS, V_BGSK, KVCache, LayerCache, fill
from codegen_jax.layers import NORMS, dense, param
from codegen_jax.mlp import MLPS
from codegen_jax.rope import rope, rope_attention_scale, rope_inv_freq
from codegen_jax.sharding import constrain, state_shardings

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; `__call__` over rows, `decode` over a cache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: Any = None):
        d, h, g, k, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        self.w_q_dhk = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), pd)
        self.w_k_dgk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), pd)
        self.w_v_dgk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), pd)
        self.w_o_hkd = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), pd)
        if cfg.attention_bias:
            self.b_q_hk = param(rngs, (h, k), ("heads", "head_dim"), pd, std=0.0)
            self.b_k_gk = param(rngs, (g, k), ("kv_heads", "head_dim"), pd, std=0.0)
            self.b_v_gk = param(rngs, (g, k), ("kv_heads", "head_dim"), pd, std=0.0)
        if cfg.attention_out_bias:
            self.b_o_d = param(rngs, (d,), ("embed",), pd, std=0.0)
        self.cfg = cfg
        lora_lib.attach(self, lora, "attn", rngs)

    def _project(self, x_btd: jax.Array, w: nnx.Param, bias: str, target: str, key=None) -> jax.Array:
        """x [b, t, d] -> head-major [b, h, t, k] (one flat matmul, the bias, a LoRA adapter's delta)."""
        y_bthk = dense(x_btd, w[...].astype(x_btd.dtype))
        if self.cfg.attention_bias:
            y_bthk = y_bthk + getattr(self, bias)[...].astype(x_btd.dtype)
        if (delta_bthk := lora_lib.delta(self, target, x_btd, 1, key)) is not None:
            y_bthk = y_bthk + delta_bthk
        return jnp.swapaxes(y_bthk, 1, 2)

    def qkv(self, x_btd: jax.Array, positions_bt: jax.Array, key=None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [b, h, t, k] and keys, values [b, g, t, k] of x at `positions_bt`, RoPE applied."""
        pos_b1t = positions_bt[:, None, :]
        inv_freq_k2, scale = rope_inv_freq(self.cfg), rope_attention_scale(self.cfg)
        q_bhtk = rope(self._project(x_btd, self.w_q_dhk, "b_q_hk", "q", key), pos_b1t, inv_freq_k2, scale)
        k_bgtk = rope(self._project(x_btd, self.w_k_dgk, "b_k_gk", "k", key), pos_b1t, inv_freq_k2, scale)
        v_bgtk = self._project(x_btd, self.w_v_dgk, "b_v_gk", "v", key)
        return constrain(q_bhtk, "batch", "heads", "length", None), k_bgtk, v_bgtk

    def _out(self, o_bhtk: jax.Array, key=None) -> jax.Array:
        o_bthk = jnp.swapaxes(o_bhtk, 1, 2)
        y_btd = dense(o_bthk, self.w_o_hkd[...].astype(o_bhtk.dtype), n_in=2)
        if self.cfg.attention_out_bias:
            y_btd = y_btd + self.b_o_d[...].astype(y_btd.dtype)
        if (delta_btd := lora_lib.delta(self, "o", o_bthk, 2, key)) is not None:
            y_btd = y_btd + delta_btd
        return y_btd

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array, key=None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """(out [b, t, d], (keys, values) [b, g, t, k]): causal attention of each row with itself.
        `key`: LoRA dropout in training (None: none)."""
        q_bhtk, k_bgtk, v_bgtk = self.qkv(x_btd, positions_bt, key)
        o_bhtk = attention.self_attention(self.cfg.attention, q_bhtk, k_bgtk, v_bgtk, segment_ids_bt,
                                          self.cfg.sliding_window)
        return self._out(o_bhtk, key), (k_bgtk, v_bgtk)

    def decode(self, x_bd: jax.Array, pos_b: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        """One new token per row at position `pos_b` (= its cache slot): write its key and value there,
        attend over the row's slots [0, pos] (within the sliding window)."""
        q_bh1k, k_bg1k, v_bg1k = self.qkv(x_bd[:, None], pos_b[:, None])
        rows_b = jnp.arange(x_bd.shape[0])
        # one scatter per row: [g, k] values into slot pos_b[r], in place inside the decode loop
        k_bgks = cache.k_bgks.at[rows_b, :, :, pos_b].set(k_bg1k[:, :, 0].astype(cache.k_bgks.dtype))
        v_bgsk = cache.v_bgsk.at[rows_b, :, pos_b].set(v_bg1k[:, :, 0].astype(cache.v_bgsk.dtype))
        k_bgks, v_bgsk = constrain(k_bgks, *K_BGKS), constrain(v_bgsk, *V_BGSK)
        slots_s = jnp.arange(k_bgks.shape[-1])
        mask_bs = attention.visible(pos_b[:, None], slots_s[None, :], self.cfg.sliding_window)
        dt = x_bd.dtype
        o_bhk = attention.cached_attention(q_bh1k[:, :, 0], k_bgks.astype(dt), v_bgsk.astype(dt), mask_bs)
        return self._out(o_bhk[:, :, None])[:, 0], LayerCache(k_bgks, v_bgsk)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: Any = None):
        norm = NORMS[cfg.norm]
        self.attn_norm = norm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
        self.attn = Attention(cfg, rngs, lora)
        self.mlp_norm = norm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
        self.mlp = MLPS[cfg.mlp](cfg, rngs, lora)

    def __call__(self, x_btd, positions_bt, segment_ids_bt, key=None):
        """(x [b, t, d], (keys, values) of this layer); `key`: LoRA dropout."""
        keys = (None, None) if key is None else (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))
        h_btd, kv = self.attn(self.attn_norm(x_btd), positions_bt, segment_ids_bt, keys[0])
        x_btd = x_btd + h_btd
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd), keys[1])
        return constrain(x_btd, "batch", "length", "act_embed"), kv

    def decode(self, x_bd, pos_b, cache: LayerCache):
        h_bd, cache = self.attn.decode(self.attn_norm(x_bd), pos_b, cache)
        x_bd = x_bd + h_bd
        x_bd = x_bd + self.mlp(self.mlp_norm(x_bd))
        return constrain(x_bd, "batch", "act_embed"), cache


def _run_block(graphdef, state, x_btd, positions_bt, segment_ids_bt, key=None):
    """A Block as a pure function of its state (what scan and remat need)."""
    return nnx.merge(graphdef, state)(x_btd, positions_bt, segment_ids_bt, key)


class Decoder(nnx.Module):
    """Token embedding -> n_layers Blocks (scanned or a list) -> final norm -> LM head (or tied)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: Any = None):
        """`lora`: a config `lora` section; enabled, the targets get adapters (codegen_jax/lora.py)."""
        self.cfg = cfg
        self.lora = lora if lora is not None and lora.enabled else None
        d, v, pd = cfg.d_model, cfg.vocab_size, cfg.param_dtype
        self.embed_vd = param(rngs, (v, d), ("vocab", "embed"), pd)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return Block(cfg, rngs, self.lora)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs, self.lora) for _ in range(cfg.n_layers)])
        self.final_norm = NORMS[cfg.norm](d, cfg.norm_eps, pd, rngs)
        if not cfg.tie_embeddings:
            self.lm_head_dv = param(rngs, (d, v), ("embed", "vocab"), pd)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings in the compute dtype, [b, t, d] or [b, d]."""
        return jnp.take(self.embed_vd[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: fp32 logits [..., v] of hidden states [..., d]."""
        x = self.final_norm(x)
        w_dv = self.embed_vd[...].T if self.cfg.tie_embeddings else self.lm_head_dv[...]
        return dense(x, w_dv.astype(x.dtype)).astype(jnp.float32)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None, *, cache: KVCache | None = None,
                 logits_at_b: jax.Array | None = None, dropout_key: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """Logits of whole rows: [b, t, v] fp32, or [b, v] at position `logits_at_b` of each row.

        `segment_ids_bt` (0 = padding) defaults to one segment per row and `positions_bt` to 0..t-1.
        With `cache` (empty, at least t slots) this is prefill: each row is one right-padded prompt,
        its keys and values go to slots [0, t) and its length is its number of non-padding tokens;
        the filled cache is returned (else None). `dropout_key`: LoRA dropout (training only)."""
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        x_btd, kv = self.hidden(tokens_bt, positions_bt, segment_ids_bt, keep_kv=cache is not None,
                                dropout_key=dropout_key)
        if logits_at_b is not None:  # prefill needs one position per row; all [b, t, v] logits can be GBs
            x_btd = jnp.take_along_axis(x_btd, logits_at_b[:, None, None], axis=1)
        logits = self.logits(x_btd)
        filled = None if cache is None else fill(cache, kv, segment_ids_bt)
        if logits_at_b is not None:
            return constrain(logits[:, 0], "batch", "vocab"), filled
        return constrain(logits, "batch", "length", "vocab"), filled

    def hidden(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None, keep_kv: bool = False,
               dropout_key: jax.Array | None = None) -> tuple[jax.Array, list | None]:
        """The last block's output [b, t, d] (before the final norm; `logits` takes it from there), and
        with `keep_kv` every layer's keys and values."""
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x_btd = constrain(self.embed(tokens_bt), "batch", "length", "act_embed")
        return self._run_layers(x_btd, positions_bt, segment_ids_bt, keep_kv, dropout_key)

    def decode(self, tokens_b: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits [b, v] (fp32) of one new token per row, at position `cache.lengths_b`, and the cache
        with it written and every length one longer."""
        pos_b = cache.lengths_b
        x_bd = constrain(self.embed(tokens_b), "batch", "act_embed")
        layers = []
        for i, layer_cache in enumerate(cache.layers):
            x_bd, layer_cache = self.block(i).decode(x_bd, pos_b, layer_cache)
            layers.append(layer_cache)
        return constrain(self.logits(x_bd), "batch", "vocab"), KVCache(tuple(layers), pos_b + 1)

    def block(self, i: int) -> Block:
        """Layer i as a Block (a static slice of the stacked parameters when layers are scanned)."""
        if not self.cfg.scan_layers:
            return self.blocks[i]
        graphdef, state = nnx.split(self.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


    def _run_layers(self, x_btd, positions_bt, segment_ids_bt, keep_kv: bool, key=None):
        """All blocks (scanned or unrolled, rematerialized per `model.remat`); the per-layer keys and
        values are returned only with `keep_kv` (prefill). `key`: LoRA dropout, one per layer."""
        remat, n = self.cfg.remat, self.cfg.n_layers
        keys = None if key is None else jax.random.split(key, n)

        def wrap(fn):
            return jax.checkpoint(fn, policy=_REMAT_POLICIES[remat]) if remat != "none" else fn

        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            fn = wrap(functools.partial(_run_block, graphdef))

            def body(x, layer):
                state_l, key_l = layer
                x, kv = fn(state_l, x, positions_bt, segment_ids_bt, key_l)
                return x, (kv if keep_kv else None)

            x_btd, kv = jax.lax.scan(body, x_btd, (state, keys))
            if not keep_kv:
                return x_btd, None
            return x_btd, [(kv[0][i], kv[1][i]) for i in range(self.cfg.n_layers)]
        kvs = []
        for i, block in enumerate(self.blocks):
            graphdef, state = nnx.split(block)
            fn = wrap(functools.partial(_run_block, graphdef))
            x_btd, kv = fn(state, x_btd, positions_bt, segment_ids_bt, None if keys is None else keys[i])
            kvs.append(kv)
        return x_btd, (kvs if keep_kv else None)


def resolve_config(cfg: ModelConfig, platform: str) -> ModelConfig:
    """The config with `attention: auto` replaced by the kernel for `platform`."""
    return dataclasses.replace(cfg, attention=attention.resolve(cfg.attention, platform, cfg.dtype))


def _platform(mesh: jax.sharding.Mesh | None) -> str:
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def create_model(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
                 lora: Any = None) -> Decoder:
    """A randomly initialised Decoder (with the `lora` section's adapters when enabled) whose
    parameters are created already sharded on `mesh` (inside one jit with out_shardings, so no device
    or host ever holds a full unsharded copy)."""
    cfg = resolve_config(cfg, _platform(mesh))

    def make() -> Decoder:  # adapters draw from their own stream: the base weights match a run without LoRA
        return Decoder(cfg, nnx.Rngs(params=seed, lora=seed), lora)

    with nnx.use_eager_sharding(False):
        graphdef, abs_state = nnx.split(nnx.eval_shape(make))
        shardings = state_shardings(abs_state, mesh) if mesh is not None else None
        state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig, platform: str | None = None, lora: Any = None
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """GraphDef and shape-only State of a Decoder (no memory allocated): for restore and planning.
    `platform` resolves `attention: auto` (default: this process's backend)."""
    cfg = resolve_config(cfg, platform or jax.default_backend())
    with nnx.use_eager_sharding(False):
        return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0, lora=0), lora)))


def layer_layout(params: dict, scanned: bool, scan_layers: bool) -> dict:
    """Params (pure dict) with `blocks` stacked [l, ...] (scan_layers) or as {i: layer} (a list)."""
    blocks = params["blocks"]
    if scanned == scan_layers:
        return params
    if scanned:
        n = jax.tree.leaves(blocks)[0].shape[0]
        return {**params, "blocks": {i: jax.tree.map(lambda a: a[i], blocks) for i in range(n)}}
    layers = [blocks[i] for i in sorted(blocks)]
    return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def unstacked(model: Decoder, mesh: jax.sharding.Mesh | None) -> tuple[nnx.GraphDef, nnx.State, ModelConfig]:
    """(graphdef, state, config) of the same Decoder with a list of layers (`scan_layers=False`),
    parameters laid out on `mesh` by the rules table. The sampler decodes with this layout: a decode
    step then reads each layer's parameters in place, with no slicing of the stack per step."""
    cfg = dataclasses.replace(model.cfg, scan_layers=False)
    params = layer_layout(nnx.to_pure_dict(nnx.state(model)), model.cfg.scan_layers, scan_layers=False)
    graphdef, abs_state = abstract_model(cfg, _platform(mesh), model.lora)
    if mesh is not None:
        target = nnx.to_pure_dict(state_shardings(abs_state, mesh))
        params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, target)
    nnx.replace_by_pure_dict(abs_state, params)
    return graphdef, abs_state, cfg
