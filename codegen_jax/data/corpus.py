"""The cleaned, split corpus of a `DataConfig`, read once per process and cached.

`load_corpus(cfg.data)` runs source -> clean -> train/validation split and keeps the result, so the
train and validation iterators (and the tokenizer trainer) share one read of the files. Instruction
pairs are mined lazily, per split, the first time they are asked for.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import threading
from collections.abc import Iterator

from codegen_jax import storage
from codegen_jax.config import DataConfig
from codegen_jax.data import sources
from codegen_jax.data.clean import CleanStats, Document, clean_records
from codegen_jax.data.pairs import Pair, mine_corpus
from codegen_jax.errors import UserError

SPLITS = ("train", "validation")


@dataclasses.dataclass
class Corpus:
    """Documents per split, the cleaning counts, and (lazily) the instruction pairs per split."""

    docs: dict[str, list[Document]]
    stats: CleanStats
    pair_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    _pairs: dict[str, list[Pair]] = dataclasses.field(default_factory=dict, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def split(self, name: str) -> list[Document]:
        if name not in SPLITS:
            raise UserError(f"unknown split '{name}'; use one of {', '.join(SPLITS)}")
        return self.docs[name]

    def plain(self, name: str) -> list[Document]:
        """Documents trained on in full (everything but prompt/completion and chat rows)."""
        return [d for d in self.split(name) if d.prompt is None and d.messages is None]

    def chats(self, name: str) -> list[Document]:
        """Chat rows (their `messages`), trained on with the loss on assistant turns only."""
        return [d for d in self.split(name) if d.messages is not None]

    def pairs(self, name: str) -> list[Pair]:
        """Prompt/completion rows plus pairs mined from the split's Python files (cached)."""
        with self._lock:
            if name not in self._pairs:
                docs = [d for d in self.split(name) if d.messages is None]
                given = [Pair(d.prompt, d.text, d.path) for d in docs if d.prompt is not None]
                counts = collections.Counter()
                self._pairs[name] = given + mine_corpus(docs, counts)
                self.pair_counts.update({f"{name}/{k}": v for k, v in counts.items()})
            return self._pairs[name]

    def sample_texts(self, max_bytes: int) -> Iterator[str]:
        """Train-split texts (prompts included) until about `max_bytes`, for tokenizer training."""
        total = 0
        for d in self.docs["train"]:
            for text in (d.prompt, d.text, *(t for _, t in d.messages or ())):
                if text:
                    total += len(text)
                    yield text
            if total >= max_bytes:
                return


def _key_hash(key: str, salt: str = "") -> int:
    digest = hashlib.blake2b((salt + key).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def split_key(doc: Document) -> str:
    """Files split by path; data-file rows by content (their row numbers are not stable)."""
    if doc.source != "datasets":
        return doc.path
    if doc.messages is not None:
        return "\x00".join(text for _, text in doc.messages)
    return f"{doc.prompt}\x00{doc.text}" if doc.prompt is not None else doc.text


def _read(cfg: DataConfig, skipped: dict[str, list[str]]) -> Iterator[sources.RawRecord]:
    if cfg.source == "stdlib":
        return sources.read_stdlib(skipped)
    if cfg.source == "files":
        return sources.read_files(cfg.paths, sources.resolve_extensions(cfg.extensions), skipped)
    if cfg.source == "datasets":
        fields = sources.Fields(cfg.text_field, cfg.prompt_field, cfg.completion_field, cfg.messages_field)
        return sources.read_datasets(cfg.paths, fields, skipped)
    raise UserError(f"data.source must be stdlib, files or datasets; got {cfg.source!r}")


def _split(docs: list[Document], val_fraction: float) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[sources.split_of(split_key(d), val_fraction)].append(d)
    if val_fraction > 0 and not out["validation"] and len(out["train"]) >= 2:
        # A tiny corpus can miss the validation share entirely: move one document, chosen by hash.
        pick = min(range(len(out["train"])), key=lambda i: _key_hash(split_key(out["train"][i])))
        out["validation"].append(out["train"].pop(pick))
    return out


def _build(cfg: DataConfig) -> Corpus:
    skipped: dict[str, list[str]] = {}
    stats = CleanStats()
    docs = list(clean_records(_read(cfg, skipped), cfg, stats))
    stats.add_skipped(skipped)
    if cfg.max_docs > 0 and len(docs) > cfg.max_docs:
        # A hash-chosen subset, in reading order: spread over the whole corpus, not its first files.
        order = sorted(range(len(docs)), key=lambda i: _key_hash(split_key(docs[i]), "max_docs"))
        keep = set(order[:cfg.max_docs])
        docs = [d for i, d in enumerate(docs) if i in keep]
    if stats.seen == 0:
        where = "the Python standard library" if cfg.source == "stdlib" else ", ".join(cfg.paths)
        what = "rows" if cfg.source == "datasets" else f"files with extensions {', '.join(cfg.extensions)}"
        raise UserError(f"no {what} found under {where}; check data.paths and data.extensions")
    if not docs:
        raise UserError(f"no documents left after cleaning (data.source={cfg.source}): {stats.summary()}; "
                        "check data.paths/data.extensions or loosen data.max_file_bytes, "
                        "data.max_line_length, data.min_alnum_fraction")
    return Corpus(_split(docs, cfg.val_fraction), stats)


def _cache_key(cfg: DataConfig) -> tuple:
    return (cfg.source, tuple(cfg.paths), tuple(cfg.extensions), cfg.text_field, cfg.prompt_field,
            cfg.completion_field, cfg.messages_field, cfg.val_fraction, cfg.max_file_bytes, cfg.max_line_length,
            cfg.min_alnum_fraction, cfg.max_docs, tuple(cfg.exclude))


@functools.lru_cache(maxsize=4)
def _cached(key: tuple) -> Corpus:
    fields = dict(zip(_KEY_FIELDS, key))
    return _build(DataConfig(**{**fields, "paths": list(fields["paths"]), "extensions": list(fields["extensions"]),
                                "exclude": list(fields["exclude"])}))


_KEY_FIELDS = ("source", "paths", "extensions", "text_field", "prompt_field", "completion_field", "messages_field",
               "val_fraction", "max_file_bytes", "max_line_length", "min_alnum_fraction", "max_docs", "exclude")


def load_corpus(cfg: DataConfig) -> Corpus:
    """The cleaned, split corpus of `cfg` (read once per process for equal settings)."""
    return _cached(_cache_key(cfg))


def texts_from_paths(paths: list[str]) -> Iterator[str]:
    """Cleaned texts of source trees (any known language) and data files, for `tokenizer train`."""
    cfg = DataConfig()
    code_exts = tuple(sorted({e for exts in sources.LANGUAGES.values() for e in exts}))
    stats = CleanStats()
    skipped: dict[str, list[str]] = {}
    fields = sources.Fields()
    for raw in paths:
        p = storage.local_copy(raw)
        if not p.exists():
            raise UserError(f"--data path not found: {p}")
        if sources.is_saved_dataset(p) or p.suffix in sources.DATA_FILE_EXTS:
            records = sources.read_datasets([str(p)], fields, skipped)
        elif p.is_dir():
            records = sources.read_tree(p, code_exts, skipped=skipped)
        else:
            records = sources.read_files([str(p)], code_exts, skipped)
        for doc in clean_records(records, cfg, stats):
            if doc.prompt:
                yield doc.prompt
            yield doc.text
    if stats.kept == 0:
        stats.add_skipped(skipped)
        raise UserError(f"no usable text under {', '.join(paths)}: {stats.summary()}")
