"""codegen-jax: train, sample, convert and evaluate decoder-only code models with JAX.

The public API (imported lazily, so `codegen-jax --help` and config errors stay fast):
`Config`, `load_config`, `create_model`, `train`, `Generator`, `export_hf`, `import_hf`,
`run_humaneval`.
"""

from __future__ import annotations

import importlib

from codegen_jax import hostenv

hostenv.quiet_libtpu_without_tpu()

_API = {
    "Config": "codegen_jax.config",
    "load_config": "codegen_jax.config",
    "UserError": "codegen_jax.errors",
    "create_model": "codegen_jax.model",
    "train": "codegen_jax.train.loop",
    "Generator": "codegen_jax.sample",
    "export_hf": "codegen_jax.hf",
    "import_hf": "codegen_jax.hf",
    "run_humaneval": "codegen_jax.eval.humaneval",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'codegen_jax' has no attribute {name!r}")
