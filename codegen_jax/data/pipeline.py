"""The grain input pipeline, corpus to process-local packed batches.

    documents + pairs (MapDataset, mixed by data.pair_ratio, shuffled per epoch by data.shuffle_seed)
      -> repeat(num_epochs) -> FIM (train split: data.fim_rate of documents) -> tokenize (batched; worker threads, or processes with data.num_workers)
      -> split into <= seq_len pieces -> first-fit / best-fit packing (grain.experimental)
      -> batch(global batch) -> this process's rows -> background-thread prefetch

Every process builds the same global stream and keeps its own contiguous block of rows, so the
global batch does not depend on the number of processes (1 or N processes train on identical data)
and every process yields the same number of batches. Batches are dicts of int32 numpy arrays
`[local_batch, seq_len]`: `tokens`, `segment_ids` (1-based per row, 0 = padding), `positions`
(restarting at 0 in each segment) and `loss_mask` (1 where the token is a training target). A
finite iterator (num_epochs set) pads its last partial batch with all-padding rows (segment 0,
loss_mask 0) instead of dropping data. Iterators support `get_state()` / `set_state()`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import grain
import numpy as np
from grain.experimental import (BestFitPackIterDataset, FirstFitPackIterDataset, FlatMapIterDataset,
                                ThreadPrefetchIterDataset)

from codegen_jax.config import Config
from codegen_jax.data import examples
from codegen_jax.data.corpus import Corpus, load_corpus
from codegen_jax.data.tokenizer import CodeTokenizer
from codegen_jax.errors import UserError

TOKENIZE_BATCH = 32  # examples per tokenizer call
PREFETCH_BATCHES = 2  # finished batches kept ready by a background thread
PACK_TOKENS = 1 << 19  # tokens per packing group: more bins, less padding, slower first batch
BYTES_PER_TOKEN = 2.5  # a low guess for code: sizes packing groups before anything is tokenized
BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class ExampleSet:
    """One split's items: document texts and (instruction, code) pairs, with pairs skipped."""

    docs: list[str]
    pairs: list[tuple[str, str]]
    skipped: collections.Counter


_EXAMPLE_CACHE: dict[tuple, tuple[ExampleSet, tuple]] = {}
_EXAMPLE_LOCK = threading.Lock()


def example_set(corpus: Corpus, tok: CodeTokenizer, split: str, seq_len: int, pair_ratio: float) -> ExampleSet:
    """The split's items; pairs whose prompt would not leave half a row to the code are skipped.

    Pairs are gathered when `pair_ratio > 0`, or when the split has nothing else (prompt/completion
    data). Chat rows count as pairs (instruction data; `examples.Chat`, always gathered). Cached per
    (corpus, tokenizer, split, seq_len).
    """
    key = (id(corpus), id(tok), split, seq_len, pair_ratio > 0)
    with _EXAMPLE_LOCK:
        if key not in _EXAMPLE_CACHE:
            docs = [d.text for d in corpus.plain(split)]
            pairs, skipped = [], collections.Counter()
            if pair_ratio > 0 or not docs:
                pairs, skipped = _fitting_pairs(corpus, tok, split, seq_len)
            chats = [examples.Chat(d.messages) for d in corpus.chats(split)]
            if chats and docs and pair_ratio <= 0:  # the epoch plan would mix in none of them
                raise UserError(f"data.pair_ratio=0 trains on no instruction data, so the {len(chats)} chat rows "
                                f"of the {split} split would be dropped; set data.pair_ratio above 0")
            pairs += chats
            if len(_EXAMPLE_CACHE) >= 8:
                _EXAMPLE_CACHE.clear()
            # The key holds ids: the entry keeps its objects alive so that an id is never reused.
            _EXAMPLE_CACHE[key] = (ExampleSet(docs, pairs, skipped), (corpus, tok))
        return _EXAMPLE_CACHE[key][0]


def _fitting_pairs(corpus: Corpus, tok: CodeTokenizer, split: str, seq_len: int):
    limit = examples.max_prompt_len(seq_len)
    pairs = corpus.pairs(split)
    # A token covers at least one byte, so only instructions longer than the limit in bytes need encoding.
    long = [i for i, p in enumerate(pairs) if len(p.instruction.encode("utf-8", "replace")) + 4 > limit]
    lengths = dict(zip(long, map(len, tok.encode_batch([pairs[i].instruction for i in long]))))
    extra = len(examples.wrap_prompt(tok, []))
    keep = [(p.instruction, p.code) for i, p in enumerate(pairs) if lengths.get(i, 0) + extra <= limit]
    return keep, collections.Counter(prompt_too_long=len(pairs) - len(keep))


class _EpochSelection(grain.transforms.DatasetSelectionMap):
    """Exact interleave: each epoch is all `n_docs` documents plus `n_pairs` pairs, evenly spread.

    Keys keep counting across epochs, so the shuffled parents reshuffle every epoch.
    """

    def __init__(self, n_docs: int, n_pairs: int):
        self._n_docs, self._n_pairs, self._len = n_docs, n_pairs, n_docs + n_pairs

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[int, int]:
        epoch, j = divmod(index, self._len)
        pairs_before = j * self._n_pairs // self._len
        if (j + 1) * self._n_pairs // self._len > pairs_before:
            return 1, epoch * self._n_pairs + pairs_before
        return 0, epoch * self._n_docs + j - pairs_before


def epoch_plan(items: ExampleSet, pair_ratio: float) -> tuple[int, int]:
    """(documents, pairs) per epoch: all documents once, plus pairs making up `pair_ratio` of it.

    With no documents an epoch is all pairs once; `pair_ratio >= 1` means pairs only.
    """
    n_docs, n_pairs = len(items.docs), len(items.pairs)
    if pair_ratio >= 1 or not n_docs:
        if not n_pairs:
            raise UserError(
                "no instruction pair fits data.seq_len (skipped: "
                f"{dict(items.skipped) or 'none'}) and there are no plain documents to use instead; "
                "raise data.seq_len, lower data.pair_ratio, or add data")
        return 0, n_pairs
    if not n_pairs or pair_ratio <= 0:
        return n_docs, 0
    return n_docs, max(1, round(n_docs * pair_ratio / (1 - pair_ratio)))


def packing_bins(items: ExampleSet, pair_ratio: float, seq_len: int, global_batch: int) -> int:
    """Rows per packing group: PACK_TOKENS worth, but at most about a quarter of an epoch.

    The packer only emits when a piece fits in no row, so a group much larger than an epoch would
    pack several epochs together and delay the first batch.
    """
    n_docs, n_pairs = epoch_plan(items, pair_ratio)
    epoch_bytes = sum(map(len, items.docs)) if n_docs else 0
    if n_pairs:
        sample = items.pairs[:1000]
        epoch_bytes += n_pairs * sum(map(_item_bytes, sample)) / len(sample)
    tokens = min(PACK_TOKENS, epoch_bytes / BYTES_PER_TOKEN / 4)
    return max(global_batch, int(tokens // seq_len))


def _item_bytes(item) -> int:
    """Characters of an instruction item: a pair's two texts or a chat's turns."""
    if isinstance(item, examples.Chat):
        return sum(len(text) for _, text in item.turns)
    return sum(map(len, item))


def mixed_items(items: ExampleSet, pair_ratio: float, seed: int) -> grain.MapDataset:
    """One epoch of items (see `epoch_plan`), shuffled; every epoch reshuffles."""
    n_docs, n_pairs = epoch_plan(items, pair_ratio)
    docs = grain.MapDataset.source(items.docs).shuffle(seed) if n_docs else None
    pairs = grain.MapDataset.source(items.pairs).shuffle((seed + 1) % 2**32) if n_pairs else None
    if not n_pairs:
        return docs
    if not n_docs:
        return pairs
    # Pairs keep cycling through their own reshuffled epochs while the documents go round once.
    return grain.MapDataset.select_from_datasets([docs, pairs.repeat()], _EpochSelection(n_docs, n_pairs))


class _Fim(grain.transforms.RandomMap):
    """A document becomes a FIM document with probability `rate` (pairs are left alone); the random
    draws come from grain's per-element generator (seeded by data.shuffle_seed and the element's
    index), so a resumed run cuts every document where the uninterrupted one did."""

    def __init__(self, rate: float, spm_rate: float):
        self._rate, self._spm_rate = rate, spm_rate

    def random_map(self, item, rng: np.random.Generator):
        if isinstance(item, str) and rng.random() < self._rate:
            return examples.fim_split(item, rng, self._spm_rate)
        return item


class _Encode(grain.transforms.Map):
    """A list of items -> a list of (tokens, loss_mask) examples (one batched tokenizer call)."""

    def __init__(self, tok: CodeTokenizer):
        self._tok = tok

    def map(self, items):
        return examples.encode_batch(self._tok, list(items))


class _SplitRows(grain.experimental.FlatMapTransform):
    """A list of examples -> their pieces of at most seq_len tokens, in order."""

    max_fan_out = 1 << 20

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, batch):
        return [piece for ex in batch for piece in examples.split_rows(ex, self._seq_len)]


class _Rename(grain.transforms.Map):
    """Packed row -> the batch keys, int32."""

    def map(self, row):
        return {"tokens": row["tokens"].astype(np.int32, copy=False), "segment_ids": row["tokens_segment_ids"],
                "positions": row["tokens_positions"], "loss_mask": row["loss_mask"].astype(np.int32, copy=False)}


class _PadAndSlice(grain.transforms.Map):
    """Pad a short final batch with all-padding rows, then keep this process's block of rows."""

    def __init__(self, global_batch: int, start: int, stop: int, pad_id: int):
        self._global, self._start, self._stop, self._pad = global_batch, start, stop, pad_id

    def map(self, batch):
        out = {}
        for k in BATCH_KEYS:
            x = batch[k]
            if x.shape[0] < self._global:
                fill = self._pad if k == "tokens" else 0
                pad = np.full((self._global - x.shape[0], x.shape[1]), fill, np.int32)
                x = np.concatenate([x, pad])
            out[k] = np.ascontiguousarray(x[self._start:self._stop])
        return out


def pack_rows(pieces: grain.IterDataset, seq_len: int, *, num_bins: int, pad_id: int, seed: int,
              method: str = "first_fit") -> grain.IterDataset:
    """Pack pieces ({tokens, loss_mask}, each <= seq_len) into rows with the batch keys.

    grain's packer fills `num_bins` rows online (first-fit or best-fit), emits them all when a piece
    fits nowhere, and shuffles the emitted rows with `seed`. Padding: tokens=pad_id, the rest 0.
    """
    packer = BestFitPackIterDataset if method == "best_fit" else FirstFitPackIterDataset
    packed = packer(
        pieces, length_struct={"tokens": seq_len, "loss_mask": seq_len}, num_packing_bins=num_bins,
        seed=seed, shuffle_bins=True, padding_struct={"tokens": pad_id, "loss_mask": 0},
        meta_features=("loss_mask",))  # packed alongside tokens, without its own segment ids
    return packed.map(_Rename())


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def fim_active(cfg: Config, tokenizer: CodeTokenizer, split: str) -> bool:
    """FIM rewrites training documents only (the held-out loss stays left-to-right), and only with a
    tokenizer that has FIM tokens (an imported one may not: then documents stay as they are)."""
    return split == "train" and cfg.data.fim_rate > 0 and tokenizer.fim is not None


def held_out_config(cfg: Config) -> Config:
    """The config whose validation stream the held-out loss is measured on: its documents alone when
    it has documents and no chat rows, so bits/byte measures held-out files whatever data.pair_ratio
    mixes into training (a pair's code, a single function, is easier to predict than a whole file);
    otherwise as given."""
    if cfg.data.source == "prepared" or cfg.data.pair_ratio <= 0:
        return cfg
    corpus = load_corpus(cfg.data)
    if not corpus.plain("validation") or corpus.chats("validation"):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pair_ratio=0.0))


def make_dataset(cfg: Config, tokenizer: CodeTokenizer, *, split: str = "train", process_index: int = 0,
                 process_count: int = 1, batch_size: int | None = None,
                 num_epochs: int | None = None) -> grain.IterDataset:
    """The IterDataset behind `make_iterator` (same arguments)."""
    if cfg.data.source == "prepared":  # ArrayRecord shards written by `codegen-jax data prepare`
        from codegen_jax.data import prepared

        return prepared.make_dataset(cfg, tokenizer, split=split, process_index=process_index,
                                     process_count=process_count, batch_size=batch_size, num_epochs=num_epochs)
    global_batch = batch_size or cfg.train.batch_size
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    if global_batch % process_count:
        raise UserError(f"batch size {global_batch} is not divisible by the {process_count} JAX processes")
    seed = cfg.data.shuffle_seed % 2**32
    items = example_set(load_corpus(cfg.data), tokenizer, split, cfg.data.seq_len, cfg.data.pair_ratio)
    ds = mixed_items(items, cfg.data.pair_ratio, seed).repeat(num_epochs)
    if fim_active(cfg, tokenizer, split):
        ds = ds.random_map(_Fim(cfg.data.fim_rate, cfg.data.fim_spm_rate), seed=(seed + 3) % 2**32)
    ds = ds.batch(TOKENIZE_BATCH, batch_fn=list).map(_Encode(tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if cfg.data.num_workers > 0:
        _absl_flags_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers))
    it = FlatMapIterDataset(it, _SplitRows(cfg.data.seq_len))
    bins = packing_bins(items, cfg.data.pair_ratio, cfg.data.seq_len, global_batch)
    it = pack_rows(it, cfg.data.seq_len, num_bins=bins,
                   pad_id=tokenizer.pad_id, seed=(seed + 2) % 2**32, method=cfg.data.pack)
    local = global_batch // process_count
    it = it.batch(global_batch, drop_remainder=False)
    it = it.map(_PadAndSlice(global_batch, process_index * local, (process_index + 1) * local, tokenizer.pad_id))
    # Packing runs in bursts (a whole group of rows at once): a background thread hides them from the
    # train step. Its state is the state after the last batch handed out, so checkpoints stay exact.
    return ThreadPrefetchIterDataset(it, prefetch_buffer_size=PREFETCH_BATCHES)


def make_iterator(cfg: Config, tokenizer: CodeTokenizer, *, split: str = "train", process_index: int = 0,
                  process_count: int = 1, batch_size: int | None = None,
                  num_epochs: int | None = None) -> grain.DatasetIterator:
    """Iterator of this process's packed batches (see the module docstring for the format).

    `batch_size` is global (default cfg.train.batch_size); `num_epochs=None` repeats forever.
    """
    return make_dataset(cfg, tokenizer, split=split, process_index=process_index,
                        process_count=process_count, batch_size=batch_size, num_epochs=num_epochs).__iter__()
