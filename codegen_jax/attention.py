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


def causal_attention(q_bhtk: jax.Array, k_bgtk: jax.Array, v_bgtk: jax.Array, segment_ids_bt: jax.Array,
                     window: int = 0, block: int = BLOCK) -> jax.Array:
    """Causal, segment-masked grouped-query attention of a row with itself, head-major [b, h, t, k] in
    and out, blockwise: each block of `block` queries attends only to the keys from its window's start
    to its own end, so the logits above the diagonal blocks (and, with a window, far below them) are
    never computed (5/8 of the full [t, t] work at 4 blocks, tending to 1/2). fp32 logits and softmax,
    probabilities cast back to the value dtype (as `jax.nn.dot_product_attention`)."""
    b, h, t, kd = q_bhtk.shape
    g = k_bgtk.shape[1]
    logits_dtype = jnp.promote_types(q_bhtk.dtype, jnp.float32)
    q_bgrtk = q_bhtk.reshape(b, g, h // g, t, kd)
    slots_t = jnp.arange(t)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        first = max(0, (start - window + 1) // block * block) if window > 0 else 0
        logits = jnp.einsum("bgrtk,bgsk->bgrts", q_bgrtk[:, :, :, start:end], k_bgtk[:, :, first:end],
                            preferred_element_type=logits_dtype) * jnp.array(kd ** -0.5, logits_dtype)
        same_tt = segment_ids_bt[:, start:end, None] == segment_ids_bt[:, None, first:end]
        mask_tt = same_tt & visible(slots_t[start:end, None], slots_t[None, first:end], window)
        logits = jnp.where(mask_tt[:, None, None], logits, mask_value(logits_dtype))
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v_bgtk.dtype)
        outs.append(jnp.einsum("bgrts,bgsk->bgrtk", probs, v_bgtk[:, :, first:end]))
    o_bgrtk = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return o_bgrtk.reshape(b, h, t, kd)


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
