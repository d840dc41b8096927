"""The cleaning and language steps of a prepare task.

`CleanFilter` runs today's cleaning, `clean.clean_records`, over the task's records: the same
decoding, normalization, filters and drop reasons (`empty`, `oversized`, `binary`, `non_utf8`,
`long_lines`, `low_alnum`, `generated`, and `duplicate` within the task; across tasks exact
duplicates are found with the MinHash signatures, see `neardup`). Each kept document is assigned
to train or validation as the in-process path does (`sources.split_of` of `corpus.split_key`).

`LanguageFilter` sets `metadata["language"]` (`languages.detect`) and drops documents outside
data.languages (reason `language_excluded`).
"""

from __future__ import annotations

import collections

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from codegen_jax.config import DataConfig
from codegen_jax.data import sources
from codegen_jax.data.clean import CleanStats, clean_records
from codegen_jax.data.corpus import split_key
from codegen_jax.data.prepare import languages
from codegen_jax.data.prepare.store import write_counts


class CleanFilter(PipelineStep):
    """Decode, normalize, filter and dedupe (within the task) with `clean.clean_records`."""

    type = "🔻 - FILTER"
    name = "🧹 clean"

    def __init__(self, data: dict, root: str):
        super().__init__()
        self.data, self.root = data, root

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        cfg = DataConfig(**self.data)
        stats = CleanStats()
        raw = (doc.metadata["raw"] for doc in data)
        for i, doc in enumerate(clean_records(raw, cfg, stats)):
            meta = {"path": doc.path, "source": doc.source, "split": sources.split_of(split_key(doc), cfg.val_fraction),
                    # a data file's language column (The Stack's "lang"); files are detected by name
                    "declared": doc.language if doc.source == "datasets" else None}
            if doc.prompt is not None:
                meta["prompt"] = doc.prompt
            self.stat_update("kept")
            yield Document(text=doc.text, id=f"{rank:05d}/{i}", metadata=meta)
        for reason, n in stats.dropped.items():
            self.stat_update(f"dropped_{reason}", value=n)
        write_counts(self.root, "clean", rank, {"seen": stats.seen, "kept": stats.kept, "bytes": stats.bytes_kept,
                                                "dropped": dict(stats.dropped), "examples": stats.examples})


class LanguageFilter(PipelineStep):
    """Annotate each document's language; keep only data.languages when it is set."""

    type = "🔻 - FILTER"
    name = "🌐 language"

    def __init__(self, keep: list[str], root: str):
        super().__init__()
        self.keep, self.root = frozenset(keep), root

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        dropped: collections.Counter = collections.Counter()
        examples: dict[str, list[str]] = {}
        for doc in data:
            meta = doc.metadata
            meta["language"] = languages.detect(meta["path"], doc.text, meta.pop("declared", None))
            if self.keep and meta["language"] not in self.keep:
                dropped["language_excluded"] += 1
                ex = examples.setdefault("language_excluded", [])
                if len(ex) < 3:
                    ex.append(meta["path"])
                self.stat_update("dropped_language_excluded")
                continue
            yield doc
        write_counts(self.root, "language", rank, {"dropped": dict(dropped), "examples": examples})
