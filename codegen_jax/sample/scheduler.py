"""The host loop of generation: which requests occupy which slots of the engine's decode state, and
what their tokens mean as text.

One `Scheduler` round (`step`): admit waiting requests into free slots (prefill, grouped by prompt
bucket), run a chunk of decode steps, then per row take the new tokens, cut at stop strings, report
text deltas and finished rows. Two policies share it: static batches (`refill=False`: admit only when
every slot is free, as `Generator` batching did) and continuous batching (`refill=True`: a slot is
refilled as soon as its row ends; the server, and `Generator` by default). Shapes are bucketed (prompt
length, cache capacity, group size), so a stream of requests compiles a few programs, once.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from codegen_jax.sample.engine import DecodeState, Emitted, Engine, fetch
from codegen_jax.sample.filters import SamplingMode, SamplingParams
from codegen_jax.sample.stops import find_stop, held_back


_TEXT_CONTEXT = 4  # tokens decoded before a row's new ones (see `Scheduler._text`)


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest size >= n among minimum and 2^k, 1.5 * 2^k (16, 24, 32, 48, ...): at most 1/3 padding
    and a logarithmic number of distinct shapes."""
    size = 1
    while True:
        for c in (size, size * 3 // 2):
            if c >= max(n, minimum):
                return c
        size *= 2


def pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


FINE_ROWS = 16  # decode calls of this many rows or more take the finer length steps


def decode_length(reach: int, fine: bool = True) -> int:
    """Cache slots a decode call attends for rows that reach `reach` slots: powers of two from 64 to
    256, then (`fine`) four steps per doubling (320, 384, 448, 512, 640, 768, 896, 1024, 1280, ...)
    or 1.5x steps (384, 512, 768, 1024, 1536, ...). Decode reads the whole attended cache of every row
    each step, so its time goes with this length. A continuous-batching call is a short chunk whose
    rows reach well short of the next bucket (the serving benchmark's 32-row chunks reach 560-680
    slots: 640 instead of 768 for most, a tenth fewer slots read in all), and the finer steps raised
    its in-process throughput by 14% (3700 -> 4221 tok/s, three interleaved runs, probe 180-210).
    Each bucket is a program to compile for every rows bucket, so calls of few rows, which read
    little anyway, keep the 1.5x steps; below 256 slots the saving is small."""
    if reach <= 256:
        return pow2_at_least(max(reach, 64))
    if not fine:
        return bucket(reach)
    step = pow2_at_least(reach) // 8
    return -(-reach // step) * step


@dataclasses.dataclass
class Request:
    """One row to generate: prompt ids (taken as given), budget, sampling values, RNG identity."""

    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    stop: Sequence[str] = ()
    seed: int = 0
    key: tuple[int, int] = (0, 0)  # (prompt index, sample index): the row's random stream
    on_text: Callable[[str], None] | None = None  # streaming: each new piece of final text
    tag: Any = None  # the caller's


@dataclasses.dataclass
class Result:
    """A finished row. `tokens` exclude the prompt and EOS; with a stop string they go up to the token
    in which it starts, so `decode(tokens)` starts with `text`."""

    request: Request
    text: str
    tokens: list[int]
    finish_reason: str  # stop | eos | length | cancelled


@dataclasses.dataclass
class _Row:
    request: Request
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    cancelled: bool = False
    text: str = ""  # the decoded text of tokens[:n_text] (kept so each round decodes only its new tokens)
    n_text: int = 0


def _tokens_covering(tokenizer: Any, tokens: list[int], n_chars: int) -> list[int]:
    """The shortest prefix of `tokens` whose decoded text is at least `n_chars` long."""
    k = bisect.bisect_left(range(len(tokens) + 1), n_chars, key=lambda i: len(tokenizer.decode(tokens[:i])))
    return tokens[:k]


class Scheduler:
    """Requests in, `Result`s out, over an `Engine` with `slots` rows. Not thread-safe: one thread
    calls `submit`, `cancel` and `step` (the server's engine thread)."""

    def __init__(self, engine: Engine, tokenizer: Any, slots: int, *, refill: bool = True, chunk: int = 16,
                 min_capacity: int = 64, max_group: int = 0, open_queue: bool = False, precompile: bool = False,
                 fixed_shapes: bool = False):
        """`chunk`: decode steps per round when rows may need the host in between (stop strings,
        streaming, waiting requests); `min_capacity`: the smallest cache (the server sets the context,
        so shapes never change); `max_group`: the most prompts prefilled together (0: any; the server
        uses 1, so a request's prefill has the same shape however many arrive with it); `open_queue`:
        requests may arrive at any time (a server), so every round is one chunk; `precompile`: the
        first decode of a sampling mode compiles every rows/length bucket (the server: no request
        compiles once its mode has been seen); `fixed_shapes`: every decode call runs every slot over
        the whole cache, so a row's numbers never depend on what runs beside it (the buckets change
        the matmul and reduction shapes, which moves logits by float rounding, ~1e-6: greedy output
        differs only at such near-ties), at the cost of decoding all slots at full length."""
        self.engine, self.tokenizer = engine, tokenizer
        self.slots = -(-slots // engine.dp) * engine.dp
        self.refill, self.chunk, self.min_capacity = refill, chunk, min_capacity
        self.max_group, self.open_queue = max_group or self.slots, open_queue
        self.precompile, self._precompiled, self.fixed_shapes = precompile, set(), fixed_shapes
        self.context = engine.model_cfg.max_seq_len
        self.vocab_limit = min(engine.model_cfg.vocab_size, tokenizer.vocab_size)
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: dict[int, _Row] = {}  # slot -> row
        self.finished: list[Result] = []
        self.state: DecodeState | None = None
        self.stats = {"run_s": 0.0, "new_tokens": 0, "prefills": 0, "decode_calls": 0}
        self.decode_shapes: collections.Counter = collections.Counter()  # (live, rows, cache length) -> calls

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a row; the caller has checked that prompt + budget fit the context."""
        assert 0 < len(request.ids) and len(request.ids) + request.max_new_tokens <= self.context
        self.waiting.append(request)

    def cancel(self, tag: Any) -> list[Result]:
        """End every waiting or running row with this tag (a client that went away). Returns the
        results of the waiting ones (finish_reason cancelled); running ones end in the next `step`."""
        dropped = [r for r in self.waiting if r.tag is tag]
        self.waiting = collections.deque(r for r in self.waiting if r.tag is not tag)
        for row in self.rows.values():
            if row.request.tag is tag:
                row.cancelled = True
        return [Result(r, "", [], "cancelled") for r in dropped]

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.rows)

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Generate every request to the end; results in request order."""
        order = {id(r): i for i, r in enumerate(requests)}
        for r in requests:
            self.submit(r)
        done: list[Result] = []
        while self.busy:
            done += self.step()
        return sorted(done, key=lambda res: order[id(res.request)])

    # -- one round ----------------------------------------------------------------------------------

    def step(self) -> list[Result]:
        """Admit, decode one chunk, collect. Returns the rows that finished in this round."""
        t0, compile0 = time.perf_counter(), self.engine.compile_s
        for slot in [s for s, row in self.rows.items() if row.cancelled]:
            self._finish(slot, hit_eos=False)
        if self.waiting and (self.refill or not self.rows):
            self._admit()
        if self.rows:
            self._decode()
        self.stats["run_s"] += time.perf_counter() - t0 - (self.engine.compile_s - compile0)
        done, self.finished = self.finished, []
        return done

    def _mode(self, requests: Sequence[Request]) -> SamplingMode:
        """The union of what the rows need (each mode is its own compiled program)."""
        ngrams = {r.no_repeat_ngram for r in requests}
        if len(ngrams) > 1:
            raise ValueError(f"rows decoded together need one no_repeat_ngram; got {sorted(ngrams)}")
        sample = any(r.temperature > 0 for r in requests)
        tok = self.tokenizer
        return SamplingMode(
            sample=sample, top_k=sample and any(0 < r.top_k < self.vocab_limit for r in requests),
            top_p=sample and any(r.top_p < 1 for r in requests),
            min_p=sample and any(r.min_p > 0 for r in requests),
            repetition_penalty=any(r.repetition_penalty != 1 for r in requests), no_repeat_ngram=ngrams.pop(),
            eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_limit=self.vocab_limit)

    def _ensure_state(self, need: int) -> None:
        """A state whose capacity holds `need` slots per row (grown, or made anew when idle)."""
        capacity = min(bucket(max(need, self.min_capacity)), self.context)
        if self.state is None or (not self.rows and self.state.capacity != capacity):
            self.state = self.engine.empty(self.slots, capacity)
        elif self.state.capacity < capacity:
            self.state = self.engine.grow(self.state, capacity)

    def _admit(self) -> None:
        batch = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.free_slots))]
        if not batch:
            return
        running = [row.request for row in self.rows.values()]
        self._ensure_state(max(len(r.ids) + r.max_new_tokens for r in batch + running))
        free = [s for s in range(self.slots) if s not in self.rows]
        # prefills of a power of two rows each, padded to the bucket of their longest prompt (longest
        # first, so rows of similar length share one)
        batch.sort(key=lambda r: -len(r.ids))
        while batch:
            limit = min(len(free), self.max_group)
            n = pow2_at_least(len(batch))
            if n > limit:  # the group cannot be padded up to n rows: the largest power of two that fits
                n = 1 << (min(len(batch), limit).bit_length() - 1)
            part, batch = batch[:n], batch[n:]
            slots, free = free[:n], free[n:]
            self._admit_group(part, slots, min(bucket(len(part[0].ids)), self.state.capacity))

    def _admit_group(self, group: list[Request], slots: list[int], p_len: int) -> None:
        """Prefill `group` into `slots` (len(slots) >= len(group); spare slots are filled with copies of
        the first row that stay done)."""
        n, tok = len(slots), self.tokenizer
        fill = group + [group[0]] * (n - len(group))

        def column(name: str, dtype: type) -> np.ndarray:
            return np.array([getattr(r, name) for r in fill], dtype)

        tokens_np = np.full((n, p_len), tok.pad_id, np.int32)
        for i, r in enumerate(fill):
            tokens_np[i, :len(r.ids)] = r.ids
        lengths_n = np.array([len(r.ids) for r in fill], np.int32)
        key_ids_n3 = np.array([(r.seed & 0xFFFFFFFF, *r.key) for r in fill], np.uint32)
        sampling_n = SamplingParams(column("temperature", np.float32), column("top_p", np.float32),
                                    column("min_p", np.float32), column("top_k", np.int32),
                                    column("repetition_penalty", np.float32))
        limit_n = column("max_new_tokens", np.int32)
        self.state, emitted = self.engine.admit(
            self.state, tokens_np, lengths_n, np.array(slots, np.int32), np.arange(n) < len(group), key_ids_n3,
            sampling_n, limit_n, self._mode(group + [row.request for row in self.rows.values()]))
        self.stats["prefills"] += 1
        for slot, r in zip(slots, group):
            self.rows[slot] = _Row(r)
        self._read(slots, emitted)

    def _decode(self) -> None:
        rows = list(self.rows.values())
        if (self.open_queue or any(row.request.stop or row.request.on_text for row in rows)
                or (self.refill and self.waiting)):
            n_steps = self.chunk
        else:  # nothing to check or admit before the rows end: one call to the end
            n_steps = bucket(max(row.request.max_new_tokens - len(row.tokens) for row in rows), self.chunk)
        # only the running rows, padded with empty slots to a bucket of rows, over the cache slots
        # they can reach in this call
        m = self._rows_bucket(len(self.rows))
        every = m == self.slots
        if every:  # in slot order
            rows_m = list(range(self.slots))
        else:
            rows_m = (sorted(self.rows) + [s for s in range(self.slots) if s not in self.rows])[:m]
        reach = max(len(row.request.ids) + min(row.request.max_new_tokens, len(row.tokens) - 1 + n_steps)
                    for row in rows)
        length = self._length_bucket(reach, m)
        mode = self._mode([row.request for row in rows])
        if self.precompile:
            self._compile_all(n_steps, mode)
        stop_m = np.array([s not in self.rows for s in rows_m])
        self.state, emitted = self.engine.decode(self.state, None if every else np.array(rows_m),
                                                 stop_m, n_steps, length, mode)
        self.stats["decode_calls"] += 1
        self.decode_shapes[(len(self.rows), m, length)] += 1
        self._read(rows_m, emitted)

    def _read(self, slots: Sequence[int], emitted: Emitted) -> None:
        """Take what a call emitted for the rows in `slots` (its output rows, in order; empty slots are
        skipped) and finish the rows that are done: by the engine (EOS, budget) or by a stop string."""
        tokens_mk, n_new_m, done_m, eos_m = (fetch(x) for x in (emitted.tokens_mk, emitted.n_new_m,
                                                                 emitted.done_m, emitted.eos_m))
        for i, slot in enumerate(slots):
            if slot in self.rows:
                self._take(slot, [int(t) for t in tokens_mk[i, :n_new_m[i]]])
                if done_m[i] or self._stopped(self.rows[slot]) is not None:
                    self._finish(slot, bool(eos_m[i]))

    def _rows_bucket(self, n: int) -> int:
        """Rows decoded together for n running ones: a power of two, at most the slots; every slot
        when the state is split over data-parallel devices (see `engine.decode`) or shapes are fixed."""
        return self.slots if self.engine.dp > 1 or self.fixed_shapes else min(pow2_at_least(n), self.slots)

    def _length_bucket(self, reach: int, m: int) -> int:
        """Cache slots attended by m rows that reach `reach` slots (`decode_length`), at most the
        state's capacity (the capacity itself when shapes are fixed)."""
        if self.fixed_shapes:
            return self.state.capacity
        return min(decode_length(reach, fine=m >= FINE_ROWS), self.state.capacity)

    def _compile_all(self, n_steps: int, mode: SamplingMode) -> None:
        """Compile `decode` for every rows and length bucket of this state (once per mode), so that no
        later mix of requests compiles (the server)."""
        key = (n_steps, mode, self.state.capacity)
        if key in self._precompiled:
            return
        self._precompiled.add(key)
        ms = sorted({self._rows_bucket(n) for n in range(1, self.slots + 1)})
        for m in ms:
            for length in sorted({self._length_bucket(r, m) for r in range(1, self.state.capacity + 1)}):
                self.engine.compile_decode(self.state, m, n_steps, length, mode)

    def _take(self, slot: int, tokens: list[int]) -> None:
        row = self.rows[slot]
        row.tokens.extend(tokens)
        self.stats["new_tokens"] += len(tokens)
        self._stream(row)

    def _text(self, row: _Row) -> str:
        """The row's text so far (without a final EOS), decoding only the tokens added since the last
        call: the new tokens are decoded after a few tokens of context (what a decoder writes for a
        token can depend on the one before: SentencePiece's leading space, a character split over
        byte tokens) and the context's own text is cut off. Where that cannot be trusted (the text so
        far ends in a partial character, or the context decodes differently), everything is decoded."""
        n = len(row.tokens) - (1 if row.tokens and row.tokens[-1] == self.tokenizer.eos_id else 0)
        if n == row.n_text:
            return row.text
        new = None
        if 0 < row.n_text < n and not row.text.endswith("\ufffd"):
            start = max(row.n_text - _TEXT_CONTEXT, 0)
            head, both = (self.tokenizer.decode(row.tokens[start:end]) for end in (row.n_text, n))
            new = both[len(head):] if both.startswith(head) else None
        row.text = row.text + new if new is not None else self.tokenizer.decode(row.tokens[:n])
        row.n_text = n
        return row.text

    def _stopped(self, row: _Row) -> int | None:
        return find_stop(self._text(row), row.request.stop) if row.request.stop else None

    def _stream(self, row: _Row, final: bool = False) -> None:
        if row.request.on_text is None:
            return
        text = self._text(row)
        cut = self._stopped(row)
        end = cut if cut is not None else len(text) - (0 if final else held_back(text, row.request.stop))
        if end > row.sent:
            row.request.on_text(text[row.sent:end])
            row.sent = end

    def _finish(self, slot: int, hit_eos: bool) -> None:
        row = self.rows.pop(slot)
        self._stream(row, final=True)
        text, tokens, cut = self._text(row), list(row.tokens), self._stopped(row)
        if tokens and tokens[-1] == self.tokenizer.eos_id:
            tokens.pop()
        if cut is not None:
            result = Result(row.request, text[:cut], _tokens_covering(self.tokenizer, tokens, cut), "stop")
        elif row.cancelled:
            result = Result(row.request, text, tokens, "cancelled")
        else:
            result = Result(row.request, text, tokens, "eos" if hit_eos else "length")
        self.finished.append(result)
