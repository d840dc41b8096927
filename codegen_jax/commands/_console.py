"""Console output of the commands: tqdm progress bars on stderr and messages, as a `Progress`."""

from __future__ import annotations

import sys
from typing import Any

from codegen_jax.progress import Progress


class Console(Progress):
    """Bars on stderr (one task at a time), messages on stdout; `enabled=False` is silent (the
    non-zero processes of a multi-process run)."""

    def __init__(self, enabled: bool = True, unit: str = "it"):
        self.enabled, self.unit, self._bar = enabled, unit, None

    def start(self, desc: str, total: int | None = None, initial: int = 0) -> None:
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                         disable=not self.enabled, unit=self.unit)

    def update(self, n: int = 1, **info: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if info:
                self._bar.set_postfix(**info)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
