"""Attention kernels, apart from the modules that call them: the blockwise causal attention of training
and prefill (XLA), the fused kernels (cuDNN on GPU, Pallas splash attention on TPU), and one query per
row against a KV cache (decode).

All share one masking rule: a query attends to a key of the same segment (packed documents never
mix; segment 0 is padding), at or before its own position, and within `window` positions when a
sliding window is set (window 0 = unlimited). Masked logits get `mask_value`, the constant
`jax.nn.dot_product_attention` uses, so every path has its numerics. Shape suffixes: b batch, h query
heads, g kv heads, r = h / g query heads per kv head, t queries, s keys, k head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK = 128  # query rows per block of the blockwise attention (64-128 measured best on CPU)


def mask_value(dtype) -> jax.Array:
    """What a masked logit is set to: large and negative but finite (no NaN for a fully masked row)."""
    return jnp.asarray(-0.7 * jnp.finfo(dtype).max, dtype)


def visible(q_pos, k_pos, window: int):
    """Causal (and sliding-window) visibility of key positions from query positions, broadcasting."""
    ok = q_pos >= k_pos
    return ok & (q_pos - k_pos < window) if window > 0 else ok


def _query_blocks(t: int, block: int, window: int) -> list[tuple[int, int, int]]:
    """(start, end, first) per block of queries [start, end): the keys it can see are [first, end)."""
    out = []
    for start in range(0, t, block):
        end = min(start + block, t)
        first = max(0, (start - window + 1) // block * block) if window > 0 else 0
        out.append((start, end, first))
    return out


def _block_mask(segment_ids_bt: jax.Array, start: int, end: int, first: int, window: int) -> jax.Array:
    """[b, 1, 1, queries, keys]: same segment, and visible (causal, within the window)."""
    slots_t = jnp.arange(end)
    same_tt = segment_ids_bt[:, start:end, None] == segment_ids_bt[:, None, first:end]
    return (same_tt & visible(slots_t[start:end, None], slots_t[None, first:end], window))[:, None, None]


def _block_logits(q_bgrtk, k_bgsk, mask, dtype) -> jax.Array:
    kd = q_bgrtk.shape[-1]
    logits = jnp.einsum("bgrtk,bgsk->bgrts", q_bgrtk, k_bgsk, preferred_element_type=dtype) * jnp.array(
        kd ** -0.5, dtype)
    return jnp.where(mask, logits, mask_value(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def causal_attention(q_bhtk: jax.Array, k_bgtk: jax.Array, v_bgtk: jax.Array, segment_ids_bt: jax.Array,
                     window: int = 0, block: int = BLOCK) -> jax.Array:
    """Causal, segment-masked grouped-query attention of a row with itself, head-major [b, h, t, k] in
    and out, blockwise: each block of `block` queries attends only to the keys from its window's start
    to its own end, so the logits above the diagonal blocks (and, with a window, far below them) are
    never computed (5/8 of the full [t, t] work at 4 blocks, tending to 1/2). fp32 logits and softmax,
    probabilities cast back to the value dtype (as `jax.nn.dot_product_attention`).

    Its gradient is written out (`_causal_bwd`, flash attention's backward): each block's
    probabilities are recomputed from the saved log-partition, and the five products run in blocks
    of `BWD_BLOCK` queries. Left to autodiff, the backward of the forward's blocks took ~5x the
    forward on CPU (fp32, t=256, one layer of the tiny model: 18 ms of fwd+bwd against 11 ms)."""
    return _causal_fwd(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, window, block)[0]


def _causal_fwd(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, window, block):
    b, h, t, kd = q_bhtk.shape
    g = k_bgtk.shape[1]
    logits_dtype = jnp.promote_types(q_bhtk.dtype, jnp.float32)
    q_bgrtk = q_bhtk.reshape(b, g, h // g, t, kd)
    outs, lses = [], []
    for start, end, first in _query_blocks(t, block, window):
        logits = _block_logits(q_bgrtk[:, :, :, start:end], k_bgtk[:, :, first:end],
                               _block_mask(segment_ids_bt, start, end, first, window), logits_dtype)
        logits = logits.astype(jnp.float32)
        # jax.nn.softmax's own steps, so the values are its values; the log-partition is kept for the
        # backward (written out below: nothing differentiates through these lines)
        max_bgrt1 = jnp.max(logits, axis=-1, keepdims=True)
        unnormalized = jnp.exp(logits - max_bgrt1)
        sum_bgrt1 = jnp.sum(unnormalized, axis=-1, keepdims=True)
        probs = (unnormalized / sum_bgrt1).astype(v_bgtk.dtype)
        outs.append(jnp.einsum("bgrts,bgsk->bgrtk", probs, v_bgtk[:, :, first:end]))
        lses.append(max_bgrt1 + jnp.log(sum_bgrt1))
    o_bgrtk = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    lse_bgrt1 = jnp.concatenate(lses, axis=3) if len(lses) > 1 else lses[0]
    o_bhtk = o_bgrtk.reshape(b, h, t, kd)
    return o_bhtk, (q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, o_bhtk, lse_bgrt1)


BWD_BLOCK = 64  # query rows per block of the backward (fwd+bwd of a tiny-model layer: 11 ms at 64, 15 at 128)


def _causal_bwd(window, block, res, do_bhtk):
    """dQ, dK, dV: per query block, P = exp(S - lse), dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = dS K, dK += dS^T Q (the scale folded into dS)."""
    q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, o_bhtk, lse_bgrt1 = res
    b, h, t, kd = q_bhtk.shape
    g = k_bgtk.shape[1]
    f32 = jnp.promote_types(q_bhtk.dtype, jnp.float32)
    q_bgrtk = q_bhtk.reshape(b, g, h // g, t, kd)
    do_bgrtk = do_bhtk.reshape(b, g, h // g, t, kd)
    delta_bgrt1 = jnp.sum(do_bgrtk.astype(f32) * o_bhtk.reshape(do_bgrtk.shape).astype(f32), axis=-1,
                          keepdims=True)
    dq_parts = []
    dk_bgtk = jnp.zeros(k_bgtk.shape, f32)
    dv_bgtk = jnp.zeros(v_bgtk.shape, f32)
    for start, end, first in _query_blocks(t, BWD_BLOCK, window):
        mask = _block_mask(segment_ids_bt, start, end, first, window)
        q_blk, do_blk = q_bgrtk[:, :, :, start:end], do_bgrtk[:, :, :, start:end]
        k_blk, v_blk = k_bgtk[:, :, first:end], v_bgtk[:, :, first:end]
        logits = _block_logits(q_blk, k_blk, mask, f32)
        probs = jnp.where(mask, jnp.exp(logits - lse_bgrt1[:, :, :, start:end]), 0.0)
        pad = ((0, 0), (0, 0), (first, t - end), (0, 0))
        dv_bgtk = dv_bgtk + jnp.pad(jnp.einsum("bgrts,bgrtk->bgsk", probs.astype(v_bgtk.dtype), do_blk,
                                               preferred_element_type=f32), pad)
        dprobs = jnp.einsum("bgrtk,bgsk->bgrts", do_blk, v_blk, preferred_element_type=f32)
        dlogits = probs * (dprobs - delta_bgrt1[:, :, :, start:end]) * jnp.array(kd ** -0.5, f32)
        dq_parts.append(jnp.einsum("bgrts,bgsk->bgrtk", dlogits.astype(k_bgtk.dtype), k_blk,
                                   preferred_element_type=f32))
        dk_bgtk = dk_bgtk + jnp.pad(jnp.einsum("bgrts,bgrtk->bgsk", dlogits.astype(q_bhtk.dtype), q_blk,
                                               preferred_element_type=f32), pad)
    dq_bgrtk = jnp.concatenate(dq_parts, axis=3) if len(dq_parts) > 1 else dq_parts[0]
    return (dq_bgrtk.reshape(q_bhtk.shape).astype(q_bhtk.dtype), dk_bgtk.astype(k_bgtk.dtype),
            dv_bgtk.astype(v_bgtk.dtype), None)


causal_attention.defvjp(_causal_fwd, _causal_bwd)


def fused_attention(q_bhtk: jax.Array, k_bgtk: jax.Array, v_bgtk: jax.Array, segment_ids_bt: jax.Array,
                    window: int = 0, implementation: str | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention` with the same mask (`implementation`: "cudnn" for the fused GPU
    kernel, None lets jax pick); head-major in and out like `causal_attention`."""
    t = q_bhtk.shape[2]
    slots_t = jnp.arange(t)
    mask_tt = visible(slots_t[:, None], slots_t[None, :], window)
    mask_b1ts = ((segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]) & mask_tt)[:, None]
    o_bthk = jax.nn.dot_product_attention(
        q_bhtk.swapaxes(1, 2), k_bgtk.swapaxes(1, 2), v_bgtk.swapaxes(1, 2), mask=mask_b1ts,
        implementation=implementation)
    return o_bthk.swapaxes(1, 2)


def cached_attention(q_bhk: jax.Array, k_bgks: jax.Array, v_bgsk: jax.Array, mask_bs: jax.Array) -> jax.Array:
    """One query per row against the cache, grouped-query. Keys are kept [b, g, k, s] and values
    [b, g, s, k]: both products are then plain [r, k] @ [k, s] and [r, s] @ [s, k] matmuls per (row,
    kv head), which XLA's CPU dot runs ~2x faster than the transposed form."""
    b, h, kd = q_bhk.shape
    g = k_bgks.shape[1]
    q_bgrk = q_bhk.reshape(b, g, h // g, kd)
    logits_dtype = jnp.promote_types(q_bhk.dtype, jnp.float32)
    logits_bgrs = jnp.einsum("bgrk,bgks->bgrs", q_bgrk, k_bgks, preferred_element_type=logits_dtype)
    logits_bgrs = logits_bgrs * jnp.array(kd ** -0.5, logits_dtype)
    logits_bgrs = jnp.where(mask_bs[:, None, None, :], logits_bgrs, mask_value(logits_dtype))
    probs_bgrs = jax.nn.softmax(logits_bgrs.astype(jnp.float32), axis=-1).astype(v_bgsk.dtype)
    return jnp.einsum("bgrs,bgsk->bgrk", probs_bgrs, v_bgsk).reshape(b, h, kd)


def self_attention(kind: str, q_bhtk: jax.Array, k_bgtk: jax.Array, v_bgtk: jax.Array,
                   segment_ids_bt: jax.Array, window: int = 0) -> jax.Array:
    """The training / prefill attention of `model.attention` ("xla", "cudnn" or "splash"; "auto" is
    resolved by `resolve` before a model is built). Splash needs lengths in multiples of 128: other
    lengths (short prefill buckets) take the XLA kernel."""
    if kind == "splash":
        from codegen_jax import splash

        if splash.supported(q_bhtk.shape[2]):  # its blocks need lengths in multiples of 128
            return splash.splash_attention(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, window)
        kind = "xla"
    if kind == "cudnn":
        return fused_attention(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, window, "cudnn")
    if kind != "xla":
        raise ValueError(f"attention kind {kind!r} must be resolved first (attention.resolve)")
    return causal_attention(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, window)


def resolve(kind: str, platform: str, dtype: str = "bfloat16") -> str:
    """`auto` -> the kernel for `platform` (the devices programs are built for; a TPU topology compiled
    on a CPU host is "tpu"): splash on TPU, cuDNN on GPU (bf16/fp16 compute only: cuDNN's fused
    attention has no fp32), the blockwise XLA kernel elsewhere."""
    if kind != "auto":
        return kind
    if platform in ("gpu", "cuda"):
        return "cudnn" if dtype in ("bfloat16", "float16") else "xla"
    return {"tpu": "splash"}.get(platform, "xla")
