"""Analytic size and cost of a model config: parameters and model FLOPs per token (what MFU divides
by and what `plan` checks against the compiler's count)."""

from __future__ import annotations

from codegen_jax.config import ModelConfig


def param_count(cfg: ModelConfig) -> int:
    """Analytic parameter count (the tests check it against the real model)."""
    d, h, g, k, f, v, n = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           cfg.vocab_size, cfg.n_layers)
    attn = (d * h * k * 2 + d * g * k * 2 + ((h + 2 * g) * k if cfg.attention_bias else 0)
            + (d if cfg.attention_out_bias else 0))
    mlp = _mlp_matrices(cfg) * d * f + (f + d if cfg.mlp_bias else 0)
    norm = d if cfg.norm == "rms" else 2 * d  # LayerNorm: weight and bias
    per_layer = attn + mlp + 2 * norm
    return v * d + n * per_layer + norm + (0 if cfg.tie_embeddings else d * v)


def _mlp_matrices(cfg: ModelConfig) -> int:
    return 3 if cfg.mlp == "swiglu" else 2  # gate, up, down | fc, proj


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of attention's two [t, s] matmuls (q @ k^T, probabilities @ v), over the
    causal half, as MaxText counts them."""
    return cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * seq_len / 2


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul weight (embedding lookup excluded) plus attention's two
    [t, s] matmuls counted over the causal half, as MaxText does; training is 3x forward."""
    d, h, g, k, f, v, n = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           cfg.vocab_size, cfg.n_layers)
    matmul_params = n * (d * h * k * 2 + d * g * k * 2 + _mlp_matrices(cfg) * d * f) + d * v
    forward = 2 * matmul_params + attention_flops_per_token(cfg, seq_len)
    return 3 * forward if training else forward
