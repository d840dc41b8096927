"""Local paths and object-store URLs (gs://, s3://) for run directories, checkpoints and data.

Orbax reads and writes checkpoints at a URL itself (through etils.epath and tensorstore). For the
rest, object stores can neither append to a file nor rename a directory atomically, so:
- inputs at a URL (data trees and files, a tokenizer directory, a prompts file) are copied to a
  local temporary directory once per process (`local_copy`), and the existing readers run on that;
- outputs beside the checkpoints (metrics.jsonl, TensorBoard events, loss.png) are written to a
  local directory and uploaded when they change (`sync_tree`); small files (config.yaml, the
  tokenizer) are written to the URL directly.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from etils import epath

from codegen_jax.errors import UserError

# URL scheme -> (modules etils.epath can use for it, pip extra that installs the first)
_BACKENDS = {"gs": (("gcsfs", "tensorflow"), "gcs"), "s3": (("s3fs",), "s3")}


class _NoBucketTypeWarning(logging.Filter):
    """gcsfs warns on every file-system handle when it cannot query the bucket's type (no default
    credentials, e.g. a public bucket or an emulator), then works as before: once is enough."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Could not determine bucket type" not in record.getMessage():
            return True
        first, _NoBucketTypeWarning.seen = not _NoBucketTypeWarning.seen, True
        return first


logging.getLogger("gcsfs").addFilter(_NoBucketTypeWarning())


def is_url(p: str | Path | epath.Path) -> bool:
    return "://" in str(p)


def path(p: str | Path | epath.Path) -> Path | epath.Path:
    """An absolute local `Path`, or an `epath.Path` for a URL (after checking its backend is installed)."""
    if not is_url(p):
        return Path(p).expanduser().absolute()
    scheme = str(p).split("://", 1)[0]
    if scheme not in _BACKENDS:
        raise UserError(f"{p}: unsupported URL scheme {scheme}://; use a local path, gs:// or s3://")
    modules, extra = _BACKENDS[scheme]
    if all(importlib.util.find_spec(m) is None for m in modules):
        raise UserError(f"{p}: {scheme}:// paths need the {modules[0]} package; "
                        f"pip install 'codegen-jax[{extra}]'")
    return epath.Path(str(p))


def require_local(p: str | None, flag: str) -> None:
    """Refuse a URL where only local paths work (outputs that other tools read from disk)."""
    if p is not None and is_url(p):
        raise UserError(f"{flag} {p}: must be a local path (URLs work for --workdir, --checkpoint, "
                        "--init-from, --prompts-file, data.paths and data.tokenizer)")


def walk_files(root: Path | epath.Path) -> Iterator[Path | epath.Path]:
    """Every file under `root`, in sorted order."""
    for child in sorted(root.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            yield from walk_files(child)
        else:
            yield child


def copy_file(src: Path | epath.Path, dst: Path | epath.Path) -> None:
    """Stream one file between any two locations (local or URL)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)


def copy_tree(src: Path | epath.Path, dst: Path | epath.Path) -> None:
    if not src.is_dir():
        copy_file(src, dst)
        return
    for f in walk_files(src):
        copy_file(f, dst / f.relative_to(src))


def move_tree(src: Path | epath.Path, dst: Path | epath.Path) -> None:
    """Move a directory: a rename on disk; a copy then delete at a URL (object stores have no rename)."""
    if not is_url(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        return
    copy_tree(src, dst)
    src.rmtree()


@functools.lru_cache(maxsize=None)
def _download(url: str) -> Path:
    src = path(url)
    if not src.exists():
        raise UserError(f"path not found: {url}")
    tmp = Path(tempfile.mkdtemp(prefix="codegen_jax_remote_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    local = tmp / src.name
    try:
        copy_tree(src, local)
    except OSError as e:
        raise UserError(f"cannot read {url}: {e}") from None
    return local


def local_copy(p: str | Path | epath.Path) -> Path:
    """A local path for `p`: itself when local, else a copy of the file or directory tree it names,
    downloaded once per process into a temporary directory removed at exit."""
    if not is_url(p):
        return Path(p).expanduser()
    return _download(str(p))


def sync_tree(local: Path, remote: Path | epath.Path, uploaded: dict[str, tuple[int, int]],
              skip: tuple[str, ...] = ()) -> None:
    """Upload the files under `local` (except top-level entries named in `skip`) that are new or
    changed since the last call with the same `uploaded` record ({relative path: (size, mtime_ns)})."""
    for f in walk_files(local):
        rel = str(f.relative_to(local))
        if rel.split("/", 1)[0] in skip:
            continue
        stat = f.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        if uploaded.get(rel) != key:
            copy_file(f, remote / rel)
            uploaded[rel] = key
