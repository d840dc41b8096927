"""Where raw documents come from: source trees, data files through `datasets`, or the Python stdlib.

Every reader yields `RawRecord`s (content not yet decoded or cleaned) in a deterministic order, with
metadata: path, language and source. `split_of` assigns each document to train or validation by a
hash, so the split does not depend on reading order or on the rest of the corpus.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from codegen_jax import storage
from codegen_jax.errors import UserError

LANGUAGES = {
    "python": (".py", ".pyi"), "javascript": (".js", ".mjs", ".jsx"), "typescript": (".ts", ".tsx"),
    "java": (".java",), "c": (".c", ".h"), "cpp": (".cc", ".cpp", ".cxx", ".hpp", ".hh"), "go": (".go",),
    "rust": (".rs",), "ruby": (".rb",), "shell": (".sh", ".bash"), "julia": (".jl",), "scala": (".scala",),
    "kotlin": (".kt",), "swift": (".swift",), "php": (".php",), "lua": (".lua",), "r": (".r", ".R"),
    "sql": (".sql",), "haskell": (".hs",), "markdown": (".md",), "text": (".txt", ".rst"),
}
_EXT_TO_LANG = {ext: lang for lang, exts in LANGUAGES.items() for ext in exts}
_SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox",
              "site-packages", "dist-packages", ".mypy_cache", ".pytest_cache"}
DATA_FILE_EXTS = (".jsonl", ".json", ".parquet", ".arrow")


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One document before cleaning. `content` is bytes from files, str from datasets rows.

    `prompt` is set for prompt/completion rows; `content` then holds the completion.
    """

    content: bytes | str
    path: str
    language: str
    source: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # a chat row: (role, content) turns; content ""


ROLES = ("system", "user", "assistant")


def chat_turns(value, where: str) -> tuple[tuple[str, str], ...] | None:
    """A `messages` value as (role, content) turns (OpenAI's format: a list of {"role", "content"}),
    None when it is not a list of such objects; an unknown role is a one-line UserError."""
    if not isinstance(value, list) or not value:
        return None
    turns = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            return None
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message role {m['role']!r} is not one of {', '.join(ROLES)}; "
                            "fix the row or drop it")
        turns.append((m["role"], m["content"]))
    return tuple(turns)


def language_of(path: str) -> str:
    """Language name from a file extension ('unknown' when not in LANGUAGES)."""
    ext = os.path.splitext(path)[1]
    return _EXT_TO_LANG.get(ext) or _EXT_TO_LANG.get(ext.lower(), "unknown")


def resolve_extensions(entries: list[str]) -> tuple[str, ...]:
    """Extensions from config entries that are extensions ('.py', 'py') or language names ('python')."""
    exts: list[str] = []
    for entry in entries:
        e = entry.strip()
        if e.lower() in LANGUAGES:
            exts += LANGUAGES[e.lower()]
        elif e:
            exts.append(e if e.startswith(".") else "." + e)
    if not exts:
        raise UserError("data.extensions is empty; list extensions like .py or languages like python")
    return tuple(dict.fromkeys(exts))


def split_of(key: str, val_fraction: float) -> str:
    """'validation' for a stable `val_fraction` share of keys (by BLAKE2 hash), else 'train'."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return "validation" if h < val_fraction * 2.0**64 else "train"


def stdlib_root() -> Path:
    """The running interpreter's standard library directory (found through `sysconfig`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_stdlib(skipped: dict[str, list[str]] | None = None) -> Iterator[RawRecord]:
    """The embedded default corpus: every .py file of the stdlib (site-packages excluded)."""
    for rec in read_tree(stdlib_root(), (".py",), source="stdlib", skipped=skipped):
        yield rec


def read_tree(root: Path, extensions: tuple[str, ...], *, source: str = "files",
              skipped: dict[str, list[str]] | None = None) -> Iterator[RawRecord]:
    """Files under `root` with one of `extensions`, in sorted order; paths relative to `root`.

    Unreadable files are recorded in `skipped['unreadable']` instead of failing the whole corpus.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place: os.walk then descends in a deterministic order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(extensions):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            try:
                with open(full, "rb") as f:
                    content = f.read()
            except OSError:
                if skipped is not None:
                    skipped.setdefault("unreadable", []).append(rel)
                continue
            yield RawRecord(content, rel.replace(os.sep, "/"), language_of(name), source)


def read_files(paths: list[str], extensions: tuple[str, ...],
               skipped: dict[str, list[str]] | None = None) -> Iterator[RawRecord]:
    """Source trees and single files named in `paths` (a named file is read whatever its extension)."""
    for p in _existing(paths, "data.paths"):
        if p.is_dir():
            for rec in read_tree(p, extensions, skipped=skipped):
                yield dataclasses.replace(rec, path=f"{p.name}/{rec.path}")
        else:
            try:
                content = p.read_bytes()
            except OSError as e:
                raise UserError(f"cannot read {p}: {e.strerror}") from None
            yield RawRecord(content, p.name, language_of(p.name), "files")


def _existing(paths: list[str], what: str) -> list[Path]:
    if not paths:
        raise UserError(f"{what} is empty; list source directories or data files")
    out = []
    for raw in paths:
        p = storage.local_copy(raw)  # a URL is downloaded once per process
        if not p.exists():
            raise UserError(f"{what}: path not found: {p}")
        out.append(p)
    return out


@dataclasses.dataclass(frozen=True)
class Fields:
    """Column names of a data file: `text`, or `prompt` + `completion`, or `messages` (chat turns)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def read_datasets(paths: list[str], fields: Fields,
                  skipped: dict[str, list[str]] | None = None) -> Iterator[RawRecord]:
    """Rows of JSONL / JSON / Parquet / Arrow files and `save_to_disk` directories, via `datasets`."""
    for p in _existing(paths, "data.paths"):
        for item in _data_inputs(p):
            yield from _rows(_load_dataset(item), str(item), fields, skipped)


def is_saved_dataset(p: Path) -> bool:
    """True for a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return p.is_dir() and any((p / n).is_file() for n in ("state.json", "dataset_dict.json"))


def _data_inputs(p: Path) -> list[Path]:
    if is_saved_dataset(p):
        return [p]
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.suffix in DATA_FILE_EXTS and f.is_file())
        if not found:
            raise UserError(f"no data files ({', '.join(DATA_FILE_EXTS)}) or save_to_disk dataset under {p}")
        return found
    if p.suffix not in DATA_FILE_EXTS:
        raise UserError(f"{p}: unsupported data file type; use one of {', '.join(DATA_FILE_EXTS)} "
                        "or set data.source=files for source code")
    return [p]


def _load_dataset(p: Path):
    """One `datasets.Dataset` for a file or saved directory (all splits of a DatasetDict, concatenated)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach the hub
    with _quiet_datasets():
        return _load_dataset_quietly(p)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or parser error logs from `datasets`: our UserError says what went wrong."""
    import datasets

    level, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _load_dataset_quietly(p: Path):
    import datasets

    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = datasets.concatenate_datasets([ds[k] for k in sorted(ds)])
            return ds
        if p.suffix in (".jsonl", ".json"):
            return datasets.Dataset.from_json(str(p))
        if p.suffix == ".parquet":
            return datasets.Dataset.from_parquet(str(p))
        return _load_arrow(p)
    except UserError:
        raise
    except Exception as e:  # datasets wraps parser errors in many types; the user needs only the cause
        cause = e.__cause__ or e
        msg = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"cannot read data file {p}: {msg}") from None


def _load_arrow(p: Path):
    """An Arrow stream file (as `datasets` writes) or an Arrow IPC / Feather file."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(str(p))
    except Exception:  # not the stream format: try the IPC file format
        with pa.memory_map(str(p)) as source:
            return datasets.Dataset(pa.ipc.open_file(source).read_all())


def _chat_rows(ds, label: str, fields: Fields, skipped: dict[str, list[str]] | None) -> Iterator[RawRecord]:
    """RawRecords of a dataset of chat rows (`messages`: OpenAI-style role/content turns)."""
    row = 0
    for batch in ds.select_columns([fields.messages]).iter(batch_size=1024):
        for value in batch[fields.messages]:
            row += 1
            where = f"{label}:{row}"
            turns = chat_turns(value, where)
            if turns is None or not any(role == "assistant" for role, _ in turns):
                if skipped is not None:
                    skipped.setdefault("missing_field", []).append(where)
                continue
            yield RawRecord("", where, "chat", "datasets", messages=turns)


def _rows(ds, label: str, fields: Fields, skipped: dict[str, list[str]] | None) -> Iterator[RawRecord]:
    """RawRecords of one dataset; a row without the configured field is a counted skip."""
    cols = ds.column_names
    if fields.text in cols:
        wanted = [fields.text]
    elif fields.prompt in cols and fields.completion in cols:
        wanted = [fields.prompt, fields.completion]
    elif fields.messages in cols:
        yield from _chat_rows(ds, label, fields, skipped)
        return
    else:
        raise UserError(
            f"{label} has no '{fields.text}' field, nor '{fields.prompt}' + '{fields.completion}', nor "
            f"'{fields.messages}' (its fields: {', '.join(cols)}); set data.text_field, "
            "data.prompt_field/data.completion_field or data.messages_field")
    lang_col = next((c for c in ("language", "lang") if c in cols), None)
    path_col = "path" if "path" in cols else None
    extra = [c for c in (lang_col, path_col) if c]
    row = 0
    for batch in ds.select_columns(wanted + extra).iter(batch_size=1024):
        for i in range(len(batch[wanted[0]])):
            row += 1
            values = [batch[c][i] for c in wanted]
            where = f"{label}:{row}"
            if not all(isinstance(v, str) for v in values):
                if skipped is not None:
                    skipped.setdefault("missing_field", []).append(where)
                continue
            path = batch[path_col][i] if path_col and isinstance(batch[path_col][i], str) else where
            lang = batch[lang_col][i] if lang_col and isinstance(batch[lang_col][i], str) else language_of(path)
            if len(wanted) == 1:
                yield RawRecord(values[0], path, lang, "datasets")
            else:
                yield RawRecord(values[1], path, lang, "datasets", prompt=values[0])
