"""The decoder's KV cache: per layer, keys [b, g, k, s] and values [b, g, s, k] (s = cache slots), and
each row's filled length. `model.Decoder` prefills and decodes against it; `sample/engine.py` moves
rows between caches."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from codegen_jax.config import ModelConfig
from codegen_jax.sharding import constrain

K_BGKS = ("batch", "kv_heads", "head_dim", "length")  # logical axes of a layer's cached keys ...
V_BGSK = ("batch", "kv_heads", "length", "head_dim")  # ... and values


@flax.struct.dataclass
class LayerCache:
    """One layer's KV cache: keys [b, g, k, s] and values [b, g, s, k] (the layouts that make both
    decode attention products plain matmuls, see `attention.cached_attention`)."""

    k_bgks: jax.Array
    v_bgsk: jax.Array


@flax.struct.dataclass
class KVCache:
    """The decoder's KV cache: one `LayerCache` per layer, and `lengths_b`, the filled slots per row.
    Slot i of a row holds its token at position i, so a row's valid keys are slots [0, length)."""

    layers: tuple[LayerCache, ...]
    lengths_b: jax.Array

    @property
    def capacity(self) -> int:
        return self.layers[0].k_bgks.shape[-1]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype: Any = None) -> KVCache:
    """An empty cache of `capacity` slots per row (every length 0)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    g, k = cfg.n_kv_heads, cfg.head_dim
    layer = lambda: LayerCache(jnp.zeros((batch, g, k, capacity), dtype),  # noqa: E731
                               jnp.zeros((batch, g, capacity, k), dtype))
    return KVCache(tuple(layer() for _ in range(cfg.n_layers)), jnp.zeros((batch,), jnp.int32))


def fill(cache: KVCache, kv: list, segment_ids_bt: jax.Array) -> KVCache:
    """`cache` with prefill keys/values [b, g, t, k] of every layer in slots [0, t); each row's length
    is its number of non-padding tokens."""
    layers = []
    for layer, (k_bgtk, v_bgtk) in zip(cache.layers, kv):
        k_bgks = jax.lax.dynamic_update_slice(
            layer.k_bgks, k_bgtk.swapaxes(2, 3).astype(layer.k_bgks.dtype), (0, 0, 0, 0))
        v_bgsk = jax.lax.dynamic_update_slice(
            layer.v_bgsk, v_bgtk.astype(layer.v_bgsk.dtype), (0, 0, 0, 0))
        layers.append(LayerCache(constrain(k_bgks, *K_BGKS), constrain(v_bgsk, *V_BGSK)))
    lengths_b = jnp.sum(segment_ids_bt > 0, axis=1).astype(jnp.int32)
    return KVCache(tuple(layers), lengths_b)
