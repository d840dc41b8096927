"""Generation: `filters` (pure logit filters and sampling), `engine` (the compiled prefill/decode
programs on a slot-based decode state), `scheduler` (the host loop: which request occupies which
slot, stop strings, streaming), `options` and `stops` (validation and stop strings, jax-free), and
`Generator`, the facade over them. Names are imported lazily, so the jax-free parts stay light."""

from __future__ import annotations

import importlib

_API = {"Completion": "generator", "Generator": "generator", "SamplingOptions": "options",
        "check_options": "options", "find_stop": "stops"}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f"codegen_jax.sample.{_API[name]}"), name)
    raise AttributeError(f"module 'codegen_jax.sample' has no attribute {name!r}")
