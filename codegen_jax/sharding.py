"""Device mesh and the ONE table mapping logical axis names to mesh axes.

Parameters carry logical names (`embed`, `mlp`, ...) in their `out_sharding` metadata; activations are
constrained with the same names. Everything that turns a logical name into a mesh axis goes through
`LOGICAL_RULES` below, so changing a parallelism strategy is a one-line edit here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated). The one table.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations' batch dim: data parallel over data and fsdp
    "length": None,
    "act_embed": None,  # activations' model dim stays whole (params' "embed" is sharded instead)
    "embed": "fsdp",  # parameters' model dim: ZeRO-3 style sharding over fsdp
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,  # scanned layer stack: every device holds its share of every layer
    "norm": None,  # norm scales are tiny: replicated
    "lora": None,  # a LoRA adapter's rank axis: small, replicated (its other axis follows its base weight)
}


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) of the given sizes over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(shape[a] for a in MESH_AXES)
    # Auto axes: XLA propagates shardings from our constraints (no sharding-in-types bookkeeping)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if int(np.prod(sizes)) == len(devices) and len(devices) > 1:
        try:  # topology-aware placement on TPU/GPU; plain reshape on CPU
            return jax.make_mesh(sizes, MESH_AXES, devices=devices, axis_types=auto)
        except Exception:  # noqa: BLE001 - make_mesh refuses some device sets; the reshape is valid too
            pass
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axis `names`. With `shape` and `mesh`, a mesh axis that does not divide
    its dimension (an odd vocab over tensor=2, one kv head over tensor=2) is dropped: that dim is
    replicated rather than refused."""
    if names is None:
        return P()
    out = []
    used: set[str] = set()
    for i, name in enumerate(names):
        axes = LOGICAL_RULES[name] if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard one dim only
        if shape is not None and mesh is not None:
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if shape[i] % size:
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def on_mesh(fn: Any, mesh: Mesh) -> Any:
    """`fn` called (and so traced) with `mesh` as the context mesh: a `jit` with in_shardings alone leaves
    it empty, and then `constrain` and splash attention's `shard_map` do nothing (the TPU plan compiles
    under the mesh: training must run what it compiled)."""
    import functools

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def state_shardings(abs_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an (abstract) nnx State from each Variable's logical `out_sharding`."""
    from flax import nnx

    def one(v: Any) -> Any:
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        shape = v.shape if hasattr(v, "shape") else None
        return v.replace(NamedSharding(mesh, logical_to_spec(names, shape, mesh)))

    return jax.tree.map(one, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def opt_state_shardings(abstract_opt: Any, params_sh: Any, mesh: Mesh) -> Any:
    """Optimizer-state shardings: a leaf that mirrors a parameter (Adam's mu, nu) is sharded like it,
    anything else (step counters) is replicated."""
    by_path = {tuple(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sh)[0]}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        path = tuple(path)
        for i in range(len(path)):
            sh = by_path.get(path[i:])
            if sh is not None and len(sh.spec) <= len(leaf.shape):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def abstract(tree: Any, shardings: Any) -> Any:
    """Shape-only twins of `tree`'s arrays (or ShapeDtypeStructs) carrying `shardings`: what jit lowers
    against and Orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global jax.Arrays sharded over the batch axes of `mesh`."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}
