"""TPUs without a TPU: Cloud TPU names -> deviceless topologies, chip figures, and ahead-of-time compiles
whose memory and cost the real TPU compiler (libtpu) reports, on any host.

`jax.experimental.topologies.get_topology_desc` gives device objects for a TPU slice; a mesh over them
and `jit(f).lower(*abstract args with shardings).compile()` run libtpu's compiler here. A program over
the chip's HBM fails with RESOURCE_EXHAUSTED; `compile_report` turns both outcomes into numbers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from typing import Any

import jax

from codegen_jax.errors import UserError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Vendor figures per chip (Google Cloud's TPU pages): dense bf16 FLOP/s, HBM bandwidth, ICI
    bandwidth (all links, one direction), and whether Cloud names count TensorCores (2 per chip)."""

    family: str
    peak_flops: float
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
    names_count_cores: bool


CHIPS = {
    "v4": Chip("v4", 275e12, 1228e9, 2400e9 / 8, 3, True),
    "v5e": Chip("v5e", 197e12, 819e9, 1600e9 / 8, 2, False),
    "v5p": Chip("v5p", 459e12, 2765e9, 4800e9 / 8, 3, True),
    "v6e": Chip("v6e", 918e12, 1640e9, 3584e9 / 8, 2, False),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v6litepod": "v6e"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: the name as given, the chip, how many chips, and the topology name libtpu takes."""

    name: str
    chip: Chip
    chips: int
    topology_name: str


def examples() -> str:
    return "v5e-8, v5litepod-16, v5p-128, v6e-16, v4-32 or v5e:2x4"


def parse_topology(name: str) -> Topology:
    """`v5e-8` / `v5litepod-16` / `v6e-16` (chips), `v5p-128` / `v4-32` (TensorCores, 2 per chip, as
    Cloud counts them), or libtpu's own `v5e:2x4` / `v5p:4x4x4` (chips per dimension)."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", text)
    family = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if m is None or family not in CHIPS:
        raise UserError(f"unknown TPU topology {name!r}; use a Cloud name or a shape, e.g. {examples()}")
    chip = CHIPS[family]
    if m.group(3):
        dims = [int(x) for x in m.group(3).split("x")]
        if len(dims) != chip.dims:
            raise UserError(f"TPU {family} slices are {chip.dims}-D ({'x'.join('N' * chip.dims)}); got {name!r}")
        return Topology(name, chip, math.prod(dims), f"{family}:{m.group(3)}")
    count = int(m.group(2))
    chips = count // 2 if chip.names_count_cores else count
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    if (chip.names_count_cores and count % 2) or chips not in shapes:
        valid = ", ".join(f"{family}-{c * (2 if chip.names_count_cores else 1)}" for c in shapes)
        raise UserError(f"no TPU slice {name!r}: {family} slices are {valid}")
    return Topology(name, chip, chips, f"{family}:{shapes[chips]}")


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("compiling for a TPU topology needs libtpu: pip install 'codegen-jax[tpu]'")


def devices(topo: Topology) -> list:
    """The slice's device objects (one per chip; v4 and v5p as megacore chips, as they run)."""
    require_libtpu()
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if topo.chip.names_count_cores else {}
    if topo.chips == 1:  # libtpu's default host holds 2x2 chips
        kwargs["chips_per_host_bounds"] = "1x1x1"
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name, **kwargs)
    found = list(desc.devices)
    if len(found) != topo.chips:
        raise UserError(f"libtpu made {len(found)} devices for {topo.topology_name}, expected {topo.chips}")
    return found


_HBM_RE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")
_NEED_RE = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)")
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _size(match: re.Match | None) -> int | None:
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else None


_HBM_CACHE: dict[str, int] = {}


def hbm_bytes(device: Any) -> int:
    """Usable HBM per chip as the compiler reports it: the "available HBM" of its out-of-memory message
    for a program sure not to fit (cached per chip kind)."""
    kind = device.device_kind
    if kind not in _HBM_CACHE:
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = jax.sharding.Mesh([device], ("x",))
        big = jax.ShapeDtypeStruct((1 << 40,), jnp.uint8, sharding=NamedSharding(mesh, PartitionSpec()))
        try:
            jax.jit(lambda x: x + 1).lower(big).compile()
        except Exception as e:  # noqa: BLE001 - the message is what we want
            found = _size(_HBM_RE.search(str(e)))
            if found is None:
                raise
            _HBM_CACHE[kind] = found
        else:
            raise RuntimeError(f"a 1 TiB program compiled for {kind}: cannot read its HBM size")
    return _HBM_CACHE[kind]


@dataclasses.dataclass
class CompileReport:
    """One compiled program's per-device memory (bytes), cost (compiler-counted) and compile time."""

    name: str
    compile_s: float
    fits: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    needed_temp_bytes: int | None = None  # from the out-of-memory message when it does not fit
    custom_calls: tuple[str, ...] = ()  # custom-call targets in the compiled program (Mosaic kernels...)

    @property
    def per_device_bytes(self) -> int:
        """What the program holds on a chip at its peak: arguments, outputs not aliased to them,
        temporaries and the program itself (an out-of-memory report: the temporaries it asked for)."""
        if not self.fits:
            return self.argument_bytes + (self.needed_temp_bytes or 0)
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def to_dict(self, hbm: int) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(per_device_bytes=self.per_device_bytes, hbm_bytes=hbm,
                   fits=self.fits and self.per_device_bytes <= hbm,
                   excess_gib=max(0.0, (self.per_device_bytes - hbm) / GIB))
        return out


def compile_report(name: str, jitted: Any, args: tuple, mesh: jax.sharding.Mesh,
                   compiler_options: dict[str, Any] | None = None) -> CompileReport:
    """Lower and compile `jitted` for `args` (abstract, sharded on the topology's `mesh`)."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*args)
        try:
            compiled = lowered.compile(compiler_options=compiler_options)
        except Exception as e:  # noqa: BLE001 - out of HBM is a result, anything else re-raised
            message = str(e)
            if "RESOURCE_EXHAUSTED" not in message:
                raise
            args_bytes = sum(_arg_bytes(a) for a in jax.tree.leaves(args))
            return CompileReport(name, time.perf_counter() - t0, False, argument_bytes=args_bytes,
                                 needed_temp_bytes=_size(_NEED_RE.search(message)))
    elapsed = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    calls = tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))))
    return CompileReport(name, elapsed, True, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                         mem.alias_size_in_bytes, mem.temp_size_in_bytes, mem.generated_code_size_in_bytes,
                         float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                         custom_calls=calls)


def _arg_bytes(a: Any) -> int:
    """Bytes of one abstract argument on one device (its shard)."""
    shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) is not None else a.shape
    return math.prod(shape) * a.dtype.itemsize
