"""Rotary position embeddings: the inverse frequencies under `model.rope_scaling` (none, linear,
llama3, yarn; transformers' formulas), yarn's attention scale, and the rotation itself in HF's
rotate-half layout. Shape suffix k: head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from codegen_jax.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE's inverse frequencies [head_dim / 2] (fp32) under `model.rope_scaling`: computed once per
    config (cached) with transformers' formulas, and shared by training, prefill and decode."""
    return _inv_freq(cfg.head_dim, float(cfg.rope_theta), cfg.rope_scaling, float(cfg.rope_factor),
                     cfg.rope_original_max_seq_len, float(cfg.rope_low_freq_factor),
                     float(cfg.rope_high_freq_factor), float(cfg.rope_beta_fast), float(cfg.rope_beta_slow),
                     bool(cfg.rope_truncate))


def rope_attention_scale(cfg: ModelConfig) -> float:
    """The factor yarn multiplies cos and sin by (so q.k by its square), 1.0 for the other kinds: HF's
    `attention_factor`, by default `0.1 * ln(factor) + 1` (`_compute_yarn_parameters.get_mscale`)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor > 0:
        return float(cfg.rope_attention_factor)
    return 1.0 if cfg.rope_factor <= 1 else 0.1 * math.log(cfg.rope_factor) + 1.0


@functools.lru_cache(maxsize=64)
def _inv_freq(k: int, theta: float, kind: str, factor: float, original: int, low_freq: float,
              high_freq: float, beta_fast: float, beta_slow: float, truncate: bool) -> np.ndarray:
    """transformers.modeling_rope_utils' `_compute_{linear_scaling,llama3,yarn}_parameters` (and the
    default `compute_default_rope_parameters`), in numpy fp32 as torch computes them."""
    base_k2 = theta ** (np.arange(0, k, 2, dtype=np.float32) / k)  # fp32: python floats are weak
    inv_freq = 1.0 / base_k2
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        low_wavelen, high_wavelen = original / low_freq, original / high_freq
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low_freq) / (high_freq - low_freq)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times in context
            return k * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, k - 1)
        if low == high:
            high += 0.001  # HF's guard against a zero-width ramp
        ramp = np.clip((np.arange(k // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolated = 1 - ramp
        inv_freq = 1.0 / (factor * base_k2) * (1 - extrapolated) + inv_freq * extrapolated
    elif kind != "none":
        raise ValueError(f"unknown model.rope_scaling {kind!r}")  # config_checks.validate refuses it first
    inv_freq = np.asarray(inv_freq, np.float32)
    inv_freq.flags.writeable = False  # shared by every caller through the cache
    return inv_freq


def rope(x: jax.Array, positions: jax.Array, inv_freq_k2: np.ndarray, scale: float = 1.0) -> jax.Array:
    """Rotary embedding of x [..., k] at `positions` shaped like x[..., 0] up to broadcasting ([b, 1, t]
    for head-major [b, h, t, k], [b, 1] for [b, h, k]), with inverse frequencies `inv_freq_k2` [k / 2]
    (`rope_inv_freq`) and cos/sin times `scale` (yarn), in HF's rotate-half layout (first half / second
    half, not interleaved). HF's x * cos + rotate_half(x) * sin written on the halves,
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]: half-width cos/sin and no negated copy, ~40% less
    work forward and backward on CPU."""
    k = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq_k2
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale != 1.0:  # as HF: scaled in fp32, before the cast
        cos, sin = cos * scale, sin * scale
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
