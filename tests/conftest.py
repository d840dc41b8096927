"""Shared fixtures: tiny configs and a helper to run code in a subprocess with forced host devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# One XLA compilation cache for the session, this process and every subprocess it starts (they inherit
# the environment): the suite compiles the same tiny programs in dozens of `codegen-jax` processes, a
# third of each one's time. Set before jax is imported; a user's own JAX_COMPILATION_CACHE_DIR wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="codegen_jax_tests_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import pytest
from hypothesis import settings

# CI runs each property test on the same examples every time: a failure there is reproducible
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

from codegen_jax.config import Config, load_config

TINY_OVERRIDES = [
    "model.vocab_size=101", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=128", "model.max_seq_len=64",
    "data.seq_len=32", "train.batch_size=8", "train.steps=4",
]


# `codegen-jax train --config configs/tiny.yaml` shrunk for the CLI tests (resume, storage, several
# processes); configs/tiny.yaml's closing `eval parse` is off: its own tests cover it
TINY_CLI_TRAIN = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2", "model.d_ff=128",
                  "model.vocab_size=512", "data.seq_len=64",
                  "train.batch_size=8", "train.log_every=1", "train.eval_every=1000", "train.sample_prompts=[]",
                  "train.parse_eval=false"]


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


# ---- data fixtures (tests/test_data_*.py, test_tokenizer.py, test_pipeline.py) ----

_FUNC = '''
def {name}(x, y={i}):
    """Return {name} of x and y, scaled by {i}.

    Used by the tests as a docstring -> code pair.
    """
    total = x * {i} + y
    for k in range({i}):
        total += k
    return total
'''


def _python_file(n_funcs: int, seed: int) -> str:
    body = "".join(_FUNC.format(name=f"func_{seed}_{i}", i=i + seed) for i in range(n_funcs))
    return f'"""Module {seed} of the synthetic test corpus."""\nimport os\n{body}'


def write_code_corpus(root: Path, n_files: int = 24) -> Path:
    """A small tree of Python files (sizes vary from one to many functions) plus non-Python files."""
    src = root / "corpus"
    (src / "pkg").mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        sub = src / "pkg" if i % 3 == 0 else src
        (sub / f"mod_{i}.py").write_text(_python_file(1 + (i * 7) % 13, i))
    (src / "README.md").write_text("# not python\n")
    (src / "pkg" / "notes.txt").write_text("plain notes\n")
    return src


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> Path:
    """Directory of synthetic Python files (read-only for tests: copy before changing it)."""
    return write_code_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def small_tokenizer(code_corpus):
    """A 512-token byte-level BPE trained on the synthetic corpus plus a little stdlib."""
    from codegen_jax.data.tokenizer import train_tokenizer

    texts = [p.read_text() for p in sorted(code_corpus.rglob("*.py"))]
    texts.append(Path(textwrap.__file__).read_text())
    return train_tokenizer(texts, 512)


def losses_side_by_side(step, state, torch_model, torch_opt, batches) -> tuple[list[float], list[float]]:
    """(ours, torch's) training losses of the same batches, one optimizer step each: our jitted `step`
    from `state`, and `torch_model` (labels = inputs, as our loss) with `torch_opt`."""
    import jax
    import jax.numpy as jnp
    import torch

    ours, theirs = [], []
    for batch in batches:
        state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
        ours.append(float(metrics["loss"]))
        tokens = torch.from_numpy(batch["tokens"]).long()
        loss = torch_model(input_ids=tokens, labels=tokens).loss
        torch_opt.zero_grad()
        loss.backward()
        torch_opt.step()
        theirs.append(float(loss.detach()))
    return ours, theirs


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: torch's thread pool only adds contention (decoding is ~20x faster on one thread).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def no_compilation_cache():
    """TPU programs compiled here (libtpu on topology devices) are large and compiled once each: the
    session's compilation cache gains nothing from them, and writing them costs their serialization.
    Use with `pytestmark = pytest.mark.usefixtures("no_compilation_cache")`."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    # jax decides once per process whether the cache is used: reset makes it decide again
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()
