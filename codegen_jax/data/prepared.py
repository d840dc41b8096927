"""Training on prepared data: the ArrayRecord shards and manifest that `codegen-jax data prepare` writes.

A prepared directory DIR holds:

    DIR/manifest.json                                   counts, settings, tokenizer, shard hashes
    DIR/tokenizer/                                      the tokenizer every shard was encoded with
    DIR/{train,validation}/{docs,pairs}-NNNNN.arrayrecord

A record is one example in `examples`' format (documents `bos ... eos`; pairs `bos inst prompt sep
code eos`), stored as little-endian int32 `[n_masked, tok_0, ..., tok_n-1]` (`prepare/record.py`):
its loss_mask is 0 on the first n_masked tokens (a document's bos; a pair's whole prompt) and 1 after.

`make_dataset` (what `pipeline.make_dataset` returns for data.source=prepared):
- train: docs and pairs `ArrayRecordDataSource`s -> this process's rows (i, i+P, i+2P, ...: each
  process reads only its own rows) -> each epoch all documents plus pairs making up data.pair_ratio
  (pipeline.mixed_items), reshuffled every epoch from data.shuffle_seed -> repeat -> decode -> split
  into <= seq_len pieces -> packing (pipeline.pack_rows) -> batches of global_batch / P rows. The P
  local batches of a step together form the global batch; the iterator state is per process, so a
  checkpoint resumes only with the same process count.
- validation: every process reads all rows in the same order and keeps its block of each global
  batch (the in-process path's contract), so evaluation is the same for any process count.

The run must use the manifest's tokenizer (data.tokenizer defaults to DIR/tokenizer) and a data.seq_len
at least the one the data was prepared for (pairs were filtered for it). data.fim_rate applies as in
the in-process path, but cutting documents at token positions (the shards hold token ids). DIR may
be a gs:// URL: it is copied locally once per process (`storage.local_copy`).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import grain
from grain.experimental import FlatMapIterDataset, ThreadPrefetchIterDataset

from codegen_jax import storage
from codegen_jax.config import Config
from codegen_jax.data import examples, pipeline
from codegen_jax.data.prepare.record import (FORMAT, FORMAT_VERSION, KINDS, MANIFEST, SPLITS, decode_record,
                                            tokenizer_fingerprint)
from codegen_jax.data.tokenizer import CodeTokenizer
from codegen_jax.errors import UserError

PREPARE_HINT = "pip install 'codegen-jax[prepare]'"


def read_manifest(path: str) -> tuple[Path, dict[str, Any]]:
    """(local directory, manifest) of a prepared directory or URL; a directory without one fails."""
    local = storage.local_copy(path)
    file = local / MANIFEST
    if not local.is_dir():
        raise UserError(f"prepared data directory not found: {path}")
    if not file.is_file():
        raise UserError(f"{path} has no {MANIFEST}: not a finished prepared directory; make one with "
                        "`codegen-jax data prepare --config C --out DIR` (or let it finish)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file} cannot be read: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{file} is not a version {FORMAT_VERSION} {FORMAT} manifest; prepare the data again")
    return local, manifest


def check_compatible(cfg: Config, tok: CodeTokenizer, path: str, manifest: dict[str, Any]) -> None:
    """The run's tokenizer and sequence length must fit the prepared data."""
    want, have = manifest["tokenizer"]["fingerprint"], tokenizer_fingerprint(tok)
    if want != have:
        raise UserError(f"{path} was prepared with another tokenizer (fingerprint {want[:12]}, this run's "
                        f"{have[:12]}); train with data.tokenizer={path.rstrip('/')}/tokenizer (the default "
                        "for data.source=prepared) or prepare the data again with this tokenizer")
    if cfg.data.seq_len < manifest["seq_len"]:
        raise UserError(f"data.seq_len={cfg.data.seq_len} is shorter than the data.seq_len={manifest['seq_len']} "
                        f"{path} was prepared for (its pairs were filtered for it); set data.seq_len>="
                        f"{manifest['seq_len']} or prepare again with data.seq_len={cfg.data.seq_len}")


def _shards(cfg: Config, tok: CodeTokenizer, split: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Shard paths per kind for `split` over every data.paths entry, and the records and tokens they hold."""
    paths: dict[str, list[str]] = {k: [] for k in KINDS}
    totals: collections.Counter = collections.Counter()
    for entry in cfg.data.paths:
        local, manifest = read_manifest(entry)
        check_compatible(cfg, tok, entry, manifest)
        for shard in manifest["splits"][split]["shards"]:
            if shard["records"]:
                paths[shard["kind"]].append(str(local / shard["path"]))
                totals[f"{shard['kind']}_records"] += shard["records"]
                totals[f"{shard['kind']}_tokens"] += shard["tokens"]
    return paths, totals


def _source(paths: list[str]):
    if not paths:
        return []
    try:
        return grain.sources.ArrayRecordDataSource(paths)
    except ImportError:
        raise UserError(f"reading prepared data needs the array-record package; {PREPARE_HINT}") from None


class _Decode(grain.transforms.Map):
    def map(self, record):
        return decode_record(record)


class _TokenFim(grain.transforms.RandomMap):
    """A document (loss mask 0 on its bos only; pairs mask their prompt) becomes a FIM document with
    probability `rate`, cut at token positions (`examples.fim_tokens`); draws as `pipeline._Fim`'s."""

    def __init__(self, tok: CodeTokenizer, rate: float, spm_rate: float):
        self._tok, self._rate, self._spm_rate = tok, rate, spm_rate

    def random_map(self, example, rng):
        tokens, mask = example
        if len(tokens) > 2 and mask[1:].all() and rng.random() < self._rate:
            return examples.fim_tokens(self._tok, example, rng, self._spm_rate)
        return example


class _Split(grain.experimental.FlatMapTransform):
    """One example -> its pieces of at most seq_len tokens, in order."""

    max_fan_out = 1 << 20

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, example):
        return examples.split_rows(example, self._seq_len)


def _bins(n_docs: int, n_pairs: int, totals: dict[str, int], seq_len: int, batch: int) -> int:
    """Rows per packing group, as `pipeline.packing_bins` sizes them but from the manifest's token counts."""
    per = {k: totals[f"{k}_tokens"] / max(totals[f"{k}_records"], 1) for k in KINDS}
    epoch_tokens = n_docs * per["docs"] + n_pairs * per["pairs"]
    return max(batch, int(min(pipeline.PACK_TOKENS, epoch_tokens / 4) // seq_len))


def make_dataset(cfg: Config, tokenizer: CodeTokenizer, *, split: str = "train", process_index: int = 0,
                 process_count: int = 1, batch_size: int | None = None,
                 num_epochs: int | None = None) -> grain.IterDataset:
    """This process's packed batches of prepared data (see the module docstring); the arguments and
    batch format are `pipeline.make_dataset`'s."""
    global_batch = batch_size or cfg.train.batch_size
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
    if global_batch % process_count:
        raise UserError(f"batch size {global_batch} is not divisible by the {process_count} JAX processes")
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    paths, totals = _shards(cfg, tokenizer, split)
    per_process = split == "train"  # validation: the global stream in every process, sliced below
    step, first = (process_count, process_index) if per_process else (1, 0)
    rows = {k: grain.MapDataset.source(_source(paths[k]))[first::step] for k in KINDS}
    if not len(rows["docs"]) and not len(rows["pairs"]):
        if per_process and (totals["docs_records"] or totals["pairs_records"]):
            raise UserError(f"the prepared train split has fewer records than the {process_count} processes")
        return grain.MapDataset.source([]).to_iter_dataset()
    items = pipeline.ExampleSet(rows["docs"], rows["pairs"], collections.Counter())
    seed = cfg.data.shuffle_seed % 2**32
    n_docs, n_pairs = pipeline.epoch_plan(items, cfg.data.pair_ratio)
    ds = pipeline.mixed_items(items, cfg.data.pair_ratio, seed).repeat(num_epochs).map(_Decode())
    if pipeline.fim_active(cfg, tokenizer, split):
        ds = ds.random_map(_TokenFim(tokenizer, cfg.data.fim_rate, cfg.data.fim_spm_rate), seed=(seed + 3) % 2**32)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
    it = FlatMapIterDataset(it, _Split(cfg.data.seq_len))
    rows_out = global_batch // process_count if per_process else global_batch
    bins = _bins(n_docs, n_pairs, totals, cfg.data.seq_len, rows_out)
    it = pipeline.pack_rows(it, cfg.data.seq_len, num_bins=bins, pad_id=tokenizer.pad_id,
                            seed=(seed + 2) % 2**32, method=cfg.data.pack)
    it = it.batch(rows_out, drop_remainder=False)
    local = global_batch // process_count
    start, stop = (0, local) if per_process else (process_index * local, (process_index + 1) * local)
    it = it.map(pipeline._PadAndSlice(rows_out, start, stop, tokenizer.pad_id))
    return ThreadPrefetchIterDataset(it, prefetch_buffer_size=pipeline.PREFETCH_BATCHES)
