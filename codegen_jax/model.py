"""The Llama-family decoder in Flax NNX: the same function as HF transformers' `LlamaForCausalLM`.

Read top to bottom: RMSNorm → RoPE → attention (segment-aware causal mask, optional KV cache) →
SwiGLU MLP → Block → Decoder. One module serves training (packed rows with segment ids and positions)
and decoding (prefill writes the cache, one-token steps read it). Shape suffixes: b batch, t query
length, s key length, d model, h heads, g kv heads, k head dim, f mlp, v vocab, l layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from codegen_jax.config import ModelConfig
from codegen_jax.sharding import constrain, state_shardings

Cache = dict[str, jax.Array]  # k_lbsgk, v_lbsgk, segment_ids_bs, index (slots written so far)

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype: Any,
           std: float | None = 0.02) -> nnx.Param:
    """A parameter with logical axis names; `std=None` gives ones (norm scales), 0.0 zeros (biases)."""
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=names)


class RMSNorm(nnx.Module):
    """y = weight * x / rms(x), normalized in fp32 and cast back before the scale (as HF does)."""

    def __init__(self, dim: int, eps: float, param_dtype: Any, rngs: nnx.Rngs):
        self.weight = _param(rngs, (dim,), ("norm",), param_dtype, std=None)
        self.eps = eps

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x32 = x_btd.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x_btd.dtype) * x32.astype(x_btd.dtype)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., i...] @ w [i..., o...] (the last `n_in` axes of x contracted with the first of w) as one
    2-D matmul. Why: XLA:CPU runs dots with several free axes per side slowly, the weight gradient of
    "btd,df->btf" (contracting b and t) most of all; flat, a CPU training step takes 20-40% less time.
    The reshapes merge adjacent row-major axes, so they are free (and keep a batch-axis sharding)."""
    lead, inner = x.shape[:x.ndim - n_in], w.shape[:n_in]
    y = jnp.dot(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1))
    return y.reshape(*lead, *w.shape[n_in:])


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x [..., k] at `positions` shaped like x[..., 0] up to broadcasting ([b, t, 1]
    for [b, t, h, k], [b, 1, t] for head-major [b, h, t, k]), in HF's rotate-half layout (first half /
    second half, not interleaved). HF's x * cos + rotate_half(x) * sin written on the halves,
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]: half-width cos/sin and no negated copy, ~40% less
    work forward and backward on CPU."""
    k = x.shape[-1]
    inv_freq_k2 = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq_k2  # [b, t, 1, k/2] or [b, 1, t, k/2]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(seg_q_bt: jax.Array, seg_k_bs: jax.Array, slot_q_bt: jax.Array,
                   slot_k_bs: jax.Array) -> jax.Array:
    """[b, 1, t, s] bool: same segment (packed documents never mix, empty cache slots hold 0) and causal
    by slot index (a row's slots are in time order, also with left padding)."""
    same = seg_q_bt[:, :, None] == seg_k_bs[:, None, :]
    causal = slot_q_bt[:, :, None] >= slot_k_bs[:, None, :]
    return (same & causal)[:, None, :, :]


ATTENTION_BLOCK = 128  # query rows per block of the causal attention (64-128 measured best on CPU)


def causal_attention(q_bhtk: jax.Array, k_bgtk: jax.Array, v_bgtk: jax.Array, segment_ids_bt: jax.Array,
                     block: int = ATTENTION_BLOCK) -> jax.Array:
    """Causal, segment-masked grouped-query attention of a row with itself (training), head-major
    [b, h, t, k] in and out, blockwise: each block of `block` queries attends only to the keys up to
    its own end, so the logits above the diagonal blocks are never computed (5/8 of the full [t, t]
    work at 4 blocks, tending to 1/2). Numerics of `jax.nn.dot_product_attention`: fp32 logits and
    softmax, masked with -0.7 * max, probabilities cast back to the value dtype."""
    b, h, t, kd = q_bhtk.shape
    g = k_bgtk.shape[1]
    logits_dtype = jnp.promote_types(q_bhtk.dtype, jnp.float32)
    masked = -0.7 * jnp.finfo(logits_dtype).max
    q_bgrtk = q_bhtk.reshape(b, g, h // g, t, kd)  # the r = h / g query heads sharing a kv head
    k_bgsk, v_bgsk = k_bgtk, v_bgtk  # keys and values indexed by key slot s
    slots_t = jnp.arange(t)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        logits = jnp.einsum("bgrtk,bgsk->bgrts", q_bgrtk[:, :, :, start:end], k_bgsk[:, :, :end],
                            preferred_element_type=logits_dtype) * jnp.array(kd ** -0.5, logits_dtype)
        same_tt = segment_ids_bt[:, start:end, None] == segment_ids_bt[:, None, :end]
        mask_tt = same_tt & (slots_t[start:end, None] >= slots_t[None, :end])
        logits = jnp.where(mask_tt[:, None, None], logits, masked)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v_bgsk.dtype)
        outs.append(jnp.einsum("bgrts,bgsk->bgrtk", probs, v_bgsk[:, :, :end]))
    o_bgrtk = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return o_bgrtk.reshape(b, h, t, kd)


def dot_product_attention(q_bthk, k_bsgk, v_bsgk, mask_b1ts, impl: str) -> jax.Array:
    """Grouped-query attention; `impl` picks XLA (CPU, TPU) or cuDNN's fused kernel (GPU)."""
    implementation = {"xla": "xla", "cudnn": "cudnn", "auto": None}[impl]
    return jax.nn.dot_product_attention(q_bthk, k_bsgk, v_bsgk, mask=mask_b1ts,
                                        implementation=implementation)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, g, k, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        self.w_q_dhk = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), pd)
        self.w_k_dgk = _param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), pd)
        self.w_v_dgk = _param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), pd)
        self.w_o_hkd = _param(rngs, (h, k, d), ("heads", "head_dim", "embed"), pd)
        if cfg.attention_bias:
            self.b_q_hk = _param(rngs, (h, k), ("heads", "head_dim"), pd, std=0.0)
            self.b_k_gk = _param(rngs, (g, k), ("kv_heads", "head_dim"), pd, std=0.0)
            self.b_v_gk = _param(rngs, (g, k), ("kv_heads", "head_dim"), pd, std=0.0)
        self.cfg = cfg

    def _project(self, x_btd, w, b_name, heads_first: bool = False):
        """[b, t, h, k], or head-major [b, h, t, k] with `heads_first`."""
        y_bthk = dense(x_btd, w[...].astype(x_btd.dtype))
        if self.cfg.attention_bias:
            y_bthk = y_bthk + getattr(self, b_name)[...].astype(x_btd.dtype)
        return jnp.swapaxes(y_bthk, 1, 2) if heads_first else y_bthk

    def _self_attention(self, x_btd, positions_bt, segment_ids_bt):
        """Training (no cache): head-major [b, h, t, k] from the projections on, so the blockwise
        attention's matmuls need no transposes, then straight back to [b, t, d]."""
        cfg, pos_b1t = self.cfg, positions_bt[:, None, :]
        q_bhtk = rope(self._project(x_btd, self.w_q_dhk, "b_q_hk", True), pos_b1t, cfg.rope_theta)
        k_bgtk = rope(self._project(x_btd, self.w_k_dgk, "b_k_gk", True), pos_b1t, cfg.rope_theta)
        v_bgtk = self._project(x_btd, self.w_v_dgk, "b_v_gk", True)
        q_bhtk = constrain(q_bhtk, "batch", "heads", "length", None)
        o_bhtk = causal_attention(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt)
        return dense(jnp.swapaxes(o_bhtk, 1, 2), self.w_o_hkd[...].astype(x_btd.dtype), n_in=2)

    def __call__(self, x_btd, positions_bt, segment_ids_bt, cache_kv=None, cache_seg_bs=None,
                 index=None):
        """Returns (out_btd, (k_bsgk, v_bsgk)): the new cache for this layer, or None without one."""
        cfg = self.cfg
        if cache_kv is None and cfg.attention == "xla":
            return self._self_attention(x_btd, positions_bt, segment_ids_bt), None
        pos_bt1 = positions_bt[..., None]
        q_bthk = rope(self._project(x_btd, self.w_q_dhk, "b_q_hk"), pos_bt1, cfg.rope_theta)
        k_btgk = rope(self._project(x_btd, self.w_k_dgk, "b_k_gk"), pos_bt1, cfg.rope_theta)
        v_btgk = self._project(x_btd, self.w_v_dgk, "b_v_gk")
        q_bthk = constrain(q_bthk, "batch", "length", "heads", None)
        t = x_btd.shape[1]
        if cache_kv is None:  # training / full forward with a fused kernel: keys are the row itself
            slots_bt = jnp.broadcast_to(jnp.arange(t), segment_ids_bt.shape)
            mask = attention_mask(segment_ids_bt, segment_ids_bt, slots_bt, slots_bt)
            new_kv, k_bsgk, v_bsgk = None, k_btgk, v_btgk
        else:  # decode: write this chunk at slot `index`, attend over the whole cache
            k_cache, v_cache = cache_kv
            k_bsgk = jax.lax.dynamic_update_slice_in_dim(k_cache, k_btgk.astype(k_cache.dtype), index, 1)
            v_bsgk = jax.lax.dynamic_update_slice_in_dim(v_cache, v_btgk.astype(v_cache.dtype), index, 1)
            s = k_bsgk.shape[1]
            slots_q_bt = jnp.broadcast_to(index + jnp.arange(t), segment_ids_bt.shape)
            slots_k_bs = jnp.broadcast_to(jnp.arange(s), cache_seg_bs.shape)
            mask = attention_mask(segment_ids_bt, cache_seg_bs, slots_q_bt, slots_k_bs)
            new_kv = (k_bsgk, v_bsgk)
            k_bsgk, v_bsgk = k_bsgk.astype(x_btd.dtype), v_bsgk.astype(x_btd.dtype)
        o_bthk = dot_product_attention(q_bthk, k_bsgk, v_bsgk, mask, cfg.attention)
        out_btd = dense(o_bthk, self.w_o_hkd[...].astype(x_btd.dtype), n_in=2)
        return out_btd, new_kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.d_ff, cfg.param_dtype
        self.w_gate_df = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.w_up_df = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.w_down_fd = _param(rngs, (f, d), ("mlp", "embed"), pd)

    def __call__(self, x_btd):
        dt = x_btd.dtype
        gate_btf = jax.nn.silu(dense(x_btd, self.w_gate_df[...].astype(dt)))
        h_btf = constrain(gate_btf * dense(x_btd, self.w_up_df[...].astype(dt)), "batch", "length", "mlp")
        return dense(h_btf, self.w_down_fd[...].astype(dt))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_btd, positions_bt, segment_ids_bt, cache_kv=None, cache_seg_bs=None, index=None):
        h_btd, new_kv = self.attn(self.attn_norm(x_btd), positions_bt, segment_ids_bt, cache_kv,
                                  cache_seg_bs, index)
        x_btd = x_btd + h_btd
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return constrain(x_btd, "batch", "length", "act_embed"), new_kv


def _run_block(graphdef, state, x_btd, positions_bt, segment_ids_bt, cache_kv, cache_seg_bs, index):
    """A Block as a pure function of its state (what scan and remat need)."""
    return nnx.merge(graphdef, state)(x_btd, positions_bt, segment_ids_bt, cache_kv, cache_seg_bs, index)


class Decoder(nnx.Module):
    """Token embedding → n_layers Blocks (scanned or a list) → final RMSNorm → LM head (or tied)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, v, pd = cfg.d_model, cfg.vocab_size, cfg.param_dtype
        self.embed_vd = _param(rngs, (v, d), ("vocab", "embed"), pd)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs):
                return Block(cfg, rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(d, cfg.norm_eps, pd, rngs)
        if not cfg.tie_embeddings:
            self.lm_head_dv = _param(rngs, (d, v), ("embed", "vocab"), pd)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None, cache: Cache | None = None,
                 last_only: bool = False) -> tuple[jax.Array, Cache | None]:
        """Logits [b, t, v] in fp32 ([b, 1, v] with `last_only`), and the updated cache when one is given.

        `segment_ids_bt` (0 = padding) defaults to one segment per row and `positions_bt` to 0..t-1.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones_like(tokens_bt)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x_btd = jnp.take(self.embed_vd[...], tokens_bt, axis=0).astype(dt)
        x_btd = constrain(x_btd, "batch", "length", "act_embed")
        index = cache_seg_bs = None
        if cache is not None:
            index = cache["index"]
            cache_seg_bs = jax.lax.dynamic_update_slice_in_dim(
                cache["segment_ids"], segment_ids_bt.astype(cache["segment_ids"].dtype), index, 1)
        x_btd, kv = self._run_layers(x_btd, positions_bt, segment_ids_bt, cache, cache_seg_bs, index)
        if last_only:  # prefill needs the last position only; all [b, t, v] fp32 logits can be GBs
            x_btd = x_btd[:, -1:]
        x_btd = self.final_norm(x_btd)
        w_dv = self.embed_vd[...].T if cfg.tie_embeddings else self.lm_head_dv[...]
        logits_btv = dense(x_btd, w_dv.astype(dt)).astype(jnp.float32)
        logits_btv = constrain(logits_btv, "batch", "length", "vocab")
        new_cache = None
        if cache is not None:
            new_cache = {"k": kv[0], "v": kv[1], "segment_ids": cache_seg_bs,
                         "index": index + tokens_bt.shape[1]}
        return logits_btv, new_cache

    def _run_layers(self, x_btd, positions_bt, segment_ids_bt, cache, cache_seg_bs, index):
        remat = self.cfg.remat
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            fn = functools.partial(_run_block, graphdef)
            if remat != "none":
                fn = jax.checkpoint(fn, policy=_REMAT_POLICIES[remat])

            def body(x, layer):
                state_l, kv_l = layer
                x, new_kv = fn(state_l, x, positions_bt, segment_ids_bt, kv_l, cache_seg_bs, index)
                return x, new_kv

            kv_in = None if cache is None else (cache["k"], cache["v"])
            x_btd, kv_out = jax.lax.scan(body, x_btd, (state, kv_in))
            return x_btd, kv_out
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            graphdef, state = nnx.split(block)
            fn = functools.partial(_run_block, graphdef)
            if remat != "none":
                fn = jax.checkpoint(fn, policy=_REMAT_POLICIES[remat])
            kv_l = None if cache is None else (cache["k"][i], cache["v"][i])
            x_btd, new_kv = fn(state, x_btd, positions_bt, segment_ids_bt, kv_l, cache_seg_bs, index)
            if new_kv is not None:
                ks.append(new_kv[0])
                vs.append(new_kv[1])
        return x_btd, ((jnp.stack(ks), jnp.stack(vs)) if cache is not None else None)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache: every slot's segment id is 0, so nothing attends to it until written."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.array(0, jnp.int32)}


def create_model(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> Decoder:
    """A randomly initialised Decoder whose parameters are created already sharded on `mesh`
    (inside one jit with out_shardings, so no device or host ever holds a full unsharded copy)."""
    def make() -> Decoder:
        return Decoder(cfg, nnx.Rngs(params=seed))

    with nnx.use_eager_sharding(False):
        graphdef, abs_state = nnx.split(nnx.eval_shape(make))
        shardings = state_shardings(abs_state, mesh) if mesh is not None else None
        state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """GraphDef and shape-only State of a Decoder (no memory allocated): for restore and planning."""
    with nnx.use_eager_sharding(False):
        return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0))))


def param_count(cfg: ModelConfig) -> int:
    """Analytic parameter count (the tests check it against the real model)."""
    d, h, g, k, f, v, n = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           cfg.vocab_size, cfg.n_layers)
    attn = d * h * k * 2 + d * g * k * 2 + ((h + 2 * g) * k if cfg.attention_bias else 0)
    per_layer = attn + 3 * d * f + 2 * d
    return v * d + n * per_layer + d + (0 if cfg.tie_embeddings else d * v)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul weight (embedding lookup excluded) plus attention's two
    [t, s] matmuls counted over the causal half, as MaxText does; training is 3x forward."""
    d, h, g, k, f, v, n = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           cfg.vocab_size, cfg.n_layers)
    matmul_params = n * (d * h * k * 2 + d * g * k * 2 + 3 * d * f) + d * v
    attention = n * 2 * 2 * h * k * seq_len / 2
    forward = 2 * matmul_params + attention
    return 3 * forward if training else forward


# ---------------------------------------------------------------------------------------------------
# The one-token decode step (the sampler's hot loop): the Decoder's math restructured for speed
# (tests hold it to the Decoder token for token): per-layer parameters (no stacked-layer slicing each
# step), and per-layer caches updated in place (no full-cache copy or transpose per layer per step,
# which made the Decoder's cache path O(cache) in memory traffic per step). Keys are kept [b, g, k, s]
# and values [b, g, s, k]: both attention products are then plain [r, k] @ [k, s] and [r, s] @ [s, k]
# matmuls per (row, kv head), which XLA's CPU dot runs ~2x faster than the [s, k]-transposed form for
# grouped-query heads (the key write per step is a strided [b, g, k, 1] slice, a few KB).

K_BGKS = ("batch", "kv_heads", "head_dim", "length")
V_BGSK = ("batch", "kv_heads", "length", "head_dim")


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


def per_layer_model(model: nnx.Module, model_cfg: ModelConfig, mesh: jax.sharding.Mesh | None
                    ) -> tuple[nnx.GraphDef, nnx.State, ModelConfig]:
    """(graphdef, state, config) of the same Decoder with unstacked layers (`scan_layers=False`),
    parameters laid out on `mesh` by the rules table."""
    cfg = dataclasses.replace(model_cfg, scan_layers=False)
    params = layer_layout(nnx.to_pure_dict(nnx.state(model)), model_cfg.scan_layers, scan_layers=False)
    graphdef, abs_state = abstract_model(cfg)
    if mesh is not None:
        target = nnx.to_pure_dict(state_shardings(abs_state, mesh))
        params = jax.tree.map(lambda x, s: jax.device_put(x, s), params, target)
    nnx.replace_by_pure_dict(abs_state, params)
    return graphdef, abs_state, cfg


def cached_attention(q_bhk: jax.Array, k_bgks: jax.Array, v_bgsk: jax.Array, mask_bs: jax.Array
                     ) -> jax.Array:
    """One query per row against the cache, grouped-query; the numerics of
    `jax.nn.dot_product_attention` (fp32 logits and softmax, masked with -0.7 * max)."""
    b, h, kd = q_bhk.shape
    g = k_bgks.shape[1]
    q_bgrk = q_bhk.reshape(b, g, h // g, kd)
    logits_dtype = jnp.promote_types(q_bhk.dtype, jnp.float32)
    logits_bgrs = jnp.einsum("bgrk,bgks->bgrs", q_bgrk, k_bgks, preferred_element_type=logits_dtype)
    logits_bgrs = logits_bgrs * jnp.array(kd ** -0.5, logits_dtype)
    logits_bgrs = jnp.where(mask_bs[:, None, None, :], logits_bgrs, -0.7 * jnp.finfo(logits_dtype).max)
    probs_bgrs = jax.nn.softmax(logits_bgrs.astype(jnp.float32), axis=-1).astype(v_bgsk.dtype)
    return jnp.einsum("bgrs,bgsk->bgrk", probs_bgrs, v_bgsk).reshape(b, h, kd)


def _block_step(block: nnx.Module, x_b1d: jax.Array, pos_b1: jax.Array, k_bgks: jax.Array,
                v_bgsk: jax.Array, index: jax.Array, mask_bs: jax.Array):
    """`Block.__call__` for one new token per row, writing its k/v at cache slot `index`."""
    attn, cfg, dt = block.attn, block.attn.cfg, x_b1d.dtype
    h_b1d = block.attn_norm(x_b1d)
    q_b1hk = rope(attn._project(h_b1d, attn.w_q_dhk, "b_q_hk"), pos_b1[..., None], cfg.rope_theta)
    k_b1gk = rope(attn._project(h_b1d, attn.w_k_dgk, "b_k_gk"), pos_b1[..., None], cfg.rope_theta)
    v_b1gk = attn._project(h_b1d, attn.w_v_dgk, "b_v_gk")
    zero = jnp.zeros((), index.dtype)
    k_bgks = jax.lax.dynamic_update_slice(k_bgks, k_b1gk.transpose(0, 2, 3, 1).astype(k_bgks.dtype),
                                          (zero, zero, zero, index))
    v_bgsk = jax.lax.dynamic_update_slice(v_bgsk, v_b1gk.transpose(0, 2, 1, 3).astype(v_bgsk.dtype),
                                          (zero, zero, index, zero))
    k_bgks, v_bgsk = constrain(k_bgks, *K_BGKS), constrain(v_bgsk, *V_BGSK)
    q_b1hk = constrain(q_b1hk, "batch", "length", "heads", None)
    o_bhk = cached_attention(q_b1hk[:, 0], k_bgks.astype(dt), v_bgsk.astype(dt), mask_bs)
    x_b1d = x_b1d + jnp.einsum("bhk,hkd->bd", o_bhk, attn.w_o_hkd[...].astype(dt))[:, None]
    x_b1d = x_b1d + block.mlp(block.mlp_norm(x_b1d))
    return constrain(x_b1d, "batch", "length", "act_embed"), k_bgks, v_bgsk


def decode_step(model: nnx.Module, cache: dict[str, Any], token_b: jax.Array, pos_b: jax.Array
                ) -> tuple[jax.Array, dict[str, Any]]:
    """Logits [b, v] (fp32) of one new token per row and the updated per-layer cache: the Decoder's
    forward pass with a cache, for t = 1 and segment id 1."""
    cfg, dt = model.cfg, jnp.dtype(model.cfg.dtype)
    index = cache["index"]
    b = token_b.shape[0]
    seg_bs = jax.lax.dynamic_update_slice(cache["segment_ids"], jnp.ones((b, 1), jnp.int32),
                                          (jnp.zeros((), index.dtype), index))
    mask_bs = seg_bs == 1  # this row's real tokens; slots past `index` are unwritten (segment 0)
    x_b1d = constrain(jnp.take(model.embed_vd[...], token_b[:, None], axis=0).astype(dt),
                      "batch", "length", "act_embed")
    ks, vs = [], []
    for block, k_bgks, v_bgsk in zip(model.blocks, cache["k"], cache["v"]):
        x_b1d, k_bgks, v_bgsk = _block_step(block, x_b1d, pos_b[:, None], k_bgks, v_bgsk, index, mask_bs)
        ks.append(k_bgks)
        vs.append(v_bgsk)
    x_bd = model.final_norm(x_b1d)[:, 0]
    w_dv = model.embed_vd[...].T if cfg.tie_embeddings else model.lm_head_dv[...]
    logits_bv = jnp.einsum("bd,dv->bv", x_bd, w_dv.astype(dt)).astype(jnp.float32)
    logits_bv = constrain(logits_bv, "batch", "vocab")
    return logits_bv, {"k": ks, "v": vs, "segment_ids": seg_bs, "index": index + 1}


def per_layer_cache(cache: dict[str, jax.Array], length: int | None = None) -> dict[str, Any]:
    """The Decoder's [l, b, s, g, k] cache as per-layer keys [b, g, k, s] and values [b, g, s, k]
    (done once, after prefill), padded with empty slots (segment 0) to `length` slots if given."""
    n, s = cache["k"].shape[0], cache["k"].shape[2]
    pad = (length or s) - s

    def keys(x_bsgk):
        return constrain(jnp.pad(x_bsgk.transpose(0, 2, 3, 1), ((0, 0), (0, 0), (0, 0), (0, pad))), *K_BGKS)

    def values(x_bsgk):
        return constrain(jnp.pad(x_bsgk.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0))), *V_BGSK)

    return {"k": [keys(cache["k"][i]) for i in range(n)], "v": [values(cache["v"][i]) for i in range(n)],
            "segment_ids": constrain(jnp.pad(cache["segment_ids"], ((0, 0), (0, pad))), "batch", "length"),
            "index": cache["index"]}
