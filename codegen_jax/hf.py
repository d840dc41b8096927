"""Hugging Face interop: Llama-family safetensors checkpoints <-> our checkpoints.

Two parts, top to bottom:
- the config mapping: our `ModelConfig` <-> HF `config.json`, refusing every feature our model lacks;
- `export_hf` / `import_hf`, what the `codegen-jax export-hf` / `import-hf` verbs call.
The tensor mapping (names, layouts) is the declarative table in `hf_params`; the file format lives
in `hf_io`.

Export writes `LlamaForCausalLM` (`Qwen2ForCausalLM` when the model has q/k/v biases, which Llama
cannot express without an extra o_proj bias). Import reads Llama, Mistral and Qwen2. The model never
knows about HF names (as in Tunix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from codegen_jax import checkpoint as ckpt
from codegen_jax import hf_io, hf_params
from codegen_jax.config import ModelConfig
from codegen_jax.errors import UserError

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's own default shard size
EXPORT_DTYPES = ("float32", "bfloat16")
# architecture -> (model_type, default max_position_embeddings when config.json omits it)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", 2048),
    "MistralForCausalLM": ("mistral", 131072),
    "Qwen2ForCausalLM": ("qwen2", 32768),
}

# ---------------------------------------------------------------------------------------------------
# Config mapping


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None, dtype: str
              ) -> dict[str, Any]:
    """`config.json` for our model: read the same by transformers 5 (`rope_parameters`, `dtype`) and by
    4.x readers (top-level `rope_theta`, `torch_dtype`)."""
    arch = "Qwen2ForCausalLM" if cfg.attention_bias else "LlamaForCausalLM"
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch][0],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "dtype": dtype, "torch_dtype": dtype,
    }
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:  # Qwen2 always has q/k/v biases; turn its sliding window off explicitly
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                   layer_types=["full_attention"] * cfg.n_layers)
    return out


def transformers_config(cfg: ModelConfig, **ids: int | None):
    """The `transformers` config object of our model (what export writes as config.json): tests and
    benchmarks build their HF reference models through it. Special token ids default to none (a
    `pad_token_id` would make HF's embedding skip that row's gradient)."""
    import transformers

    hf = hf_config(cfg, dtype="float32", **{"bos_id": None, "eos_id": None, "pad_id": None, **ids})
    return transformers.AutoConfig.for_model(**hf)


def _architecture(hf: dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if hf.get("auto_map"):
        raise UserError(f"config.json has auto_map {sorted(hf['auto_map'])}: the model needs "
                        "trust_remote_code (custom code), which import-hf never runs")
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
        raise UserError(f"unsupported architecture {archs or hf.get('model_type')!r} in config.json; "
                        f"import-hf reads {', '.join(ARCHITECTURES)}")
    arch = supported[0]
    if hf.get("model_type", ARCHITECTURES[arch][0]) != ARCHITECTURES[arch][0]:
        raise UserError(f"config.json model_type {hf['model_type']!r} does not match {arch}; "
                        "this needs custom code, which import-hf never runs")
    return arch


def _rope_theta(hf: dict[str, Any]) -> float:
    """The unscaled RoPE base from v5 `rope_parameters` or v4 `rope_scaling` + `rope_theta`."""
    rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in rp.values()):
        raise UserError("config.json sets RoPE per layer type; only one RoPE for all layers is supported")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", None):
        raise UserError(f"config.json uses rope_type {rope_type!r} (RoPE scaling), which is not "
                        "implemented; only the default unscaled RoPE is supported")
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"config.json sets partial_rotary_factor={partial}; only full rotary is supported")
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _check_sliding_window(hf: dict[str, Any], arch: str, max_pos: int) -> None:
    """A window shorter than the context changes the attention pattern, which our model cannot do; a
    window at least as long as the context (or none) is plain causal attention."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if arch == "Qwen2ForCausalLM":
        if not hf.get("use_sliding_window", False):
            window = None
        elif layer_types is None:  # Qwen2 slides from layer max_window_layers on
            first = hf.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if i >= first else "full_attention"
                           for i in range(hf["num_hidden_layers"])]
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UserError(f"config.json has layer types {unknown}, which are not supported")
        if "sliding_attention" not in layer_types:
            window = None
    if window is not None and window < max_pos:
        raise UserError(f"config.json uses sliding-window attention (window {window} < context {max_pos}), "
                        "which is not implemented; only full causal attention is supported")


def _refuse_features(hf: dict[str, Any], arch: str) -> None:
    if hf.get("quantization_config"):
        raise UserError("config.json has a quantization_config: quantized checkpoints are not supported; "
                        "import the unquantized weights")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UserError(f"config.json hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if hf.get("mlp_bias"):
        raise UserError("config.json sets mlp_bias=true; our MLP has no biases")


def model_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Our `model` config section from an HF `config.json` dict; a UserError for anything we lack."""
    arch = _architecture(hf)
    _refuse_features(hf, arch)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(hf.get(k), int)]
    if missing:
        raise UserError(f"config.json lacks integer {', '.join(missing)}")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    max_pos = int(hf.get("max_position_embeddings") or ARCHITECTURES[arch][1])
    _check_sliding_window(hf, arch, max_pos)
    if hf.get("head_dim") is None and d % h:
        raise UserError(f"config.json hidden_size {d} is not divisible by num_attention_heads {h} "
                        "and no head_dim is given")
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"],
        "n_heads": h, "n_kv_heads": int(hf.get("num_key_value_heads") or h),
        "head_dim": int(hf.get("head_dim") or d // h), "d_ff": hf["intermediate_size"],
        "max_seq_len": max_pos, "rope_theta": _rope_theta(hf),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        # Llama's attention_bias also adds an o_proj bias: accepted only when it is all zeros (import)
        "attention_bias": arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
    }


# ---------------------------------------------------------------------------------------------------
# export-hf


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32", *,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, mesh: jax.sharding.Mesh | None = None) -> Path:
    """Write our checkpoint (a run's workdir or one step dir) as an HF model directory `out`.

    `out` gets config.json, generation_config.json, the tokenizer files and `model.safetensors` (or
    shards above `max_shard_bytes` plus `model.safetensors.index.json`), with weights in `dtype`.
    Tensors stream from the restored (possibly sharded) params one at a time, so the host holds one
    tensor beyond the params themselves. Returns `out`."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}; got {dtype!r}")
    out = Path(out)
    hf_io.check_empty_out(out, "--out")
    cfg, params, meta, _ = ckpt.load_params(checkpoint, mesh)
    m = cfg.model
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
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
    return hf_io.write_atomically(out, write)


def _to_host(params: Any, t: hf_params.Tensor, dtype: np.dtype) -> np.ndarray:
    """One tensor to host memory in torch layout and `dtype`, gathered across processes if needed."""
    x = hf_params.leaf(params, t.ours)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    x = np.asarray(jax.device_get(x if t.layer is None else x[t.layer]))
    return np.ascontiguousarray(t.layout.to_hf(x).astype(dtype, copy=False))


# ---------------------------------------------------------------------------------------------------
# import-hf


def import_hf(hf_dir: str | Path, out: str | Path, *, scan_layers: bool = True,
              mesh: jax.sharding.Mesh | None = None) -> Path:
    """Read a local HF Llama/Mistral/Qwen2 safetensors directory into a new checkpoint in workdir `out`
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
    o_biases = {n for n in present if n.endswith(".self_attn.o_proj.bias")} if m.attention_bias else set()
    ignorable = {n for n in present if n.endswith(".rotary_emb.inv_freq")}  # old checkpoints' buffers
    if m.tie_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    unexpected = sorted(present - wanted - ignorable - o_biases)
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
    for name in sorted(o_biases):
        if np.any(reader.get(name)):
            raise UserError(f"{name} is nonzero: Llama's attention_bias adds an o_proj bias, which our "
                            "model cannot represent (only q/k/v biases, as in Qwen2)")
