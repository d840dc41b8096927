"""Our `ModelConfig` <-> Hugging Face `config.json`, for Llama, Mistral, Qwen2 and StarCoder2.

Export picks the architecture that computes our model's function (`export_architecture`) and writes
its config (`hf_config`; `transformers_config` builds the transformers object, for tests and
benchmarks); import maps a config.json back to our fields (`model_config_from_hf`), with RoPE
scaling in either the v4 `rope_scaling` or the v5 `rope_parameters` spelling. Both refuse, in one
line, every feature our model lacks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from codegen_jax import hf_params
from codegen_jax.config import ModelConfig
from codegen_jax.errors import UserError
from codegen_jax.rope import rope_attention_scale

@dataclasses.dataclass(frozen=True)
class Architecture:
    """An HF architecture we read: its model_type, and what its config.json means by a missing key."""

    model_type: str
    max_positions: int  # max_position_embeddings
    tie_embeddings: bool = False  # tie_word_embeddings
    kv_heads: int | None = None  # num_key_value_heads (None: num_attention_heads)
    window: int | None = None  # sliding_window when the key is absent (an explicit null is no window)


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", 2048),
    "MistralForCausalLM": Architecture("mistral", 131072, window=4096),
    "Qwen2ForCausalLM": Architecture("qwen2", 32768, window=4096),  # used with use_sliding_window
    "Starcoder2ForCausalLM": Architecture("starcoder2", 4096, tie_embeddings=True, kv_heads=2),
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # HF rope_type -> model.rope_scaling ("none")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")  # HF activations that are GELU's tanh approximation

# ---------------------------------------------------------------------------------------------------
# Config mapping: export


def export_architecture(cfg: ModelConfig) -> str:
    """The HF architecture that computes our model's function; a UserError naming the conflict when
    none does."""
    hf_params.table_for(cfg)  # refuses norm/MLP pairs no architecture has
    window = _export_window(cfg)
    if cfg.norm == "layer":
        if not cfg.attention_bias == cfg.attention_out_bias == cfg.mlp_bias:
            raise UserError("StarCoder2 has one use_bias for all projections: set model.attention_bias, "
                            "model.attention_out_bias and model.mlp_bias alike to export this model")
        return "Starcoder2ForCausalLM"
    if cfg.attention_out_bias:
        if not cfg.attention_bias or window:
            raise UserError("model.attention_out_bias exports as Llama's attention_bias, which also needs "
                            "model.attention_bias and has no sliding window; change one to export")
        return "LlamaForCausalLM"
    if cfg.attention_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if window else "LlamaForCausalLM"


def _export_window(cfg: ModelConfig) -> int:
    """The sliding window HF must apply: none (0) when ours covers the whole context."""
    return cfg.sliding_window if 0 < cfg.sliding_window < cfg.max_seq_len else 0


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """HF's `rope_parameters` of our RoPE, without `rope_theta` (also written as v4 `rope_scaling`)."""
    kind = cfg.rope_scaling
    if kind == "none":
        return {"rope_type": "default"}
    out: dict[str, Any] = {"rope_type": kind, "factor": float(cfg.rope_factor)}
    if kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = cfg.rope_original_max_seq_len
    if kind == "llama3":
        out.update(low_freq_factor=float(cfg.rope_low_freq_factor), high_freq_factor=float(cfg.rope_high_freq_factor))
    if kind == "yarn":
        out.update(beta_fast=float(cfg.rope_beta_fast), beta_slow=float(cfg.rope_beta_slow),
                   attention_factor=rope_attention_scale(cfg))
        if not cfg.rope_truncate:  # HF's default is true; older readers do not know the key
            out["truncate"] = False
    return out


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, pad_id: int | None, dtype: str
              ) -> dict[str, Any]:
    """`config.json` for our model: read the same by transformers 5 (`rope_parameters`, `dtype`) and by
    4.x readers (top-level `rope_theta`, `rope_scaling`, `torch_dtype`), except yarn: transformers
    4.48-4.57 replace `factor` by max_position_embeddings / original_max_position_embeddings, which
    agrees only when model.max_seq_len = rope_factor x rope_original_max_seq_len."""
    arch = export_architecture(cfg)
    window, rope = _export_window(cfg), _rope_parameters(cfg)
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": ARCHITECTURES[arch].model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling != "none" else None,
        "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "dtype": dtype, "torch_dtype": dtype,
    }
    if arch == "Starcoder2ForCausalLM":
        out.update(hidden_act="gelu_pytorch_tanh", norm_epsilon=cfg.norm_eps, use_bias=cfg.attention_bias,
                   sliding_window=window or None, residual_dropout=0.0, embedding_dropout=0.0)
        return out
    out.update(hidden_act="silu", rms_norm_eps=cfg.norm_eps)
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.attention_out_bias, mlp_bias=False, pretraining_tp=1)
    elif arch == "MistralForCausalLM":
        out.update(sliding_window=window)
    else:  # Qwen2 always has q/k/v biases; its sliding window is on for every layer or for none
        out.update(use_sliding_window=bool(window), sliding_window=window or None,
                   max_window_layers=0 if window else cfg.n_layers,
                   layer_types=["sliding_attention" if window else "full_attention"] * cfg.n_layers)
    return out


def transformers_config(cfg: ModelConfig, **ids: int | None):
    """The `transformers` config object of our model (what export writes as config.json): tests and
    benchmarks build their HF reference models through it. Special token ids default to none (a
    `pad_token_id` would make HF's embedding skip that row's gradient)."""
    import transformers

    hf = hf_config(cfg, dtype="float32", **{"bos_id": None, "eos_id": None, "pad_id": None, **ids})
    return transformers.AutoConfig.for_model(**hf)


# ---------------------------------------------------------------------------------------------------
# Config mapping: import


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
    if hf.get("model_type", ARCHITECTURES[arch].model_type) != ARCHITECTURES[arch].model_type:
        raise UserError(f"config.json model_type {hf['model_type']!r} does not match {arch}; "
                        "this needs custom code, which import-hf never runs")
    return arch


def _rope_fields(hf: dict[str, Any], max_pos: int) -> dict[str, Any]:
    """Our `rope_*` fields from v5 `rope_parameters` or v4 `rope_scaling` + top-level `rope_theta`, read
    as transformers reads them (`convert_rope_params_to_dict`, `standardize_rope_params`): rope_scaling
    wins, a top-level original_max_position_embeddings wins, yarn's defaults resolved here."""
    rp = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in rp.values()):
        raise UserError("config.json sets RoPE per layer type; only one RoPE for all layers is supported")
    kind = rp.get("rope_type", rp.get("type")) or "default"
    if kind not in ROPE_TYPES:
        raise UserError(f"config.json uses rope_type {kind!r}, which is not supported; supported rope "
                        f"types: {', '.join(ROPE_TYPES)}")
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"config.json sets partial_rotary_factor={partial}; only full rotary is supported")
    out: dict[str, Any] = {"rope_theta": float(rp.get("rope_theta") or hf.get("rope_theta") or 10000.0)}
    if kind == "default":
        return out
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}
    missing = [k for k in need[kind] if not isinstance(rp.get(k), (int, float))]
    if missing:
        raise UserError(f"config.json rope_type {kind!r} lacks numeric {', '.join(missing)}")
    original = int(hf.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings")
                   or max_pos)
    factor = float(rp.get("factor") or max_pos / original)  # yarn without a factor: HF's ratio
    out.update(rope_scaling=kind, rope_factor=factor)
    if kind == "llama3":
        out.update(rope_original_max_seq_len=original, rope_low_freq_factor=float(rp["low_freq_factor"]),
                   rope_high_freq_factor=float(rp["high_freq_factor"]))
    elif kind == "yarn":
        out.update(rope_original_max_seq_len=original, rope_beta_fast=float(rp.get("beta_fast") or 32),
                   rope_beta_slow=float(rp.get("beta_slow") or 1), rope_truncate=bool(rp.get("truncate", True)),
                   rope_attention_factor=_yarn_attention_factor(rp, factor))
    return out


def _yarn_attention_factor(rp: dict[str, Any], factor: float) -> float:
    """yarn's cos/sin scale as `_compute_yarn_parameters` infers it when `attention_factor` is unset."""
    if rp.get("attention_factor") is not None:
        return float(rp["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rp.get("mscale") and rp.get("mscale_all_dim"):
        return float(mscale(factor, rp["mscale"]) / mscale(factor, rp["mscale_all_dim"]))
    return mscale(factor)


def _sliding_window(hf: dict[str, Any], arch: str, n_layers: int, max_pos: int) -> int:
    """Our `model.sliding_window` (0: none, or a window covering the whole context, which is plain
    causal attention). One window for every layer: a Qwen2 that mixes sliding and full layers is refused."""
    if arch == "LlamaForCausalLM":
        return 0  # Llama has no sliding window (transformers ignores the key)
    window = hf["sliding_window"] if "sliding_window" in hf else ARCHITECTURES[arch].window
    if arch == "Qwen2ForCausalLM":
        if not hf.get("use_sliding_window", False):
            return 0  # Qwen2Config drops the window then
        layer_types = hf.get("layer_types") or [  # Qwen2 slides from layer max_window_layers on
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(n_layers)]
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise UserError(f"config.json has layer types {unknown}, which are not supported")
        if "sliding_attention" not in layer_types:
            return 0
        if "full_attention" in layer_types and window is not None and window < max_pos:
            n = layer_types.count("sliding_attention")
            raise UserError(f"config.json uses a sliding window ({window}) in {n} of {len(layer_types)} layers "
                            "(Qwen2 max_window_layers); one window for all layers or none is supported")
    if window is None:
        return 0
    if not isinstance(window, int) or window <= 0:
        raise UserError(f"config.json sliding_window must be a positive integer or null; got {window!r}")
    return window if window < max_pos else 0


def _arch_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """Norm, MLP, biases and norm epsilon of the architecture; a UserError for what our model lacks."""
    act = hf.get("hidden_act")
    if arch == "Starcoder2ForCausalLM":
        if (act or GELU_TANH[0]) not in GELU_TANH:
            raise UserError(f"config.json hidden_act {act!r} is not supported for StarCoder2; supported: "
                            f"{', '.join(GELU_TANH)} (GELU's tanh approximation)")
        bias = bool(hf.get("use_bias", True))
        return {"norm": "layer", "mlp": "gelu_tanh", "norm_eps": float(hf.get("norm_epsilon", 1e-5)),
                "attention_bias": bias, "attention_out_bias": bias, "mlp_bias": bias}
    if (act or "silu") not in ("silu", "swish"):
        raise UserError(f"config.json hidden_act {act!r} is not supported (SwiGLU uses silu)")
    if hf.get("mlp_bias"):
        raise UserError("config.json sets mlp_bias=true; our SwiGLU MLP has no biases")
    llama_bias = arch == "LlamaForCausalLM" and bool(hf.get("attention_bias", False))  # q/k/v and o
    return {"norm": "rms", "mlp": "swiglu", "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "attention_bias": arch == "Qwen2ForCausalLM" or llama_bias, "attention_out_bias": llama_bias}


def model_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Our `model` config section from an HF `config.json` dict; a UserError for anything we lack."""
    arch = _architecture(hf)
    if hf.get("quantization_config"):
        raise UserError("config.json has a quantization_config: quantized checkpoints are not supported; "
                        "import the unquantized weights")
    fields = _arch_fields(hf, arch)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(hf.get(k), int)]
    if missing:
        raise UserError(f"config.json lacks integer {', '.join(missing)}")
    d, h, n = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    defaults = ARCHITECTURES[arch]
    max_pos = int(hf.get("max_position_embeddings") or defaults.max_positions)
    if hf.get("head_dim") is None and d % h:
        raise UserError(f"config.json hidden_size {d} is not divisible by num_attention_heads {h} "
                        "and no head_dim is given")
    tie = hf.get("tie_word_embeddings")
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": n, "n_heads": h,
        "n_kv_heads": int(hf.get("num_key_value_heads") or defaults.kv_heads or h),
        "head_dim": int(hf.get("head_dim") or d // h), "d_ff": hf["intermediate_size"],
        "max_seq_len": max_pos, **_rope_fields(hf, max_pos), **fields,
        "tie_embeddings": bool(defaults.tie_embeddings if tie is None else tie),
        "sliding_window": _sliding_window(hf, arch, n, max_pos),
    }
