"""Reading JSONL inputs (prompts, problems, samples) with one clear error line for a bad file or line."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from codegen_jax.errors import UserError


def read_jsonl(path: str | os.PathLike, what: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{what} file {path}, line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{what} file {path}, line {lineno}: expected a JSON object")
                rows.append((lineno, obj))
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} file {path}: {getattr(e, 'strerror', None) or e}") from None
    return rows
