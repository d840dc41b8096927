"""Reading the configured sources in N tasks: each task reads only its share of the inputs.

The inputs are listed in a fixed order (sorted walks, as `sources.read_tree`) and task r takes
inputs r, r+N, r+2N, ...: files for data.source=stdlib/files; data files for data.source=datasets
(or, with fewer files than tasks, a contiguous block of every file's rows). Records are
`sources.RawRecord`s, carried to the cleaning step in `metadata["raw"]`; reader skips
(`unreadable`, `missing_field`) are counted as drops there.

With language names or `all` in data.extensions (see `languages.selected_extensions`), exact file
names (`Makefile`) are read too, and extension-less files whose `#!` line names a selected
language's interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from codegen_jax.config import DataConfig
from codegen_jax.data import sources
from codegen_jax.data.prepare import languages
from codegen_jax.data.prepare.store import write_counts

SHEBANG_BYTES = 256  # read to sniff the language of an extension-less file


def walk(root: Path, exts: tuple[str, ...], names: tuple[str, ...],
         shebang: bool) -> Iterator[tuple[str, Path, bool]]:
    """(path relative to root, file, whether its #! line decides) of the files selected under root,
    in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in sources._SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(exts) or name in names:
                yield Path(dirpath, name).relative_to(root).as_posix(), Path(dirpath, name), False
            elif shebang and "." not in name:
                yield Path(dirpath, name).relative_to(root).as_posix(), Path(dirpath, name), True


def list_files(cfg: DataConfig) -> list[tuple[str, Path, str, bool]]:
    """(record path, file, source, sniff the #! line) of every input file of data.source stdlib/files,
    in order. A file named in data.paths is read whatever its name."""
    if cfg.source == "stdlib":
        return [(rel, f, "stdlib", sniff) for rel, f, sniff in walk(sources.stdlib_root(), (".py",), (), False)]
    exts, names, shebang = languages.selected_extensions(cfg.extensions)
    out = []
    for p in sources._existing(cfg.paths, "data.paths"):
        if p.is_dir():
            out += [(f"{p.name}/{rel}", f, "files", sniff) for rel, f, sniff in walk(p, exts, names, shebang)]
        else:
            out.append((p.name, p, "files", False))
    return out


def _shebang_selected(cfg: DataConfig, content: bytes) -> bool:
    """Whether the #! line of an extension-less file names a language data.extensions selects."""
    exts, _, _ = languages.selected_extensions(cfg.extensions)
    lang = languages.from_shebang(content[:SHEBANG_BYTES].decode("utf-8", "replace").split("\n", 1)[0])
    return lang is not None and bool(set(languages.LANGUAGES[lang].extensions) & set(exts))


def read_file_records(cfg: DataConfig, rank: int, world_size: int,
                      skipped: dict[str, list[str]]) -> Iterator[sources.RawRecord]:
    for rel, path, source, sniff in list_files(cfg)[rank::world_size]:
        try:
            content = path.read_bytes()
        except OSError:
            skipped.setdefault("unreadable", []).append(rel)
            continue
        if not sniff or _shebang_selected(cfg, content):
            yield sources.RawRecord(content, rel, sources.language_of(rel), source)


def read_dataset_records(cfg: DataConfig, rank: int, world_size: int,
                         skipped: dict[str, list[str]]) -> Iterator[sources.RawRecord]:
    fields = sources.Fields(cfg.text_field, cfg.prompt_field, cfg.completion_field)
    inputs = [item for p in sources._existing(cfg.paths, "data.paths") for item in sources._data_inputs(p)]
    whole_files = len(inputs) >= world_size
    for item in inputs[rank::world_size] if whole_files else inputs:
        ds = sources._load_dataset(item)
        label = str(item)
        if not whole_files:
            ds = ds.shard(num_shards=world_size, index=rank, contiguous=True)
            label = f"{item}[part {rank + 1}/{world_size}]"
        yield from sources._rows(ds, label, fields, skipped)


class ReadSources(PipelineStep):
    """This task's share of data.source (stdlib, files or datasets) as documents carrying raw records."""

    type = "📖 - READER"
    name = "📂 sources"

    def __init__(self, data: dict, root: str):
        super().__init__()
        self.data, self.root = data, root

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        cfg = DataConfig(**self.data)
        skipped: dict[str, list[str]] = {}
        reader = read_dataset_records if cfg.source == "datasets" else read_file_records
        for i, rec in enumerate(reader(cfg, rank, world_size, skipped)):
            self.stat_update("records")
            yield Document(text="", id=f"{rank:05d}/{i}", metadata={"raw": rec})
        write_counts(self.root, "read", rank, {"skipped": skipped})
