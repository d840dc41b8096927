"""Sampling as pure functions of [b, v] logits: the filters (a removed token gets -inf), repetition
controls, and `sample_tokens`, which turns one decode step's logits into the next tokens.

Every knob is a per-row runtime value (`SamplingParams`, arrays [b]), so rows with different settings
share one compiled program (the server's slots); `SamplingMode` holds what is static: which filters
run at all, and the ids that are never sampled.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    """Per-row sampling values, each [b]: temperature 0 is greedy, top_k 0 / top_p 1 / min_p 0 are off,
    repetition_penalty 1 is off."""

    temperature_b: jax.Array
    top_p_b: jax.Array
    min_p_b: jax.Array
    top_k_b: jax.Array
    repetition_penalty_b: jax.Array


class SamplingMode(NamedTuple):
    """The static part of sampling: each distinct value compiles its own programs."""

    sample: bool  # some row samples (temperature > 0); False: all greedy, the filters are skipped
    top_k: bool  # whether each filter runs (k, p and min_p themselves are per-row values)
    top_p: bool
    min_p: bool
    repetition_penalty: bool
    no_repeat_ngram: int  # 0: off; n: never sample a token that repeats an n-gram of the row
    eos_id: int  # -1: never stop on EOS
    pad_id: int
    vocab_limit: int  # ids >= this are never sampled (model vocab padded past the tokenizer's)


def _rows(x: jax.Array | float | int) -> jax.Array:
    """A per-row value as [b, 1] (or a scalar as is), to broadcast against [b, v]."""
    x = jnp.asarray(x)
    return x[:, None] if x.ndim == 1 else x


def order_keys(x_bv: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values: thresholds found on them are exact."""
    x_bv = x_bv.astype(jnp.float32)
    i = jax.lax.bitcast_convert_type(jnp.where(x_bv == 0, 0.0, x_bv), jnp.int32)  # -0.0 is 0.0
    i = jnp.where(i < 0, i ^ 0x7FFFFFFF, i)  # negative floats: a larger magnitude sorts lower
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def largest_key(keys_bv: jax.Array, ok: Any) -> jax.Array:
    """uint32 [b]: per row, the largest t with `ok(keys_bv >= t)` (`ok` maps a [b, v] mask to [b]
    bools; it must hold at t = 0 and only turn false as t grows). A 32-step binary search of cheap
    masked reductions: XLA's sort and top-k on CPU cost ~10x more per decode step."""
    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        good = ok(keys_bv >= mid[:, None])
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)

    b = keys_bv.shape[0]
    lo_hi = (jnp.zeros((b,), jnp.uint32), jnp.full((b,), 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, body, lo_hi)[0]


def top_k_filter(logits_bv: jax.Array, k: jax.Array | int) -> jax.Array:
    """Keep each row's k largest logits (ties with the k-th are kept too); k <= 0 keeps all."""
    keys_bv = order_keys(logits_bv)
    k = jnp.asarray(k)
    kth_b = largest_key(keys_bv, lambda keep_bv: jnp.sum(keep_bv, axis=-1) >= k)
    return jnp.where((keys_bv >= kth_b[:, None]) | _rows(k <= 0), logits_bv, -jnp.inf)


def top_p_filter(logits_bv: jax.Array, p: jax.Array | float) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is >= p
    (tokens tied with the last one needed are kept too, as in `top_k_filter`)."""
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)
    keys_bv = order_keys(logits_bv)
    p = jnp.asarray(p)
    cut_b = largest_key(keys_bv, lambda keep_bv: jnp.sum(jnp.where(keep_bv, probs_bv, 0.0), axis=-1) >= p)
    return jnp.where(keys_bv >= cut_b[:, None], logits_bv, -jnp.inf)


def min_p_filter(logits_bv: jax.Array, min_p: jax.Array | float) -> jax.Array:
    """Keep tokens whose probability is at least `min_p` times that of the row's most likely token."""
    max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    return jnp.where(logits_bv < max_b1 + jnp.log(_rows(min_p)), -jnp.inf, logits_bv)


def argmax(logits_bv: jax.Array) -> jax.Array:
    """int32 [b]: first index of each row's maximum. Two plain reductions: XLA on CPU runs them about
    6x faster than `jnp.argmax`'s variadic (value, index) reduce, which is per step on the hot path."""
    max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    v = logits_bv.shape[-1]
    return jnp.min(jnp.where(logits_bv == max_b1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def _scatter_rows(shape: tuple[int, int], ids_bs: jax.Array, on_bs: jax.Array) -> jax.Array:
    """bool [b, v]: True at (r, ids_bs[r, j]) wherever on_bs[r, j]."""
    rows_bs = jnp.broadcast_to(jnp.arange(shape[0])[:, None], ids_bs.shape)
    return jnp.zeros(shape, bool).at[rows_bs, ids_bs].max(on_bs, mode="drop")


def repetition_penalty(logits_bv: jax.Array, history_bs: jax.Array, length_b: jax.Array,
                       penalty_b: jax.Array) -> jax.Array:
    """HF's (CTRL's) repetition penalty over the row's tokens so far (slots < length_b of the
    history): a seen token's logit is divided by the penalty when positive, multiplied when not."""
    seen_bv = _scatter_rows(logits_bv.shape, history_bs, jnp.arange(history_bs.shape[1]) < length_b[:, None])
    pen = _rows(penalty_b)
    return jnp.where(seen_bv, jnp.where(logits_bv > 0, logits_bv / pen, logits_bv * pen), logits_bv)


def no_repeat_ngram(logits_bv: jax.Array, history_bs: jax.Array, length_b: jax.Array, n: int) -> jax.Array:
    """Forbid every token that would complete an n-gram already in the row's history (slots <
    length_b): HF's `no_repeat_ngram_size`."""
    b, s = history_bs.shape
    slots_s = jnp.arange(s)
    # the row's last n-1 tokens, the prefix a new n-gram would start with
    last_slots_bn = jnp.clip(length_b[:, None] - (n - 1) + jnp.arange(n - 1), 0, s - 1)
    last_bn = jnp.take_along_axis(history_bs, last_slots_bn, axis=1)
    match_bs = slots_s[None, :] + n - 1 < length_b[:, None]  # n-grams starting at slot j end inside
    for i in range(n - 1):
        shifted_bs = jnp.roll(history_bs, -i, axis=1)
        match_bs = match_bs & (shifted_bs == last_bn[:, i:i + 1])
    banned_ids_bs = jnp.roll(history_bs, -(n - 1), axis=1)  # the token that followed each match
    banned_bv = _scatter_rows(logits_bv.shape, banned_ids_bs, match_bs & (length_b[:, None] >= n - 1))
    return jnp.where(banned_bv, -jnp.inf, logits_bv)


def sample_tokens(logits_bv: jax.Array, keys_b2: jax.Array, step_b: jax.Array, params: SamplingParams,
                  mode: SamplingMode, history_bs: jax.Array | None = None,
                  length_b: jax.Array | None = None) -> jax.Array:
    """int32 [b] next tokens. `keys_b2` holds one key per row, folded with the row's `step_b` so each
    step draws fresh bits. Order: repetition controls, then (rows with temperature > 0) temperature,
    top-k, top-p, min-p and a Gumbel-max draw; greedy rows take the argmax."""
    v = logits_bv.shape[-1]
    if mode.vocab_limit < v:
        logits_bv = jnp.where(jnp.arange(v) < mode.vocab_limit, logits_bv, -jnp.inf)
    if mode.repetition_penalty:
        logits_bv = repetition_penalty(logits_bv, history_bs, length_b, params.repetition_penalty_b)
    if mode.no_repeat_ngram:
        logits_bv = no_repeat_ngram(logits_bv, history_bs, length_b, mode.no_repeat_ngram)
    greedy_b = argmax(logits_bv)
    if not mode.sample:
        return greedy_b
    temperature_b = params.temperature_b
    scaled_bv = logits_bv / _rows(jnp.where(temperature_b > 0, temperature_b, 1.0))
    if mode.top_k:
        scaled_bv = top_k_filter(scaled_bv, params.top_k_b)
    if mode.top_p:
        scaled_bv = top_p_filter(scaled_bv, params.top_p_b)
    if mode.min_p:
        scaled_bv = min_p_filter(scaled_bv, params.min_p_b)
    step_keys_b2 = jax.vmap(jax.random.fold_in)(keys_b2, step_b)
    gumbel_bv = jax.vmap(lambda k: jax.random.gumbel(k, (v,)))(step_keys_b2)
    sampled_b = argmax(scaled_bv + gumbel_bv)  # Gumbel-max: an exact draw from softmax(scaled)
    return jnp.where(temperature_b > 0, sampled_b, greedy_b)
