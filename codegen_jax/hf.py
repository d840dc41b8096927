"""Hugging Face interop: Llama-family and StarCoder2 safetensors checkpoints <-> our checkpoints.

`export_hf` / `import_hf`, what the `codegen-jax export-hf` / `import-hf` verbs call. The config
mapping (our `ModelConfig` <-> HF `config.json`, refusing every feature our model lacks) is
`hf_config`; the tensor mapping (names, layouts) is the declarative table in `hf_params`; the file
format lives in `hf_io`.

Export writes the architecture that computes our model's function: `Starcoder2ForCausalLM` for
LayerNorm + GELU models, else `LlamaForCausalLM` (q/k/v/o biases as Llama's `attention_bias`),
`Qwen2ForCausalLM` (q/k/v biases only) or `MistralForCausalLM` (a sliding window, no biases). Import
reads Llama, Mistral, Qwen2 and StarCoder2, with RoPE scaling (linear, llama3, yarn) in either the v4
`rope_scaling` or the v5 `rope_parameters` spelling. The model never knows about HF names (as in Tunix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from codegen_jax import checkpoint as ckpt
from codegen_jax import hf_io, hf_params, lora
from codegen_jax.config import ModelConfig
from codegen_jax.errors import UserError
from codegen_jax.hf_config import export_architecture, hf_config, model_config_from_hf

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's own default shard size
EXPORT_DTYPES = ("float32", "bfloat16")


# ---------------------------------------------------------------------------------------------------
# export-hf


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32", *,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, mesh: jax.sharding.Mesh | None = None,
              adapter_only: bool = False) -> Path:
    """Write our checkpoint (a run's workdir or one step dir) as an HF model directory `out`.

    `out` gets config.json, generation_config.json, the tokenizer files and `model.safetensors` (or
    shards above `max_shard_bytes` plus `model.safetensors.index.json`), with weights in `dtype`.
    Tensors stream from the restored (possibly sharded) params one at a time, so the host holds one
    tensor beyond the params themselves. A LoRA run's adapters are merged into their base weights
    (its params are gathered to the host first); with `adapter_only`, `out` gets PEFT's adapter files
    instead (`adapter_config.json`, `adapter_model.safetensors`). Returns `out`."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}; got {dtype!r}")
    out = Path(out)
    hf_io.check_empty_out(out, "--out")
    cfg, params, meta, _ = ckpt.load_params(checkpoint, mesh)
    m = cfg.model
    export_architecture(m)  # refuse a model no HF architecture computes before writing anything
    if adapter_only and not cfg.lora.enabled:
        raise UserError(f"--adapter-only: {checkpoint} was not trained with LoRA (lora.enabled=false); "
                        "export the whole model without --adapter-only")
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    if cfg.lora.enabled:
        params = jax.tree.map(_gathered, params)
        if adapter_only:
            return _export_adapter(cfg, params, out, np_dtype)
        params = lora.merge(params, m, cfg.lora)
    plan = list(hf_params.tensors(m))
    specs = [hf_io.TensorSpec(t.hf, t.layout.hf_shape(hf_params.our_shape(t, params)), np_dtype)
             for t in plan]
    arrays = (_to_host(params, t, np_dtype) for t in plan)

    def write(tmp: Path) -> None:
        tok = hf_io.write_tokenizer(meta, tmp)
        ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
        hf_io.write_json(tmp / "config.json", hf_config(m, dtype=dtype, **ids))
        hf_io.write_json(tmp / "generation_config.json", {
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
        hf_io.write_sharded(tmp, specs, arrays, max_shard_bytes)

    if jax.process_index() != 0:  # the other processes only take part in the gathers
        for _ in arrays:
            pass
        return out
    return hf_io.write_atomically(out, write, collective=False)  # the others are not in here


def _addressable(x: Any) -> Any:
    """`x` with every shard on this process (gathered across processes if needed)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return x


def _gathered(x: Any) -> np.ndarray:
    """A whole array on the host, gathered across processes if needed."""
    return np.asarray(jax.device_get(_addressable(x)))


def _export_adapter(cfg: Any, params: dict, out: Path, np_dtype: np.dtype) -> Path:
    """PEFT's adapter directory: what `peft.PeftModel.from_pretrained(base, out)` loads."""
    from safetensors.numpy import save_file

    tensors = {t.name: t.value.astype(np_dtype) for t in lora.peft_tensors(params, cfg.model, cfg.lora)}

    def write(tmp: Path) -> None:
        hf_io.write_json(tmp / "adapter_config.json", lora.peft_config(cfg.model, cfg.lora, None))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    if jax.process_index() != 0:
        return out
    return hf_io.write_atomically(out, write, collective=False)  # the others are not in here


def _to_host(params: Any, t: hf_params.Tensor, dtype: np.dtype) -> np.ndarray:
    """One tensor to host memory in torch layout and `dtype`, gathered across processes if needed."""
    x = _addressable(hf_params.leaf(params, t.ours))
    x = np.asarray(jax.device_get(x if t.layer is None else x[t.layer]))  # one layer of a stack to the host
    return np.ascontiguousarray(t.layout.to_hf(x).astype(dtype, copy=False))


# ---------------------------------------------------------------------------------------------------
# import-hf


def import_hf(hf_dir: str | Path, out: str | Path, *, scan_layers: bool = True,
              mesh: jax.sharding.Mesh | None = None) -> Path:
    """Read a local HF Llama/Mistral/Qwen2/StarCoder2 safetensors directory into a new checkpoint in workdir `out`
    (config, params created sharded on `mesh` if given, the tokenizer). Returns the step directory,
    which `generate`, `export-hf` and `train --init-from` accept. Written beside `out` and moved into
    place when complete, like an export: a failed import leaves nothing behind."""
    from codegen_jax.checkpoint import write_params_checkpoint
    from codegen_jax.config import DataConfig, from_dict
    from codegen_jax.data.tokenizer import load_tokenizer

    hf_dir, out = Path(hf_dir), Path(out)
    model = {**model_config_from_hf(hf_io.read_hf_config(hf_dir)), "scan_layers": scan_layers}
    seq_len = min(DataConfig().seq_len, model["max_seq_len"])
    cfg = from_dict({"name": hf_dir.absolute().name, "model": model, "data": {"seq_len": seq_len}})
    hf_io.check_empty_out(out, "--out")
    tok = load_tokenizer(hf_dir)
    params = read_params(hf_io.SafetensorsReader(hf_dir), cfg.model, mesh)
    step_dir = hf_io.write_atomically(out, lambda tmp: write_params_checkpoint(tmp, cfg, params, tok))
    return out / step_dir.relative_to(step_dir.parents[1])


def read_params(reader: hf_io.SafetensorsReader, m: ModelConfig,
                mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Our params (pure dict of jax arrays, layers stacked when scanned) from HF tensors, each leaf
    built on the host once and placed with its sharding on `mesh` (default device without one)."""
    from flax import traverse_util

    from codegen_jax.model import abstract_model
    from codegen_jax.sharding import state_shardings

    _, abs_state = abstract_model(m)
    abstract = traverse_util.flatten_dict(nnx.to_pure_dict(abs_state))
    shardings = {}
    if mesh is not None:
        shardings = traverse_util.flatten_dict(nnx.to_pure_dict(state_shardings(abs_state, mesh)))
    plan = list(hf_params.tensors(m))
    _check_tensors(reader, plan, abstract, m)
    params = {}
    for path in dict.fromkeys(t.ours for t in plan):
        a = abstract[path]
        value = np.empty(a.shape, a.dtype)
        for t in (t for t in plan if t.ours == path):
            if t.layer is None:
                value[...] = t.layout.from_hf(reader.get(t.hf), a.shape)
            else:
                value[t.layer] = t.layout.from_hf(reader.get(t.hf), a.shape[1:])
        params[path] = _place(value, shardings.get(path))
    return traverse_util.unflatten_dict(params)


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
    if sharding is None:
        return jax.device_put(value)
    # every process builds only its own shards from the host array (works multi-process too)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _check_tensors(reader: hf_io.SafetensorsReader, plan: list[hf_params.Tensor], abstract: dict,
                   m: ModelConfig) -> None:
    """Refuse missing, unexpected or misshapen tensors before reading any data."""
    present = set(reader.keys())
    wanted = {t.hf for t in plan}
    missing = [t.hf for t in plan if t.hf not in present]
    if missing:
        raise UserError(f"{len(missing)} tensor(s) that config.json implies are missing from the "
                        f"safetensors files, e.g. {', '.join(missing[:3])}")
    ignorable = {n for n in present if n.endswith(".rotary_emb.inv_freq")}  # old checkpoints' buffers
    if m.tie_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    unexpected = sorted(present - wanted - ignorable)
    if unexpected:
        raise UserError(f"{len(unexpected)} tensor(s) the config does not describe, e.g. "
                        f"{', '.join(unexpected[:3])}: the checkpoint has parts our model lacks")
    for t in plan:
        shape = abstract[t.ours].shape
        want = t.layout.hf_shape(shape if t.layer is None else shape[1:])
        if reader.shape(t.hf) != want:
            raise UserError(f"tensor {t.hf} has shape {list(reader.shape(t.hf))} but config.json "
                            f"implies {list(want)}")
    if m.tie_embeddings and "lm_head.weight" in present and not np.array_equal(
            reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise UserError("config.json sets tie_word_embeddings but lm_head.weight differs from "
                        "embed_tokens; set tie_word_embeddings to false to import both")
