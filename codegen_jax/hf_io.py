"""File I/O for HF interop: safetensors (a streaming sharded writer, a lazy reader), the HF and output
directories, and reading our checkpoint's params, config and tokenizer without building a model.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range,
plus `__metadata__`), then the raw little-endian bytes. We write it ourselves because the header can
be computed from shapes alone: each shard's header goes first and tensors are then appended one at a
time, so the host never holds more than one tensor (`safetensors.numpy.save_file` needs a whole shard
in memory). We read it ourselves because safetensors' numpy backend cannot return bfloat16.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import ml_dtypes
import numpy as np

from codegen_jax.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
T = TypeVar("T")
_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned, as safetensors does


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, torch-layout shape and on-disk dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor goes alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """HF's file names: `model.safetensors` alone, else `model-0000i-of-0000n.safetensors`."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def write_sharded(out_dir: Path, specs: list[TensorSpec], tensors: Iterable[np.ndarray],
                  max_shard_bytes: int, metadata: dict[str, str] | None = None) -> list[str]:
    """Write `tensors` (an iterator yielding arrays in `specs` order, made one at a time) into shards,
    plus `model.safetensors.index.json` when there is more than one. Returns the file names."""
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_names(len(shards))
    it = iter(tensors)
    for name, shard in zip(names, shards):
        with open(out_dir / name, "wb") as f:
            f.write(_header(shard, metadata))
            for spec in shard:
                x = next(it)
                if x.shape != spec.shape or x.dtype != spec.dtype:
                    raise AssertionError(f"{spec.name}: got {x.dtype}{list(x.shape)}, "
                                         f"planned {spec.dtype}{list(spec.shape)}")
                # as raw bytes: the buffer protocol does not know bfloat16 (the host is little-endian
                # on every platform jax supports, as safetensors requires)
                f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


class SafetensorsReader:
    """Lazy access to the tensors of an HF model directory (one file or an index of shards).

    Tensors are memory-mapped, so reading one costs only its own bytes."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise UserError(f"{index} is not a valid safetensors index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
        elif (hf_dir / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise UserError(f"{index.name} lists {name}, which is missing from {hf_dir}")
            data_start, header = _read_header(path)
            for key, entry in header.items():
                if key != "__metadata__":
                    self._entries[key] = (path, data_start, entry)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 as ml_dtypes.bfloat16), copied out of the file."""
        path, data_start, entry = self._entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise UserError(f"tensor {name} in {path.name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise UserError(f"tensor {name} in {path.name} is corrupt: its byte range does not match its shape")
        if end == begin:
            return np.zeros(shape, dtype)
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
        return np.array(mm.view(dtype.newbyteorder("<")).reshape(shape), dtype=dtype)


def _read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise UserError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path} is not a safetensors file (unreadable header)") from None
    return 8 + n, header


# ---------------------------------------------------------------------------------------------------
# Directories


def check_empty_out(out: Path, flag: str) -> None:
    """Refuse an output path that exists with content: nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{flag} {out} exists and is not empty; pass a new or empty directory "
                        "(nothing is ever overwritten)")


def write_atomically(out: Path, write: Callable[[Path], T], collective: bool = True) -> T:
    """Run `write(tmp)` on a fresh hidden sibling of `out`, then move it into place: a crash or error
    never leaves a half-written `out` (an empty `out` is replaced, anything else was refused before).
    The sibling's name is the same in every process, so a multi-process writer (Orbax) shares it;
    `collective=False`: process 0 alone calls this (the others must not wait for it)."""
    sync = _sync if collective else (lambda name: None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    if jax_process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: left by a crashed earlier attempt
        tmp.mkdir()
    sync("codegen_jax_write_atomically_start")
    try:
        result = write(tmp)
        sync("codegen_jax_write_atomically_done")
        if jax_process_index() == 0:
            if out.is_dir():
                out.rmdir()  # empty: checked before we started
            os.replace(tmp, out)
    except BaseException:
        if jax_process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def jax_process_index() -> int:
    import sys

    jax = sys.modules.get("jax")  # a process that never imported jax is a single process
    return jax.process_index() if jax is not None else 0


def _sync(name: str) -> None:
    import sys

    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_hf_config(hf_dir: Path) -> dict:
    """config.json of a local HF model directory holding safetensors weights (pickles are refused)."""
    if not hf_dir.is_dir():
        raise UserError(f"HF model directory not found: {hf_dir}")
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    if not any(hf_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in hf_dir.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise UserError(f"{hf_dir} holds only pickle weights ({pickles[0]}), which are never unpickled "
                            "(loading them can run code); convert them to safetensors where you trust them, "
                            "e.g. model.save_pretrained(dir, safe_serialization=True)")
        raise UserError(f"{hf_dir} holds no *.safetensors weights")
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{hf_dir / 'config.json'} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(hf, dict):
        raise UserError(f"{hf_dir / 'config.json'} must hold a JSON object")
    return hf


# ---------------------------------------------------------------------------------------------------
# Our checkpoints


def write_tokenizer(meta: dict[str, Any], out_dir: Path) -> Any:
    """The checkpoint's tokenizer files (our CodeTokenizer saves AutoTokenizer-loadable ones), set to
    put BOS first as `codegen-jax generate` does; returns the loaded tokenizer."""
    from codegen_jax.checkpoint import materialize_tokenizer
    from codegen_jax.data.tokenizer import load_tokenizer

    if not meta.get("tokenizer"):
        raise UserError("the checkpoint holds no tokenizer files; it cannot be exported")
    materialize_tokenizer(meta["tokenizer"], out_dir)
    tok = load_tokenizer(out_dir)
    if (out_dir / "tokenizer.json").is_file():
        add_bos_by_default(out_dir / "tokenizer.json", tok.hf.convert_ids_to_tokens(tok.bos_id), tok.bos_id)
    return tok


def add_bos_by_default(path: Path, bos: str, bos_id: int) -> None:
    """Make `tokenizer(text)` start with BOS, as HF users expect and as our Generator feeds the model,
    unless the tokenizer already adds special tokens of its own."""
    data = json.loads(path.read_text(encoding="utf-8"))
    post = data.get("post_processor")
    if post is not None and (post.get("type") != "TemplateProcessing" or post.get("special_tokens")):
        return
    a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    first = {"SpecialToken": {"id": bos, "type_id": 0}}
    data["post_processor"] = {"type": "TemplateProcessing", "single": [first, a], "pair": [first, a, b],
                              "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
