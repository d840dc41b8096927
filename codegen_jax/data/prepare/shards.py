"""The tokenizer stage and the ArrayRecord shards.

`TrainTokenizer` (one task) puts the tokenizer every shard is encoded with into DIR/tokenizer: a
copy of data.tokenizer when it is set, else a byte-level BPE of model.vocab_size trained on the
final train documents (their first `tokenizer.TRAIN_SAMPLE_BYTES`, by task then document order:
what `train` does in-process, on the prepared corpus).

`WriteShards` (every task) mines pairs (`ts_pairs.mine_document`: Python docstrings, doc comments in
JS/TS/Java/Go/Rust; prompt/completion rows are pairs already), encodes documents and pairs as
`examples` does, drops pairs whose prompt would take more than half a row (`prompt_too_long`, as
the in-process path), and writes `DIR/<split>/<docs|pairs>-<rank>.arrayrecord` in document order
(`prepared.encode_record`). Train documents of a language with a data.language_weights weight are
written that many times (`languages.copies`), with their pairs. Per-language counts, per-shard
records, tokens and SHA-256 go to the task's counts file for the manifest.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import os
import shutil
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from codegen_jax.data import examples
from codegen_jax.data.prepare import languages
from codegen_jax.data.prepare.store import docs_file, iter_docs, write_counts
from codegen_jax.data.prepare.ts_pairs import mine_document
from codegen_jax.data.prepare.record import KINDS, SPLITS, encode_record
from codegen_jax.errors import UserError

TOKENIZER_DIR = "tokenizer"
ENCODE_BATCH = 256  # items per tokenizer call
_SHARD_OPTIONS = "group_size:1"  # one record per chunk: what grain's random access wants


def shard_name(split: str, kind: str, rank: int) -> str:
    return f"{split}/{kind}-{rank:05d}.arrayrecord"


def _key(doc) -> str:
    """What chooses a document's copies under a fractional weight, independent of the task layout: its
    path, or for data-file rows (whose row numbers are not stable) its content (as `corpus.split_key`)."""
    meta = doc.metadata
    if meta["source"] != "datasets":
        return meta["path"]
    return f"{meta['prompt']}\x00{doc.text}" if meta.get("prompt") is not None else doc.text


class TrainTokenizer(PipelineStep):
    """Save data.tokenizer, or a BPE trained on the final train documents, into DIR/tokenizer."""

    type = "🔢 - TOKENIZER"
    name = "🔢 tokenizer"

    def __init__(self, root: str, tasks: int, tokenizer: str, vocab_size: int):
        super().__init__()
        self.root, self.tasks, self.tokenizer, self.vocab_size = root, tasks, tokenizer, vocab_size

    def _texts(self):
        for rank in range(self.tasks):
            for doc in iter_docs(docs_file(self.root, "final", rank)):
                if doc.metadata["split"] == "train":
                    if doc.metadata.get("prompt"):
                        yield doc.metadata["prompt"]
                    yield doc.text

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        import itertools

        from codegen_jax.data.tokenizer import TRAIN_SAMPLE_BYTES, load_tokenizer, train_tokenizer

        if self.tokenizer:
            tok = load_tokenizer(self.tokenizer)
        else:
            total = [0]

            def sample():
                for text in self._texts():
                    total[0] += len(text)
                    yield text

            texts = list(itertools.takewhile(lambda _: total[0] < TRAIN_SAMPLE_BYTES, sample()))
            if not texts:
                raise UserError("no train documents are left after cleaning, dedup and decontamination (see the "
                                "stage counts in DIR/work/counts); check data.paths, data.extensions, data.languages")
            tok = train_tokenizer(texts, self.vocab_size)
        if tok.vocab_size > self.vocab_size:
            raise UserError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {self.vocab_size}; "
                            f"set model.vocab_size>={tok.vocab_size}")
        out = Path(self.root, TOKENIZER_DIR)
        tmp = out.with_name(f".{TOKENIZER_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        shutil.rmtree(out, ignore_errors=True)  # a copy from an interrupted run of this task
        os.replace(tmp, out)


class _Shard:
    """One ArrayRecord file, written under a temporary name and renamed when closed."""

    def __init__(self, root: str, split: str, kind: str, rank: int):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.name = shard_name(split, kind, rank)
        self.path = Path(root, self.name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.writer = ArrayRecordWriter(str(self.tmp), _SHARD_OPTIONS)
        self.kind, self.split, self.records, self.tokens = kind, split, 0, 0

    def write(self, record: bytes, n_tokens: int) -> None:
        self.writer.write(record)
        self.records += 1
        self.tokens += n_tokens

    def close(self) -> dict:
        self.writer.close()
        os.replace(self.tmp, self.path)
        sha = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return {"path": self.name, "split": self.split, "kind": self.kind, "records": self.records,
                "tokens": self.tokens, "sha256": sha}


class WriteShards(PipelineStep):
    """Mine pairs, tokenize, and write this task's train/validation docs/pairs shards."""

    type = "💽 - WRITER"
    name = "🗄 ArrayRecord shards"

    def __init__(self, root: str, seq_len: int, weights: dict[str, float]):
        super().__init__()
        self.root, self.seq_len, self.weights = root, seq_len, dict(weights)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        from codegen_jax.data.tokenizer import load_tokenizer

        tok = load_tokenizer(Path(self.root, TOKENIZER_DIR))
        shards = {(s, k): _Shard(self.root, s, k, rank) for s in SPLITS for k in KINDS}
        self.langs: dict = collections.defaultdict(collections.Counter)
        self.mining: collections.Counter = collections.Counter()
        batch: list = []
        for doc in data:
            batch.append(doc)
            if len(batch) >= ENCODE_BATCH:
                self._write(tok, batch, shards)
                batch = []
        self._write(tok, batch, shards)
        info = [shards[key].close() for key in sorted(shards)]
        write_counts(self.root, "shards", rank, {"shards": info, "languages": {k: dict(v) for k, v in self.langs.items()},
                                                 "pairs": dict(self.mining)})

    def _items(self, docs: list) -> tuple[list, list]:
        """Items to encode (a text, or an (instruction, code) pair) and, for each, (document index, shard
        kind, whether it is the document itself): every document, then the pairs mined from it."""
        items, owners = [], []
        was_enabled = gc.isenabled()
        gc.disable()  # as pairs.mine_corpus: ASTs are acyclic, and the cyclic GC would rescan them
        try:
            for i, doc in enumerate(docs):
                meta = doc.metadata
                if meta.get("prompt") is not None:  # a prompt/completion row is a pair already
                    items.append((meta["prompt"], doc.text))
                    owners.append((i, "pairs", True))
                    continue
                items.append(doc.text)
                owners.append((i, "docs", True))
                counts = collections.Counter()
                for pair in mine_document(doc.text, meta["path"], meta["language"], counts):
                    items.append((pair.instruction, pair.code))
                    owners.append((i, "pairs", False))
                self.mining.update({f"{meta['language']}/{k}": v for k, v in counts.items()})
        finally:
            if was_enabled:
                gc.enable()
        return items, owners

    def _write(self, tok, docs: list, shards: dict) -> None:
        """Encode one batch of documents (with their pairs) and write each record its number of times."""
        items, owners = self._items(docs)
        limit = examples.max_prompt_len(self.seq_len)
        for (i, kind, is_doc), (tokens, mask) in zip(owners, examples.encode_batch(tok, items), strict=True):
            meta = docs[i].metadata
            lang = self.langs[meta["language"]]
            if kind == "pairs" and int(mask.argmax()) > limit:  # a prompt/completion row is a document drop
                lang["prompt_too_long" if is_doc else "pair_prompt_too_long"] += 1
                continue
            lang["documents" if is_doc else "pairs"] += 1
            lang["tokens" if is_doc else "pair_tokens"] += len(tokens)
            weight = self.weights.get(meta["language"], 1.0) if meta["split"] == "train" else 1.0
            copies = 1 if weight == 1.0 else languages.copies(weight, _key(docs[i]))
            record = encode_record(tokens, mask)
            for _ in range(copies):
                shards[meta["split"], kind].write(record, len(tokens))
