"""Intermediate files of a prepare run, under DIR/work: documents between stages and per-task counts.

Documents: `work/<stage>/<rank>.jsonl.gz`, one JSON object per line (`id`, `text`, `meta`), in the
task's reading order, so a line number is a document index (what the MinHash files refer to). Every
task writes its file, empty or not, and renames it into place when complete (no partial file is
ever read). Counts: `work/counts/<step>/<rank>.json`, written by each step after its last document;
the manifest sums them. Gzip headers carry no timestamp: equal inputs give equal bytes.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

WORK = "work"


def work_path(root: str, *parts: str) -> Path:
    return Path(root, WORK, *parts)


def replace_atomically(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as sorted JSON via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    replace_atomically(tmp, path)


def write_counts(root: str, step: str, rank: int, counts: dict[str, Any]) -> None:
    write_json(work_path(root, "counts", step, f"{rank:05d}.json"), counts)


def read_counts(root: str, step: str) -> list[dict[str, Any]]:
    """Every task's counts of `step`, by rank."""
    folder = work_path(root, "counts", step)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [json.loads(f.read_text()) for f in files]


def docs_file(root: str, stage: str, rank: int) -> Path:
    return work_path(root, stage, f"{rank:05d}.jsonl.gz")


def iter_docs(path: Path) -> Iterator[Document]:
    """The documents of one file written by `DocWriter`, in order (none if it does not exist)."""
    if not path.is_file():
        return
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield Document(text=row["text"], id=row["id"], metadata=row["meta"])


class DocWriter(PipelineStep):
    """Write every document of the task to `work/<stage>/<rank>.jsonl.gz` and pass it on."""

    type = "💽 - WRITER"
    name = "📝 documents"

    def __init__(self, root: str, stage: str):
        super().__init__()
        self.root, self.stage = root, stage

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        final = docs_file(self.root, self.stage, rank)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=1) as f:
            for doc in data or ():
                row = {"id": doc.id, "text": doc.text, "meta": doc.metadata}
                f.write(json.dumps(row).encode() + b"\n")  # ASCII escapes: any str round-trips
                self.stat_update("documents")
                yield doc
        replace_atomically(tmp, final)


class DocReader(PipelineStep):
    """The documents another stage's task of the same rank wrote (`DocWriter`), in order."""

    type = "📖 - READER"
    name = "📖 documents"

    def __init__(self, root: str, stage: str):
        super().__init__()
        self.root, self.stage = root, stage

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in iter_docs(docs_file(self.root, self.stage, rank)):
            self.stat_update("documents")
            yield doc
