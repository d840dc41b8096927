"""How long-running library calls report progress without printing: they take a `Progress` and call
it; the commands layer passes one that draws bars and prints (commands/_console.py), everyone else
gets the silent default."""

from __future__ import annotations

from typing import Any


class Progress:
    """Silent progress: the interface, and the default for library callers."""

    def start(self, desc: str, total: int | None = None, initial: int = 0) -> None:
        """A new task of `total` units (None: unknown), `initial` of them already done."""

    def update(self, n: int = 1, **info: Any) -> None:
        """`n` more units done; `info` is shown beside the bar (loss, tokens/s, ...)."""

    def message(self, text: str) -> None:
        """A line for the user (a resume, a warning, a sample)."""

    def close(self) -> None:
        """The current task is over."""


SILENT = Progress()
