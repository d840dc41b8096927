"""The compiled side of generation: a decode state of fixed-size "slots" and the programs on it.

A `DecodeState` holds S rows, each with its own KV cache region, last token, random key, sampling
parameters, token budget and done flags. Three programs act on it, all pure functions of the model
state (nnx.merge inside, Flax's functional form), compiled ahead of time once per shape and reused:

- `admit`: prefill n right-padded prompts [n, P] in one forward pass, sample each one's first token,
  and write the rows into n chosen slots (the rest of the state is untouched);
- `decode`: up to `n_steps` one-token steps of chosen rows (the live ones, padded to a bucket), each
  over the first `length` slots of its cache, in a `lax.while_loop` that exits as soon as all rows are
  done; finished and padding rows emit pad;
- `grow`: the same state with more cache slots per row.

The `Engine` owns the model state, the mesh and the compiled programs; `scheduler.py` decides what
to admit and when (static batches for `Generator`, continuous batching for the server). Random
streams are keyed per row by its (seed, prompt index, sample index) key and the number of tokens it
has sampled, so a row's random draws do not depend on batching, padding, its slot or the mesh (its
logits do, by float rounding, when the rows and length buckets of a decode call change its shapes).
Shape suffixes: b slots, n admitted rows, m decoded rows, p prompt length, s cache slots, v vocab.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from codegen_jax.kv_cache import K_BGKS, V_BGSK, KVCache, LayerCache, init_cache
from codegen_jax.model import unstacked
from codegen_jax.sample.filters import SamplingMode, SamplingParams, sample_tokens
from codegen_jax.sharding import batch_sharding, logical_to_spec


@flax.struct.dataclass
class DecodeState:
    """S slots of decoding. A slot's tokens by cache slot (`tokens_bs`: prompt, then what it sampled)
    feed the repetition controls; `token_b` is the next decode input; `n_gen_b` counts sampled tokens
    (the row's RNG step); a row is done after EOS, its `limit_b`, a host stop, or when empty."""

    cache: KVCache
    tokens_bs: jax.Array
    token_b: jax.Array
    keys_b2: jax.Array
    params: SamplingParams
    n_gen_b: jax.Array
    limit_b: jax.Array
    done_b: jax.Array
    eos_b: jax.Array

    @property
    def slots(self) -> int:
        return self.token_b.shape[0]

    @property
    def capacity(self) -> int:
        return self.cache.capacity


@flax.struct.dataclass
class Emitted:
    """What one program call emitted for the rows it ran (leading dim: those rows, in its order): the
    tokens (pad where a row was not live), how many of them are the row's, and whether the row is done
    and ended at EOS after the call (only what the host needs of the state, so a round fetches these
    few values rather than the state's per-slot arrays)."""

    tokens_mk: jax.Array
    n_new_m: jax.Array
    done_m: jax.Array
    eos_m: jax.Array


def empty_state(model_cfg: Any, slots: int, capacity: int) -> DecodeState:
    """A state of `slots` empty (done) rows with `capacity` cache slots each."""
    zeros_b = jnp.zeros((slots,), jnp.int32)
    params = SamplingParams(jnp.zeros((slots,)), jnp.ones((slots,)), jnp.zeros((slots,)), zeros_b,
                            jnp.ones((slots,)))
    return DecodeState(init_cache(model_cfg, slots, capacity), jnp.zeros((slots, capacity), jnp.int32),
                       zeros_b, jnp.zeros((slots, 2), jnp.uint32), params, zeros_b, zeros_b,
                       jnp.ones((slots,), bool), jnp.zeros((slots,), bool))


def _record(state: DecodeState, token_b: jax.Array, live_b: jax.Array, mode: SamplingMode
            ) -> tuple[DecodeState, jax.Array]:
    """Take the sampled tokens of the `live_b` rows: count them, flag EOS and budget ends. Returns the
    state and the tokens as emitted (pad for rows that were not live)."""
    token_b = jnp.where(live_b, token_b, mode.pad_id)
    eos_now_b = live_b & (token_b == mode.eos_id)
    n_gen_b = state.n_gen_b + live_b.astype(jnp.int32)
    done_b = state.done_b | eos_now_b | (live_b & (n_gen_b >= state.limit_b))
    return state.replace(token_b=jnp.where(live_b, token_b, state.token_b), n_gen_b=n_gen_b, done_b=done_b,
                         eos_b=state.eos_b | eos_now_b), token_b


def admit(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, tokens_np: jax.Array,
          lengths_n: jax.Array, slots_n: jax.Array, live_n: jax.Array, key_ids_n3: jax.Array,
          sampling_n: SamplingParams, limit_n: jax.Array, *, mode: SamplingMode
          ) -> tuple[DecodeState, Emitted]:
    """Prefill n right-padded prompts (row i: `lengths_n[i]` tokens, then padding) into slots
    `slots_n` and sample their first tokens; `key_ids_n3` (uint32 seed, prompt index, sample index)
    names each row's random stream (`row_keys`). Rows with `live_n` False only fill a group to its
    bucket size: their slots stay done. Returns the state and what the n rows emitted (their first
    tokens, [n, 1], pad where not live)."""
    model = nnx.merge(graphdef, params)
    # the keys are made here rather than by a program of their own whose result the host fetched: that
    # was one more call and one more wait for the device per prefill
    keys_n2 = row_keys(key_ids_n3[:, 0], key_ids_n3[:, 1], key_ids_n3[:, 2])
    n, p = tokens_np.shape
    segment_ids_np = (jnp.arange(p)[None, :] < lengths_n[:, None]).astype(jnp.int32)
    cache = init_cache(model.cfg, n, p)
    logits_nv, cache = model(tokens_np, segment_ids_bt=segment_ids_np, cache=cache,
                             logits_at_b=jnp.maximum(lengths_n - 1, 0))
    history_np = jnp.where(segment_ids_np > 0, tokens_np, mode.pad_id)
    first_n = sample_tokens(logits_nv, keys_n2, jnp.zeros((n,), jnp.int32), sampling_n, mode,
                            history_np, lengths_n)

    def put(big, small):  # rows `slots_n` of `big` (leading slot axis) from `small`
        return big.at[slots_n].set(small.astype(big.dtype))

    layers = []
    for big, small in zip(state.cache.layers, cache.layers):
        layers.append(LayerCache(big.k_bgks.at[slots_n, :, :, :p].set(small.k_bgks.astype(big.k_bgks.dtype)),
                                 big.v_bgsk.at[slots_n, :, :p].set(small.v_bgsk.astype(big.v_bgsk.dtype))))
    state = state.replace(
        cache=KVCache(tuple(layers), put(state.cache.lengths_b, lengths_n)),
        tokens_bs=state.tokens_bs.at[slots_n, :p].set(history_np),
        keys_b2=put(state.keys_b2, keys_n2), params=jax.tree.map(put, state.params, sampling_n),
        n_gen_b=put(state.n_gen_b, jnp.zeros((n,), jnp.int32)), limit_b=put(state.limit_b, limit_n),
        done_b=put(state.done_b, ~live_n), eos_b=put(state.eos_b, jnp.zeros((n,), bool)))
    live_b = jnp.zeros((state.slots,), bool).at[slots_n].set(live_n)
    token_b = jnp.zeros((state.slots,), jnp.int32).at[slots_n].set(first_n)
    state, emitted_b = _record(state, token_b, live_b, mode)
    return state, Emitted(emitted_b[slots_n][:, None], live_n.astype(jnp.int32), state.done_b[slots_n],
                          state.eos_b[slots_n])



def _take_rows(state: DecodeState, rows_m: jax.Array | None, length: int) -> DecodeState:
    """Rows `rows_m` (None: all) of the state, their caches cut to the first `length` slots."""
    rows_m = slice(None) if rows_m is None else rows_m
    layers = tuple(LayerCache(layer.k_bgks[rows_m, :, :, :length], layer.v_bgsk[rows_m, :, :length])
                   for layer in state.cache.layers)
    rest = jax.tree.map(lambda x: x[rows_m], state.replace(cache=None, tokens_bs=None))
    return rest.replace(cache=KVCache(layers, state.cache.lengths_b[rows_m]),
                        tokens_bs=state.tokens_bs[rows_m, :length])


def _put_rows(state: DecodeState, rows_m: jax.Array | None, sub: DecodeState, start_m: jax.Array,
              n: int) -> DecodeState:
    """The state with rows `rows_m` (None: all) replaced by `sub`, whose caches changed only in the
    `n` slots from `start_m` (the decode steps' writes): only those go back. Writing back the whole
    [rows, :length] cache copied it on every decode call (~2 ms of a call's ~9 ms fixed cost for 32
    rows of 768 slots, probe ~214, about a step's worth); the window is a few kilobytes."""
    length = sub.capacity
    n = min(n, length)
    # a window that would run past `length` starts earlier: the slots it then covers hold what they held
    start_m = jnp.minimum(start_m, length - n)

    def put(big, small, axis):  # axis: the slot axis of big/small
        win = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, n, axis - 1))(small, start_m)
        if rows_m is None:  # every row, in place and in slot order (a sharded state stays put)
            return jax.vmap(lambda row, w, s: jax.lax.dynamic_update_slice_in_dim(row, w, s, axis - 1))(
                big, win, start_m)
        index = [rows_m[:, None]] + [slice(None)] * (axis - 1) + [start_m[:, None] + jnp.arange(n)]
        return big.at[tuple(index)].set(jnp.moveaxis(win, axis, 1))  # advanced indices first: [m, n, ...]

    layers = tuple(LayerCache(put(big.k_bgks, small.k_bgks, 3), put(big.v_bgsk, small.v_bgsk, 2))
                   for big, small in zip(state.cache.layers, sub.cache.layers))
    rows = slice(None) if rows_m is None else rows_m
    rest = jax.tree.map(lambda big, small: big.at[rows].set(small),
                        state.replace(cache=None, tokens_bs=None), sub.replace(cache=None, tokens_bs=None))
    return rest.replace(cache=KVCache(layers, state.cache.lengths_b.at[rows].set(sub.cache.lengths_b)),
                        tokens_bs=state.tokens_bs.at[rows, :length].set(sub.tokens_bs))


def decode(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, rows_m: jax.Array | None,
           stop_m: jax.Array, *, n_steps: int, length: int, mode: SamplingMode
           ) -> tuple[DecodeState, Emitted]:
    """Up to `n_steps` one-token steps of the m rows `rows_m` (distinct slots; None: every slot, which a
    sharded state needs: gathering rows would move caches between devices), over the first `length`
    cache slots of each (the caller keeps every row's filled length + n_steps within it): a step costs
    what the live rows and their context need, not the whole state. `stop_m` marks rows the host ended
    (a stop string, a client gone, an empty slot). Returns the state and what the m rows emitted (tokens
    [m, n_steps], pad where a row was not live)."""
    model = nnx.merge(graphdef, params)
    sub = _take_rows(state, rows_m, length)
    out_mn = jnp.full((sub.slots, n_steps), mode.pad_id, jnp.int32)

    def cond(carry):
        i, st, _ = carry
        return (i < n_steps) & ~jnp.all(st.done_b)

    def body(carry):
        i, st, out_mn = carry
        live_m = ~st.done_b
        old_lengths_m = st.cache.lengths_b
        # finished rows run too (fixed shapes); their writes land at their own next slot, never read
        logits_mv, cache = model.decode(st.token_b, st.cache)
        lengths_m = jnp.where(live_m, cache.lengths_b, old_lengths_m)
        rows = jnp.arange(st.slots)
        tokens_ms = st.tokens_bs.at[rows, old_lengths_m].set(jnp.where(live_m, st.token_b,
                                                                       st.tokens_bs[rows, old_lengths_m]))
        st = st.replace(cache=cache.replace(lengths_b=lengths_m), tokens_bs=tokens_ms)
        token_m = sample_tokens(logits_mv, st.keys_b2, st.n_gen_b, st.params, mode, st.tokens_bs, lengths_m)
        st, emitted_m = _record(st, token_m, live_m, mode)
        return i + 1, st, jax.lax.dynamic_update_slice_in_dim(out_mn, emitted_m[:, None], i, 1)

    sub = sub.replace(done_b=sub.done_b | stop_m)
    start_m, n_gen0_m = sub.cache.lengths_b, sub.n_gen_b  # each row writes its steps from start_m on
    _, sub, out_mn = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), sub, out_mn))
    emitted = Emitted(out_mn, sub.n_gen_b - n_gen0_m, sub.done_b, sub.eos_b)
    return _put_rows(state, rows_m, sub, start_m, n_steps), emitted


def grow(state: DecodeState, *, capacity: int) -> DecodeState:
    """The state with `capacity` cache slots per row (the new slots empty)."""
    pad = capacity - state.capacity
    layers = tuple(LayerCache(jnp.pad(layer.k_bgks, ((0, 0), (0, 0), (0, 0), (0, pad))),
                              jnp.pad(layer.v_bgsk, ((0, 0), (0, 0), (0, pad), (0, 0))))
                   for layer in state.cache.layers)
    return state.replace(cache=state.cache.replace(layers=layers),
                         tokens_bs=jnp.pad(state.tokens_bs, ((0, 0), (0, pad))))


def state_shardings(model_cfg: Any, mesh: jax.sharding.Mesh, slots: int, capacity: int) -> Any:
    """Where a state's arrays live: slots over the batch axes, cached keys/values also over kv heads
    (the rules table), the rest replicated."""
    abstract = jax.eval_shape(functools.partial(empty_state, model_cfg, slots, capacity))

    def one(path, x):
        names = ("batch",) + (None,) * (x.ndim - 1)
        if any(getattr(k, "name", None) == "k_bgks" for k in path):
            names = K_BGKS
        elif any(getattr(k, "name", None) == "v_bgsk" for k in path):
            names = V_BGSK
        return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, abstract)


def row_keys(seed_b: jax.Array, prompt_idx_b: jax.Array, sample_idx_b: jax.Array) -> jax.Array:
    """Raw uint32 [b, 2] keys: fold_in(fold_in(PRNGKey(seed), prompt index), sample index) per row."""
    def one(seed, i, j):
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), i), j)

    return jax.vmap(one)(seed_b, prompt_idx_b, sample_idx_b)


def fetch(x: jax.Array) -> np.ndarray:
    """The whole array on the host; across processes (a collective: every process calls it in the same
    order, which the host loop does since all processes see the same values)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Engine:
    """The model in the sampler's layout (a list of layers, parameters laid out on `mesh` by the
    rules table), and its compiled programs, cached by shape; `compiles` counts them and
    `compile_s` sums their compile time."""

    def __init__(self, model: nnx.Module, mesh: jax.sharding.Mesh | None = None):
        self.graphdef, self.params, self.model_cfg = unstacked(model, mesh)
        self.mesh = mesh
        self.dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.compiles, self.compile_s = 0, 0.0
        self._programs: dict[tuple, Any] = {}
        self._shardings: dict[tuple[int, int], Any] = {}

    # -- host arrays in, compiled programs --------------------------------------------------------

    def put(self, x: Any, batched: bool = True) -> jax.Array:
        """Host array (the same on every process) -> global array: leading dim over (data, fsdp), or
        replicated. Each process fills only its own devices' shards."""
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        sharding = batch_sharding(self.mesh, x.ndim) if batched else NamedSharding(self.mesh, PartitionSpec())
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def state_shardings(self, slots: int, capacity: int) -> Any:
        """`state_shardings` of a state of this shape (None without a mesh), worked out once: it traces
        `empty_state`, a few milliseconds of the host's time that every program call would pay."""
        if self.mesh is None:
            return None
        if (slots, capacity) not in self._shardings:
            self._shardings[slots, capacity] = state_shardings(self.model_cfg, self.mesh, slots, capacity)
        return self._shardings[slots, capacity]

    def _compiled(self, key: tuple, fn: Any, args: tuple, donate: tuple[int, ...] = (),
                  out_shardings: Any = None) -> Any:
        compiled = self._programs.get(key)
        if compiled is None:
            t0 = time.perf_counter()
            jitted = jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings)
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                compiled = jitted.lower(*args).compile()
            self._programs[key] = compiled
            self.compiles += 1
            self.compile_s += time.perf_counter() - t0
        return compiled

    # -- the programs -----------------------------------------------------------------------------

    def empty(self, slots: int, capacity: int) -> DecodeState:
        """A state of empty slots, laid out by `state_shardings`."""
        fn = functools.partial(empty_state, self.model_cfg, slots, capacity)
        return self._compiled(("empty", slots, capacity), fn, (),
                              out_shardings=self.state_shardings(slots, capacity))()

    def admit(self, state: DecodeState, tokens_np: np.ndarray, lengths_n: np.ndarray, slots_n: np.ndarray,
              live_n: np.ndarray, key_ids_n3: np.ndarray, sampling_n: SamplingParams, limit_n: np.ndarray,
              mode: SamplingMode) -> tuple[DecodeState, Emitted]:
        """Run `admit` on host arrays (every leading dim n; slots distinct)."""
        rep = functools.partial(self.put, batched=False)
        args = (self.params, state, *map(rep, (tokens_np, lengths_n, slots_n, live_n, key_ids_n3)),
                SamplingParams(*map(rep, sampling_n)), rep(limit_n))
        key = ("admit", tokens_np.shape, state.slots, state.capacity, mode)
        fn = functools.partial(admit, self.graphdef, mode=mode)
        out_sh = None if self.mesh is None else (self.state_shardings(state.slots, state.capacity), None)
        return self._compiled(key, fn, args, donate=(1,), out_shardings=out_sh)(*args)

    def decode(self, state: DecodeState, rows_m: np.ndarray | None, stop_m: np.ndarray, n_steps: int,
               length: int, mode: SamplingMode) -> tuple[DecodeState, Emitted]:
        """Run `decode` on rows `rows_m` (host ints, distinct; None: all) over their first `length`
        cache slots."""
        args = self._decode_args(state, rows_m, stop_m)
        return self._decode_program(state, rows_m is None, len(stop_m), n_steps, length, mode, args)(*args)

    def compile_decode(self, state: DecodeState, m: int, n_steps: int, length: int, mode: SamplingMode) -> None:
        """Compile (without running) `decode` for m rows of this state (all of them when m is its slots)
        over `length` cache slots."""
        rows_m = None if m == state.slots else np.arange(m, dtype=np.int32)
        if self._decode_key(state, rows_m is None, m, n_steps, length, mode) in self._programs:
            return  # compiled already: skip building (and placing) the example arguments
        args = self._decode_args(state, rows_m, np.arange(m) > 0)
        self._decode_program(state, rows_m is None, m, n_steps, length, mode, args)

    def _decode_args(self, state: DecodeState, rows_m: np.ndarray | None, stop_m: np.ndarray) -> tuple:
        rep = functools.partial(self.put, batched=False)
        rows_m = None if rows_m is None else rep(np.asarray(rows_m, np.int32))
        stop_m = np.asarray(stop_m, bool)
        return self.params, state, rows_m, self.put(stop_m) if rows_m is None else rep(stop_m)

    @staticmethod
    def _decode_key(state: DecodeState, every_row: bool, m: int, n_steps: int, length: int,
                    mode: SamplingMode) -> tuple:
        return ("decode", state.slots, state.capacity, every_row, m, n_steps, length, mode)

    def _decode_program(self, state: DecodeState, every_row: bool, m: int, n_steps: int, length: int,
                        mode: SamplingMode, args: tuple) -> Any:
        fn = functools.partial(decode, self.graphdef, n_steps=n_steps, length=length, mode=mode)
        key = self._decode_key(state, every_row, m, n_steps, length, mode)
        out_sh = None if self.mesh is None else (self.state_shardings(state.slots, state.capacity), None)
        return self._compiled(key, fn, args, donate=(1,), out_shardings=out_sh)

    def grow(self, state: DecodeState, capacity: int) -> DecodeState:
        fn = functools.partial(grow, capacity=capacity)
        key = ("grow", state.slots, state.capacity, capacity)
        return self._compiled(key, fn, (state,), donate=(0,),
                              out_shardings=self.state_shardings(state.slots, capacity))(state)
