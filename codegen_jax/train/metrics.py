"""Run outputs: metrics.jsonl, TensorBoard events, the loss-curve PNG, optional wandb, and the peak
FLOP/s figure that MFU divides by."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from codegen_jax import storage

# Dense bf16 peak per chip, for MFU when train.peak_flops is not set (vendor figures).
_PEAK_BY_KIND = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                 "TPU v6 lite": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def matmul_probe_flops(n: int = 1024, reps: int = 5) -> float:
    """Measured fp32 matmul FLOP/s of this host (all its cores): the CPU "peak" MFU divides by."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(configured_per_device: float) -> float:
    """Total peak FLOP/s of the devices this run uses."""
    if configured_per_device > 0:
        return configured_per_device * jax.device_count()
    device = jax.devices()[0]
    if device.platform == "cpu":  # forced host devices share the same cores: measure the host
        return matmul_probe_flops() * jax.process_count()
    for kind, flops in _PEAK_BY_KIND.items():
        if kind.lower() in device.device_kind.lower():
            return flops * jax.device_count()
    return matmul_probe_flops() * jax.device_count()


class MetricsWriter:
    """Writes every record to metrics.jsonl and TensorBoard, redraws loss.png at each eval. Process 0
    only: the others get a writer that does nothing.

    With a URL workdir (gs://, s3://) the files are written to a local directory and uploaded at each
    eval, at least every `sync_every_s` seconds, and on close: object stores cannot append."""

    def __init__(self, workdir: Any, enabled: bool, use_wandb: bool = False, run_config: dict | None = None,
                 sync_every_s: float = 60.0):
        self.enabled = enabled
        self.remote = workdir if storage.is_url(workdir) else None
        self.workdir = Path(workdir) if not self.remote else None
        self.history: list[dict[str, Any]] = []
        self._tb = self._wandb = None
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._sync_every_s, self._last_sync = sync_every_s, time.monotonic()
        if not enabled:
            return
        if self.remote:  # the local copy goes when the run ends (close), or at exit after a crash
            self.workdir = Path(tempfile.mkdtemp(prefix="codegen_jax_logs_"))
            atexit.register(shutil.rmtree, self.workdir, ignore_errors=True)
            if (self.remote / "metrics.jsonl").exists():  # resuming: continue its records
                storage.copy_file(self.remote / "metrics.jsonl", self.workdir / "metrics.jsonl")
        workdir = self.workdir
        self._file = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:
            pass
        if use_wandb:
            try:
                import wandb

                self._wandb = wandb.init(project="codegen-jax", config=run_config, dir=str(workdir))
            except ImportError:
                print("train.wandb is set but wandb is not installed; continuing without it")

    def truncate_after(self, step: int) -> None:
        """On resume: keep the records up to the restored step (later ones are about to be redone)."""
        if not self.enabled:
            return
        path = self.workdir / "metrics.jsonl"
        self._file.close()
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.history = [r for r in lines if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self._file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and self._tb is not None:
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        if "eval_loss" in record:
            self.plot()
        if self.remote and ("eval_loss" in record or time.monotonic() - self._last_sync > self._sync_every_s):
            self.sync()

    def sync(self) -> None:
        """Upload new or changed files to the URL workdir (a no-op for a local one)."""
        if self.enabled and self.remote:
            self._file.flush()
            if self._tb is not None:
                self._tb.flush()
            storage.sync_tree(self.workdir, self.remote, self._uploaded, skip=("wandb",))
            self._last_sync = time.monotonic()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.history if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.workdir / "loss.png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.remote:
            storage.sync_tree(self.workdir, self.remote, self._uploaded, skip=("wandb",))
            shutil.rmtree(self.workdir, ignore_errors=True)
