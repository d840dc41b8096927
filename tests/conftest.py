"""Shared fixtures: tiny configs and a helper to run code in a subprocess with forced host devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from codegen_jax.config import Config, load_config

TINY_OVERRIDES = [
    "model.vocab_size=101", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=128", "model.max_seq_len=64",
    "data.seq_len=32", "train.batch_size=8", "train.steps=4",
]


def tiny_config(*overrides: str) -> Config:
    """A model small enough that a forward pass compiles in about a second on CPU."""
    return load_config(None, TINY_OVERRIDES + list(overrides))


@pytest.fixture
def tiny_cfg() -> Config:
    return tiny_config()


def run_with_devices(code: str, n_devices: int = 8, timeout: int = 600) -> str:
    """Run `code` in a fresh interpreter with `n_devices` forced CPU devices; return its stdout.

    XLA_FLAGS must be set before jax is imported, so this can't happen in the test process itself."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout
