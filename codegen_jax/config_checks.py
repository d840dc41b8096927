"""Checks of a loaded `Config`: allowed values, cross-field constraints, and the mesh against the
device count. Each raises one `ConfigError` naming the first problem and its fix."""

from __future__ import annotations

import math

from codegen_jax.config import LORA_TARGETS, Config, ConfigError, MeshConfig, ModelConfig

CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots_saveable"),
    "model.attention": ("xla", "cudnn", "splash", "auto"),
    "model.rope_scaling": ("none", "linear", "llama3", "yarn"),
    "model.norm": ("rms", "layer"),
    "model.mlp": ("swiglu", "gelu_tanh"),
    "data.source": ("stdlib", "files", "datasets", "prepared"),
    "data.pack": ("first_fit", "best_fit"),
    "optim.schedule": ("cosine", "linear", "wsd", "constant"),
    "optim.name": ("adamw", "muon"),
    "train.nan_policy": ("stop", "skip"),
    "checkpoint.resume": ("auto", "never"),
}



def validate(cfg: Config) -> None:
    """Check cross-field constraints; raise one ConfigError naming the first problem and the fix."""
    m = cfg.model
    for key, choices in CHOICES.items():
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads,
        "model.d_ff": m.d_ff, "model.max_seq_len": m.max_seq_len, "data.seq_len": cfg.data.seq_len,
        "train.steps": cfg.train.steps, "train.batch_size": cfg.train.batch_size,
        "train.log_every": cfg.train.log_every, "train.eval_every": cfg.train.eval_every,
        "optim.grad_accum": cfg.optim.grad_accum, "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep, "sample.batch_size": cfg.sample.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive; got {value}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads}); "
            f"pick n_kv_heads from {[d for d in range(1, m.n_heads + 1) if m.n_heads % d == 0]}")
    if m.head_dim == 0:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must equal n_heads*head_dim: it is not divisible by "
            f"model.n_heads ({m.n_heads}); change one, or set model.head_dim explicitly")
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim must be even for rotary embeddings; got {m.head_dim}")
    if m.sliding_window < 0:
        raise ConfigError(f"model.sliding_window must be >= 0 (0: unlimited); got {m.sliding_window}")
    if m.rope_theta <= 0 or m.norm_eps <= 0:
        raise ConfigError("model.rope_theta and model.norm_eps must be positive")
    _validate_rope_scaling(m)
    if m.mlp_bias and m.mlp != "gelu_tanh":
        raise ConfigError("model.mlp_bias needs model.mlp=gelu_tanh (the SwiGLU MLP has no biases)")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); "
            "lower data.seq_len or raise model.max_seq_len")
    if cfg.train.time_budget_s < 0:
        raise ConfigError(f"train.time_budget_s must be >= 0 (0: no budget); got {cfg.train.time_budget_s}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive; got {cfg.optim.lr}")
    if not 0.0 <= cfg.data.fim_rate <= 1.0 or not 0.0 <= cfg.data.fim_spm_rate <= 1.0:
        raise ConfigError("data.fim_rate and data.fim_spm_rate must be in [0, 1]")
    if not 0.0 <= cfg.data.pair_ratio <= 1.0 or not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("data.pair_ratio must be in [0, 1] and data.val_fraction in [0, 1)")
    for axis in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, axis)
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{axis} must be a positive size or -1 (the rest); got {v}")
    if sum(getattr(cfg.mesh, a) == -1 for a in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    _validate_lora(cfg)
    batch_shards = max(cfg.mesh.data, 1) * max(cfg.mesh.fsdp, 1)
    if cfg.train.batch_size % (batch_shards * cfg.optim.grad_accum):
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by mesh.data*mesh.fsdp "
            f"({batch_shards}) times optim.grad_accum ({cfg.optim.grad_accum})")
    # corpus preparation (data prepare) and prepared data
    d = cfg.data
    if not 0.0 < d.near_dup_threshold <= 1.0:
        raise ConfigError(f"data.near_dup_threshold must be in (0, 1]; got {d.near_dup_threshold}")
    if d.decontam_ngram < 1:
        raise ConfigError(f"data.decontam_ngram must be positive; got {d.decontam_ngram}")
    if d.source == "prepared" and not d.paths:
        raise ConfigError("data.source=prepared needs data.paths=[DIR], a directory written by "
                          "`codegen-jax data prepare --out DIR`")


def _validate_rope_scaling(m: ModelConfig) -> None:
    """The RoPE scaling fields that `model.rope_scaling` reads, each in its valid range."""
    kind = m.rope_scaling
    if kind == "none":
        return
    if m.rope_factor < 1.0:
        raise ConfigError(f"model.rope_factor must be >= 1 with model.rope_scaling={kind}; got {m.rope_factor}")
    if kind in ("llama3", "yarn") and m.rope_original_max_seq_len <= 0:
        raise ConfigError(f"model.rope_scaling={kind} needs model.rope_original_max_seq_len, the pretraining "
                          "context length (> 0)")
    if kind == "llama3" and not 0.0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise ConfigError("model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor < "
                          f"model.rope_high_freq_factor; got {m.rope_low_freq_factor}, {m.rope_high_freq_factor}")
    if kind == "yarn" and (m.rope_beta_fast <= 0 or m.rope_beta_slow <= 0 or m.rope_attention_factor < 0):
        raise ConfigError("model.rope_scaling=yarn needs positive model.rope_beta_fast and model.rope_beta_slow "
                          "and model.rope_attention_factor >= 0 (0: computed from rope_factor)")


def _validate_lora(cfg: Config) -> None:
    lo = cfg.lora
    if not lo.enabled:
        return
    if lo.rank <= 0:
        raise ConfigError(f"lora.rank must be positive; got {lo.rank}")
    if lo.alpha <= 0 or not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"lora.alpha must be positive and lora.dropout in [0, 1); got {lo.alpha}, {lo.dropout}")
    valid = LORA_TARGETS.get(cfg.model.mlp, ())
    bad = [t for t in lo.targets if t not in valid]
    if bad or not lo.targets:
        raise ConfigError(f"lora.targets {lo.targets}: {', '.join(bad) or 'empty'} is not a projection of this "
                          f"model (model.mlp={cfg.model.mlp}); choose from {', '.join(valid)}")
    if len(set(lo.targets)) != len(lo.targets):
        raise ConfigError(f"lora.targets {lo.targets} names a projection twice; list each once")


def mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve -1 and check that data*fsdp*tensor equals the device count."""
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    known = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    if free:
        if num_devices % known:
            raise ConfigError(
                f"mesh {sizes} cannot fill {num_devices} devices: {num_devices} is not divisible by {known}")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"mesh data*fsdp*tensor = {math.prod(sizes.values())} but there are {num_devices} devices; "
            "set the sizes to multiply to the device count, or one of them to -1")
    return sizes


def batch_shards(cfg: Config, num_devices: int) -> int:
    sizes = mesh_shape(cfg.mesh, num_devices)
    return sizes["data"] * sizes["fsdp"]


def check_batch(cfg: Config, num_devices: int) -> None:
    """The batch must split evenly over the resolved data*fsdp axes (and microbatches)."""
    shards = batch_shards(cfg, num_devices)
    if cfg.train.batch_size % (shards * cfg.optim.grad_accum):
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by mesh.data*mesh.fsdp ({shards}) "
            f"times optim.grad_accum ({cfg.optim.grad_accum}) on {num_devices} devices")
