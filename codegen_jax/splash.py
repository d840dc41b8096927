"""Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention) as `model.attention=splash`:
causal (and sliding-window) masks, segment ids for packed rows, grouped-query heads natively.

The kernel works on one example ([heads, length, head_dim]); it is vmapped over the batch and wrapped
in `jax.shard_map` over the mesh, so each device runs it on its own rows and query heads (keys and
values are split over the same `tensor` axis when their heads divide it, else repeated to one per
query head first). It compiles through Mosaic when the program targets TPU (including a TPU topology
compiled on a CPU host) and runs in Pallas interpret mode elsewhere (CPU tests of its numerics).
The kernel does not scale the logits: queries are multiplied by head_dim**-0.5 before the call.
Lengths must be multiples of 128 (the kernel's blocks); callers fall back to the XLA kernel otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from codegen_jax.sharding import logical_to_spec

BLOCK = 128  # the kernel's block sizes must divide the length and be multiples of 128
MAX_BLOCK = 512  # MaxText's default block size (sa_block_*): fewer grid steps on long rows


def supported(length: int) -> bool:
    return length % BLOCK == 0


def _target_platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty:
        return mesh.abstract_device.platform
    return jax.default_backend()


def _block(length: int) -> int:
    return max(b for b in (BLOCK, 256, MAX_BLOCK) if length % b == 0)


def _kernel(heads: int, length: int, window: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.CausalMask((length, length))
    if window > 0:  # window w: the key w - 1 positions back is the oldest one seen, as in attention.visible
        mask = mask & sm.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    b = _block(length)
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # built inside each trace (per device, inside shard_map): the kernel holds its mask tables as arrays
    # of the trace it is made in, so it cannot be cached across traces or meshes
    return sk.make_splash_mha(sm.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
                              block_sizes=sizes, interpret=interpret)


def _local(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, window: int, interpret: bool):
    """The kernel over one device's rows and heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    h, t, kd = q_bhtk.shape[1:]
    kernel = _kernel(h, t, window, interpret)
    q_bhtk = q_bhtk * jnp.asarray(kd ** -0.5, q_bhtk.dtype)

    def one(q, k, v, seg):
        return kernel(q, k, v, segment_ids=sk.SegmentIds(q=seg, kv=seg))

    return jax.vmap(one)(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt)


def splash_attention(q_bhtk: jax.Array, k_bgtk: jax.Array, v_bgtk: jax.Array, segment_ids_bt: jax.Array,
                     window: int = 0) -> jax.Array:
    """Causal, segment-masked grouped-query attention, head-major [b, h, t, k] in and out (the
    contract of `attention.causal_attention`)."""
    interpret = _target_platform() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return _local(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt, window, interpret)
    q_spec = logical_to_spec(("batch", "heads", None, None), q_bhtk.shape, mesh)
    kv_spec = logical_to_spec(("batch", "kv_heads", None, None), k_bgtk.shape, mesh)
    if kv_spec[1] != q_spec[1]:  # kv heads do not split like the query heads: one kv head per query head
        r = q_bhtk.shape[1] // k_bgtk.shape[1]
        k_bgtk, v_bgtk = jnp.repeat(k_bgtk, r, axis=1), jnp.repeat(v_bgtk, r, axis=1)
        kv_spec = q_spec
    seg_spec = P(q_spec[0], None)
    fn = functools.partial(_local, window=window, interpret=interpret)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_bhtk, k_bgtk, v_bgtk, segment_ids_bt)
