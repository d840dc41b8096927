"""Sampling: logit filters, prefill + a compiled decode loop over the KV cache, the `Generator` API and
the `codegen-jax generate` CLI.

How one batch of prompts runs (shapes bucketed, so a stream of requests compiles a few programs):
  1. host: encode, prepend BOS, left-pad to the prompt bucket P (pads: segment 0, position 0; real
     tokens: segment 1, positions 0..L-1 per row) and pad the batch to its bucket.
  2. prefill (one jitted program): one forward pass over [b, P] fills cache slots [0, P) and samples
     each row's first token from its last position.
  3. decode (one jitted program): a `lax.while_loop` of one-token steps (slot P+i, position L+i) that
     exits as soon as every row is done (EOS) or the step limit is hit. Finished rows emit pad. The
     step is the Decoder's math over per-layer params and per-layer caches (keys [b, g, k, s], values
     [b, g, s, k]) updated in place (see `decode_step`), which keeps a step's cost independent of
     copying the cache.
  4. host: decode the text and cut it at the earliest stop string. With stop strings, the decode
     program is called for `stop_check_every` steps at a time and rows whose text already holds a
     stop string are marked done, so a batch ends early (still no Python loop per token).
Random streams are keyed by (seed, prompt index, sample index, step): samples do not depend on
batching, padding or the mesh. Shape suffixes: b batch, p prompt length, n new tokens, v vocab.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from codegen_jax import storage
from codegen_jax.config import ModelConfig, SampleConfig
from codegen_jax.errors import UserError
from codegen_jax.jsonl import read_jsonl
from codegen_jax.model import decode_step, init_cache, per_layer_cache, per_layer_model
from codegen_jax.sharding import batch_sharding, constrain

FINISH_REASONS = ("stop", "eos", "length")


@dataclasses.dataclass
class Completion:
    """One sample for one prompt. `tokens` are the completion's ids (prompt and EOS excluded; with a
    stop string, up to the token in which the stop string starts, so `decode(tokens)` starts with
    `text`)."""

    text: str
    tokens: list[int]
    finish_reason: str  # stop | eos | length
    prompt_index: int = 0
    sample_index: int = 0


# ---------------------------------------------------------------------------------------------------
# Sampling filters: pure functions on [b, v] logits (a removed token gets -inf).


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
    kth_b = largest_key(keys_bv, lambda keep_bv: jnp.sum(keep_bv, axis=-1) >= k)
    return jnp.where((keys_bv >= kth_b[:, None]) | (k <= 0), logits_bv, -jnp.inf)


def top_p_filter(logits_bv: jax.Array, p: jax.Array | float) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is >= p
    (tokens tied with the last one needed are kept too, as in `top_k_filter`)."""
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)
    keys_bv = order_keys(logits_bv)
    cut_b = largest_key(keys_bv, lambda keep_bv: jnp.sum(jnp.where(keep_bv, probs_bv, 0.0), axis=-1) >= p)
    return jnp.where(keys_bv >= cut_b[:, None], logits_bv, -jnp.inf)


def min_p_filter(logits_bv: jax.Array, min_p: jax.Array | float) -> jax.Array:
    """Keep tokens whose probability is at least `min_p` times that of the row's most likely token."""
    max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    return jnp.where(logits_bv < max_b1 + jnp.log(min_p), -jnp.inf, logits_bv)


def argmax(logits_bv: jax.Array) -> jax.Array:
    """int32 [b]: first index of each row's maximum. Two plain reductions: XLA on CPU runs them about
    6x faster than `jnp.argmax`'s variadic (value, index) reduce, which is per step on the hot path."""
    max_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    v = logits_bv.shape[-1]
    return jnp.min(jnp.where(logits_bv == max_b1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


class SamplingMode(NamedTuple):
    """The static part of sampling: each distinct value compiles its own programs."""

    greedy: bool
    top_k: bool  # whether each filter runs (k, p and min_p themselves are runtime values)
    top_p: bool
    min_p: bool
    eos_id: int  # -1: never stop on EOS
    pad_id: int
    vocab_limit: int  # ids >= this are never sampled (model vocab padded past the tokenizer's)


def sample_tokens(logits_bv: jax.Array, keys_b2: jax.Array, step: jax.Array, knobs_4: jax.Array,
                  mode: SamplingMode) -> jax.Array:
    """int32 [b] next tokens. `knobs_4` = (temperature, top_p, min_p, top_k); `keys_b2` one key per
    row, folded with `step` so each step draws fresh bits. Order: temperature, top-k, top-p, min-p."""
    if mode.vocab_limit < logits_bv.shape[-1]:
        logits_bv = jnp.where(jnp.arange(logits_bv.shape[-1]) < mode.vocab_limit, logits_bv, -jnp.inf)
    if mode.greedy:
        return argmax(logits_bv)
    logits_bv = logits_bv / knobs_4[0]
    if mode.top_k:
        logits_bv = top_k_filter(logits_bv, knobs_4[3])
    if mode.top_p:
        logits_bv = top_p_filter(logits_bv, knobs_4[1])
    if mode.min_p:
        logits_bv = min_p_filter(logits_bv, knobs_4[2])
    step_keys_b2 = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b2, step)
    gumbel_bv = jax.vmap(lambda k: jax.random.gumbel(k, logits_bv.shape[-1:]))(step_keys_b2)
    return argmax(logits_bv + gumbel_bv)  # Gumbel-max: an exact draw from softmax(logits)


# ---------------------------------------------------------------------------------------------------
# The compiled programs: pure functions of the model state (nnx.merge inside, Flax's functional form).
# Prefill runs the Decoder itself; decode steps run `model.decode_step` over per-layer caches.


def _record(carry: dict[str, Any], token_b: jax.Array, mode: SamplingMode) -> dict[str, Any]:
    """Write this step's tokens (pad for finished rows) and update the per-row done/EOS/length state."""
    done_b = carry["done_b"]
    token_b = jnp.where(done_b, mode.pad_id, token_b)
    eos_now_b = ~done_b & (token_b == mode.eos_id)
    out_bn = jax.lax.dynamic_update_slice_in_dim(carry["out_bn"], token_b[:, None], carry["step"], 1)
    return {**carry, "out_bn": out_bn, "token_b": token_b, "done_b": done_b | eos_now_b,
            "eos_b": carry["eos_b"] | eos_now_b,
            "n_gen_b": carry["n_gen_b"] + (~done_b & ~eos_now_b).astype(jnp.int32),
            "step": carry["step"] + 1}


def prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens_bp: jax.Array, positions_bp: jax.Array,
            segment_ids_bp: jax.Array, active_b: jax.Array, keys_b2: jax.Array, knobs_4: jax.Array, *,
            cache_len: int, n_out: int, mode: SamplingMode) -> dict[str, Any]:
    """One forward pass over the left-padded prompts: fills cache slots [0, p) of a `cache_len`-slot
    cache and samples token 0.
    Returns the decode carry (cache, out buffer [b, n_out], last token, next position, flags, step)."""
    model = nnx.merge(graphdef, state)
    b, p = tokens_bp.shape
    # the prompts attend over a p-slot cache (not all cache_len slots, 3x fewer for p = n_out / 2);
    # the decode cache is that one padded with empty slots
    cache = init_cache(model.cfg, b, p)
    cache["segment_ids"] = constrain(cache["segment_ids"], "batch", "length")
    logits_b1v, cache = model(tokens_bp, positions_bp, segment_ids_bp, cache=cache, last_only=True)
    carry = {"cache": per_layer_cache(cache, cache_len),
             "out_bn": jnp.full((b, n_out), mode.pad_id, jnp.int32),
             "token_b": jnp.zeros((b,), jnp.int32), "pos_b": positions_bp[:, -1] + 1,
             "done_b": ~active_b, "eos_b": jnp.zeros((b,), bool), "n_gen_b": jnp.zeros((b,), jnp.int32),
             "step": jnp.zeros((), jnp.int32)}
    return _record(carry, sample_tokens(logits_b1v[:, 0], keys_b2, carry["step"], knobs_4, mode), mode)


def decode(graphdef: nnx.GraphDef, state: nnx.State, carry: dict[str, Any], limit: jax.Array,
           stop_b: jax.Array, keys_b2: jax.Array, knobs_4: jax.Array, *, mode: SamplingMode
           ) -> dict[str, Any]:
    """One-token steps in a `lax.while_loop` until `carry['step'] == limit` or every row is done.
    `stop_b` marks rows the host found a stop string in: they are done from now on."""
    model = nnx.merge(graphdef, state)

    def cond(c):
        return (c["step"] < limit) & ~jnp.all(c["done_b"])

    def body(c):
        logits_bv, cache = decode_step(model, c["cache"], c["token_b"], c["pos_b"])
        token_b = sample_tokens(logits_bv, keys_b2, c["step"], knobs_4, mode)
        return _record({**c, "cache": cache, "pos_b": c["pos_b"] + 1}, token_b, mode)

    return jax.lax.while_loop(cond, body, {**carry, "done_b": carry["done_b"] | stop_b})


# ---------------------------------------------------------------------------------------------------
# Host side: options, bucketing, batching, stop strings.


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest size >= n among minimum and 2^k, 1.5 * 2^k (16, 24, 32, 48, ...): at most 1/3 padding
    and a logarithmic number of distinct shapes."""
    size = 1
    while True:
        for c in (size, size * 3 // 2):
            if c >= max(n, minimum):
                return c
        size *= 2


def batch_bucket(n: int, multiple: int = 1) -> int:
    """Next power of two >= n, rounded up to a multiple of the data-parallel size."""
    b = 1 << max(n - 1, 0).bit_length()
    return -(-b // multiple) * multiple


@dataclasses.dataclass
class SamplingOptions:
    """What `Generator.generate` was asked for, defaults resolved from the SampleConfig."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    num_samples: int
    stop: list[str]
    seed: int


def check_options(max_new_tokens: int | None = None, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  num_samples: int | None = None) -> None:
    """Raise a one-line UserError for the first out-of-range value (None = not given, skipped)."""
    problems = [
        (max_new_tokens is not None and max_new_tokens < 1,
         f"max_new_tokens must be >= 1; got {max_new_tokens}"),
        (temperature is not None and not temperature >= 0,
         f"temperature must be >= 0 (0 = greedy); got {temperature}"),
        (top_k is not None and top_k < 0, f"top_k must be >= 0 (0 = off); got {top_k}"),
        (top_p is not None and not 0 < top_p <= 1, f"top_p must be in (0, 1]; got {top_p}"),
        (min_p is not None and not 0 <= min_p <= 1, f"min_p must be in [0, 1]; got {min_p}"),
        (num_samples is not None and num_samples < 1, f"num_samples must be >= 1; got {num_samples}"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index in `text` where the earliest stop string starts, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _tokens_covering(tokenizer: Any, tokens: list[int], n_chars: int) -> list[int]:
    """The shortest prefix of `tokens` whose decoded text is at least `n_chars` long."""
    k = bisect.bisect_left(range(len(tokens) + 1), n_chars, key=lambda i: len(tokenizer.decode(tokens[:i])))
    return tokens[:k]


def pack_prompts(prompts_ids: Sequence[Sequence[int]], batch: int, length: int, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad into (tokens_bp, positions_bp, segment_ids_bp); rows past the prompts hold a lone pad
    token. Pads get segment 0 and position 0; real tokens segment 1 and positions 0..L-1."""
    tokens_bp = np.full((batch, length), pad_id, np.int32)
    positions_bp = np.zeros((batch, length), np.int32)
    segment_ids_bp = np.zeros((batch, length), np.int32)
    for r, ids in enumerate(prompts_ids):
        start = length - len(ids)
        tokens_bp[r, start:] = ids
        positions_bp[r, start:] = np.arange(len(ids))
        segment_ids_bp[r, start:] = 1
    return tokens_bp, positions_bp, segment_ids_bp


def _fetch(x: jax.Array) -> np.ndarray:
    """The whole array on the host; across processes (a collective: every process calls it in the same
    order, which the host loop does since all processes see the same values)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@jax.jit
def _row_keys(seed: jax.Array, prompt_idx_b: jax.Array, sample_idx_b: jax.Array) -> jax.Array:
    """Raw uint32 [b, 2] keys: fold_in(fold_in(PRNGKey(seed), prompt index), sample index)."""
    base = jax.random.PRNGKey(seed)
    def one(i, j):
        return jax.random.fold_in(jax.random.fold_in(base, i), j)

    return jax.vmap(one)(prompt_idx_b, sample_idx_b)


# ---------------------------------------------------------------------------------------------------
# The Generator.


class Generator:
    """Generates completions with a Decoder: `Generator(model, tokenizer, model_cfg, mesh)` for a model
    in memory, `Generator.from_checkpoint(DIR)` for a saved run. Compiled programs are cached per
    (bucketed batch, prompt length, new-token buffer, sampling mode); `last_stats` reports compile
    and run time of the latest `generate` call separately."""

    def __init__(self, model: nnx.Module, tokenizer: Any, model_cfg: ModelConfig,
                 mesh: jax.sharding.Mesh | None = None, *, sample_cfg: SampleConfig | None = None,
                 max_batch_size: int = 64, add_bos: bool = True, stop_check_every: int = 32):
        # params laid out by the rules table on `mesh`, whatever mesh they came from
        self.graphdef, self.state, self.model_cfg = per_layer_model(model, model_cfg, mesh)
        self.tokenizer, self.mesh = tokenizer, mesh
        self.sample_cfg = sample_cfg or SampleConfig()
        self.dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.max_batch_size = -(-max_batch_size // self.dp) * self.dp
        self.add_bos, self.stop_check_every = add_bos, stop_check_every
        self.last_stats: dict[str, float] = {}
        self._programs: dict[tuple, Any] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, mesh: jax.sharding.Mesh | None = None, **kwargs: Any
                        ) -> Generator:
        """Load a run dir (latest step) or a step dir; tokenizer, model and sampling defaults come from
        the checkpoint. Default mesh: every device on the data axis."""
        from codegen_jax.checkpoint import load_inference
        from codegen_jax.sharding import make_mesh

        if mesh is None:
            mesh = make_mesh({"data": jax.device_count(), "fsdp": 1, "tensor": 1})
        cfg, model, tokenizer, step = load_inference(path, mesh)
        gen = cls(model, tokenizer, cfg.model, mesh, sample_cfg=cfg.sample, **kwargs)
        gen.config, gen.step = cfg, step
        return gen

    # -- public entry points --------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, num_samples: int = 1, stop: Sequence[str] | None = None,
                 seed: int = 0, truncate: bool = False, progress: bool = False) -> list[list[Completion]]:
        """Completions per prompt, per sample. Unset options come from the SampleConfig (`stop=None` ->
        its stop strings; `stop=[]` -> none). `truncate` keeps the end of a prompt too long for the
        context instead of raising. temperature 0 is greedy."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise UserError("prompts must be a list of strings")
        opts = self.options(max_new_tokens, temperature, top_k, top_p, min_p, num_samples, stop, seed)
        ids = [self.prompt_ids(p, opts.max_new_tokens, truncate, i) for i, p in enumerate(prompts)]
        return self._generate(ids, opts, eos=True, progress=progress)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], ignore_eos: bool = False, **options: Any
                     ) -> list[list[Completion]]:
        """`generate` on token ids taken as given (no BOS added); `ignore_eos` always runs
        max_new_tokens steps (benchmarks)."""
        opts = self.options(**options)
        ctx = self.model_cfg.max_seq_len
        for i, ids in enumerate(prompt_ids):
            if not 0 < len(ids) <= ctx - opts.max_new_tokens:
                raise UserError(f"prompt {i} has {len(ids)} tokens; 1..{ctx - opts.max_new_tokens} fit")
        return self._generate([list(map(int, x)) for x in prompt_ids], opts, eos=not ignore_eos)

    def options(self, max_new_tokens: int | None = None, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                num_samples: int = 1, stop: Sequence[str] | None = None, seed: int = 0) -> SamplingOptions:
        """Resolve unset options from the SampleConfig and validate them (UserError)."""
        d = self.sample_cfg
        opts = SamplingOptions(
            max_new_tokens=d.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            temperature=d.temperature if temperature is None else float(temperature),
            top_k=d.top_k if top_k is None else int(top_k), top_p=d.top_p if top_p is None else float(top_p),
            min_p=d.min_p if min_p is None else float(min_p), num_samples=int(num_samples),
            stop=list(d.stop if stop is None else stop), seed=int(seed))
        check_options(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p, opts.min_p,
                      opts.num_samples)
        if opts.max_new_tokens >= self.model_cfg.max_seq_len:
            raise UserError(f"max_new_tokens ({opts.max_new_tokens}) must be below the model's context "
                            f"length ({self.model_cfg.max_seq_len}) to leave room for the prompt")
        return opts

    def prompt_ids(self, prompt: str, max_new_tokens: int, truncate: bool = False, index: int = 0
                   ) -> list[int]:
        """BOS + the prompt's tokens (an empty prompt is BOS alone), checked against the context."""
        tok = self.tokenizer
        ids = tok.encode(prompt)
        head = [tok.bos_id] if self.add_bos or not ids else []
        room = self.model_cfg.max_seq_len - max_new_tokens
        if len(head) + len(ids) > room:
            if not truncate:
                raise UserError(
                    f"prompt {index} has {len(head) + len(ids)} tokens but only {room} fit in the model's "
                    f"context of {self.model_cfg.max_seq_len} with max_new_tokens={max_new_tokens}; "
                    "shorten it, lower max_new_tokens, or pass --truncate to keep its end")
            ids = ids[len(ids) - (room - len(head)):]  # left truncation keeps the text nearest the cut
        return head + ids

    # -- batching -------------------------------------------------------------------------------------

    def _generate(self, prompt_ids: list[list[int]], opts: SamplingOptions, eos: bool,
                  progress: bool = False) -> list[list[Completion]]:
        """Rows = (prompt, sample) pairs, longest prompts first (less padding), in batches."""
        from tqdm import tqdm

        rows = [(i, j) for i in range(len(prompt_ids)) for j in range(opts.num_samples)]
        rows.sort(key=lambda r: -len(prompt_ids[r[0]]))
        mode = self._mode(opts, eos)
        out: list[list[Completion | None]] = [[None] * opts.num_samples for _ in prompt_ids]
        self.last_stats = {"compile_s": 0.0, "run_s": 0.0, "new_tokens": 0, "batches": 0}
        with tqdm(total=len(rows), disable=not progress, file=sys.stderr, desc="generate",
                  unit="seq", dynamic_ncols=True) as bar:
            for start in range(0, len(rows), self.max_batch_size):
                batch = rows[start:start + self.max_batch_size]
                done = self._run_batch([prompt_ids[i] for i, _ in batch], batch, opts, mode)
                for (i, j), c in zip(batch, done):
                    out[i][j] = dataclasses.replace(c, prompt_index=i, sample_index=j)
                bar.update(len(batch))
        st = self.last_stats
        st["tokens_per_s"] = st["new_tokens"] / st["run_s"] if st["run_s"] > 0 else 0.0
        return out  # type: ignore[return-value]

    def _mode(self, opts: SamplingOptions, eos: bool) -> SamplingMode:
        greedy = opts.temperature == 0
        tok = self.tokenizer
        return SamplingMode(
            greedy=greedy, top_k=not greedy and 0 < opts.top_k < self.model_cfg.vocab_size,
            top_p=not greedy and opts.top_p < 1,
            min_p=not greedy and opts.min_p > 0, eos_id=tok.eos_id if eos else -1, pad_id=tok.pad_id,
            vocab_limit=min(self.model_cfg.vocab_size, tok.vocab_size))

    def _length_buckets(self, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
        """(prompt bucket, new-token buffer): bucketed, shrunk to fit the context when needed. The
        callers guarantee prompt_len + max_new_tokens <= max_seq_len, so both still fit."""
        ctx = self.model_cfg.max_seq_len
        p_len = min(bucket(prompt_len), ctx - max_new_tokens)
        return p_len, min(bucket(max_new_tokens), ctx - p_len)

    def _put(self, x: np.ndarray, batched: bool = True) -> jax.Array:
        """Host array (the same on every process) -> global array: batch dim over (data, fsdp) on the
        mesh, or replicated. Each process fills only its own devices' shards."""
        if self.mesh is None:
            return jnp.asarray(x)
        x = np.asarray(x)
        sharding = batch_sharding(self.mesh, x.ndim) if batched else NamedSharding(self.mesh, PartitionSpec())
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def _program(self, name: str, key: tuple, fn: Any, args: tuple, donate: tuple[int, ...] = (),
                 **statics: Any) -> Any:
        """The compiled `fn` for these shapes and statics: ahead-of-time compiled once (timed into
        last_stats['compile_s']), then reused."""
        compiled = self._programs.get((name, key))
        if compiled is None:
            t0 = time.perf_counter()
            jitted = jax.jit(functools.partial(fn, self.graphdef, **statics), donate_argnums=donate)
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                compiled = jitted.lower(*args).compile()
            self._programs[(name, key)] = compiled
            self.last_stats["compile_s"] += time.perf_counter() - t0
        return compiled

    def _run_batch(self, prompts_ids: list[list[int]], rows: list[tuple[int, int]], opts: SamplingOptions,
                   mode: SamplingMode) -> list[Completion]:
        """Prefill + decode one batch of rows (prompt index, sample index); completions in row order."""
        t0, compile0 = time.perf_counter(), self.last_stats["compile_s"]
        n, max_new = len(prompts_ids), opts.max_new_tokens
        b = batch_bucket(n, self.dp)
        p_len, n_out = self._length_buckets(max(map(len, prompts_ids)), max_new)
        filler = [[self.tokenizer.bos_id]] * (b - n)  # inactive rows: done from the start
        packed = pack_prompts(list(prompts_ids) + filler, b, p_len, mode.pad_id)
        idx_b2 = np.array(list(rows) + [(0, 0)] * (b - n), np.uint32)
        keys_b2 = np.asarray(_row_keys(np.uint32(opts.seed & 0xFFFFFFFF), idx_b2[:, 0], idx_b2[:, 1]))
        knobs_4 = np.array([opts.temperature or 1.0, opts.top_p, opts.min_p, opts.top_k], np.float32)
        args = (*map(self._put, packed), self._put(np.arange(b) < n), self._put(keys_b2),
                self._put(knobs_4, batched=False))
        key = (b, p_len, n_out, mode)
        carry = self._program("prefill", key, prefill, (self.state, *args), cache_len=p_len + n_out,
                              n_out=n_out, mode=mode)(self.state, *args)
        stop_b = np.zeros(b, bool)
        while True:
            step, done_b, out_bn, n_gen_b = map(
                _fetch, (carry["step"], carry["done_b"], carry["out_bn"], carry["n_gen_b"]))
            if opts.stop:
                stop_b |= self._rows_with_stop(out_bn, n_gen_b, ~done_b & ~stop_b, opts.stop)
            if step >= max_new or (done_b | stop_b).all():
                break
            limit = max_new if not opts.stop else min(step + self.stop_check_every, max_new)
            dec_args = (self.state, carry, self._put(np.int32(limit), batched=False), self._put(stop_b),
                        args[4], args[5])
            carry = self._program("decode", key, decode, dec_args, donate=(1,), mode=mode)(*dec_args)
        eos_b = _fetch(carry["eos_b"])
        st = self.last_stats
        st["new_tokens"] += int(n_gen_b[:n].sum() + eos_b[:n].sum())
        st["batches"] += 1
        st["run_s"] += time.perf_counter() - t0 - (st["compile_s"] - compile0)
        return [self._completion(out_bn[r, :n_gen_b[r]].tolist(), bool(eos_b[r]), opts.stop)
                for r in range(n)]

    def _rows_with_stop(self, out_bn: np.ndarray, n_gen_b: np.ndarray, check_b: np.ndarray,
                        stops: list[str]) -> np.ndarray:
        """bool [b]: rows (among `check_b`) whose text so far holds a stop string."""
        found_b = np.zeros(len(check_b), bool)
        for r in np.flatnonzero(check_b):
            found_b[r] = find_stop(self.tokenizer.decode(out_bn[r, :n_gen_b[r]].tolist()), stops) is not None
        return found_b

    def _completion(self, tokens: list[int], hit_eos: bool, stops: list[str]) -> Completion:
        """Text cut at the earliest stop string; finish reason stop > eos > length."""
        text = self.tokenizer.decode(tokens)
        cut = find_stop(text, stops)
        if cut is not None:
            return Completion(text[:cut], _tokens_covering(self.tokenizer, tokens, cut), "stop")
        return Completion(text, tokens, "eos" if hit_eos else "length")


# ---------------------------------------------------------------------------------------------------
# CLI: codegen-jax generate


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """JSONL records with a string `prompt` (other fields pass through); one clear UserError if not."""
    records = []
    for n, rec in read_jsonl(path, "prompts"):
        if not isinstance(rec.get("prompt"), str):
            raise UserError(f"prompts file {path}, line {n}: each line needs a string 'prompt' field")
        records.append(rec)
    if not records:
        raise UserError(f"prompts file {path} holds no prompts")
    return records


def _unescape(s: str) -> str:
    r"""Shell-typed escapes in stop strings: `--stop '\ndef'` means newline + def."""
    return s.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def generate_cli(args: Any) -> None:
    """`codegen-jax generate`: prompts from --prompt or a JSONL file; JSONL out (--out, or stdout for a
    file), or the prompt + completion text on stdout for --prompt. Timing goes to stderr."""
    check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p,
                  args.num_samples)
    if args.prompts_file:
        records = read_prompts(storage.local_copy(args.prompts_file))
    else:
        records = [{"prompt": args.prompt}]
    stop = None if args.stop is None else [_unescape(s) for s in args.stop]
    gen = Generator.from_checkpoint(args.checkpoint)
    results = gen.generate([r["prompt"] for r in records], max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           min_p=args.min_p, num_samples=args.num_samples, stop=stop, seed=args.seed,
                           truncate=getattr(args, "truncate", False), progress=bool(args.prompts_file))
    lines = []
    for rec, samples in zip(records, results):
        for c in samples:
            extra = {"sample": c.sample_index} if args.num_samples > 1 else {}
            lines.append(json.dumps({**rec, **extra, "completion": c.text, "tokens": c.tokens,
                                     "finish_reason": c.finish_reason}))
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {args.out}: {e.strerror or e}") from None
    elif args.prompts_file:
        sys.stdout.write("".join(line + "\n" for line in lines))
    else:
        for c in results[0]:
            if args.num_samples > 1:
                sys.stdout.write(f"=== sample {c.sample_index} ({c.finish_reason}) ===\n")
            sys.stdout.write(args.prompt + c.text + "\n")
    st = gen.last_stats
    print(f"generated {st['new_tokens']} tokens in {st['run_s']:.2f}s ({st['tokens_per_s']:.1f} tok/s), "
          f"compile {st['compile_s']:.2f}s", file=sys.stderr)
