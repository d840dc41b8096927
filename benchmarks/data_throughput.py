"""Data pipeline throughput: packed tokens/s and padding on the stdlib corpus, against training demand.

    python benchmarks/data_throughput.py [--seq-lens 1024 2048] [--seconds 20] [--pack first_fit]

For each seq_len it builds the real pipeline (stdlib -> clean -> pairs -> tokenize -> pack -> batch)
and reports: time to the first batch, packed tokens/s (all row slots, and non-padding tokens), and the
padding fraction, for plain code documents (data.pair_ratio=0) and for the default mix. The demand
side is the tiny config's training consumption (tokens/s of a jitted forward+backward of the tiny
model on this machine, or --train-tokens-per-s); the target is >= 20x that, with <= 3% padding.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codegen_jax.config import load_config  # noqa: E402
from codegen_jax.data.corpus import load_corpus  # noqa: E402
from codegen_jax.data.pipeline import make_iterator  # noqa: E402
from codegen_jax.data.tokenizer import get_tokenizer, load_tokenizer  # noqa: E402


def measure_pipeline(cfg, tok, seconds: float, batch_size: int) -> dict:
    """Time to first batch, then batches for `seconds`: slot and real tokens/s, padding fraction."""
    t0 = time.perf_counter()
    it = make_iterator(cfg, tok, batch_size=batch_size)
    next(it)
    first = time.perf_counter() - t0
    slots = real = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        slots += b["tokens"].size
        real += int(np.count_nonzero(b["segment_ids"]))
    dt = time.perf_counter() - t0
    return {"first_batch_s": first, "slots_per_s": slots / dt, "tokens_per_s": real / dt,
            "padding": 1 - real / slots}


def tiny_train_tokens_per_s(steps: int = 5) -> float:
    """Tokens/s the tiny config consumes: a jitted forward+backward of the tiny model on this machine."""
    import jax
    from flax import nnx

    from codegen_jax.model import create_model
    from codegen_jax.train.step import grads_and_metrics

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    b, t = cfg.train.batch_size, cfg.data.seq_len
    graphdef, params = nnx.split(create_model(cfg.model, seed=0))
    step = jax.jit(lambda p, batch: grads_and_metrics(graphdef, p, batch, 1, 0.0))
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32),
             "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             "loss_mask": np.ones((b, t), np.int32)}
    jax.block_until_ready(step(params, batch))  # compile
    t0 = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(step(params, batch))
    return b * t * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--seconds", type=float, default=20.0, help="measuring time per setting")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pack", default="first_fit", choices=["first_fit", "best_fit"])
    ap.add_argument("--tokenizer", default="", help="tokenizer dir (default: train one on the stdlib, timed)")
    ap.add_argument("--train-tokens-per-s", type=float, default=0.0,
                    help="training demand to compare with (default: measure the tiny model)")
    args = ap.parse_args()

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.pack={args.pack}", "model.max_seq_len=4096"])
    t0 = time.perf_counter()
    corpus = load_corpus(cfg.data)
    print(f"corpus: {corpus.stats.summary()} ({time.perf_counter() - t0:.1f}s)")
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            tok = get_tokenizer(cfg, work)
            print(f"tokenizer: trained {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s")
    demand = args.train_tokens_per_s or tiny_train_tokens_per_s()
    print(f"tiny config training consumption: {demand:,.0f} tokens/s; target >= {20 * demand:,.0f} tokens/s")
    print(f"cores: {os.cpu_count()}  pack: {args.pack}  batch: {args.batch_size}")
    print(f"{'seq_len':>7} {'mix':>12} {'first batch':>11} {'slots/s':>11} {'tokens/s':>11} {'x demand':>8} "
          f"{'padding':>8}")
    for seq_len, ratio in itertools.product(args.seq_lens, (0.0, cfg.data.pair_ratio)):
        cfg.data.seq_len, cfg.data.pair_ratio = seq_len, ratio
        r = measure_pipeline(cfg, tok, args.seconds, args.batch_size)
        mix = "code only" if ratio == 0 else f"pairs {ratio:.0%}"
        print(f"{seq_len:>7} {mix:>12} {r['first_batch_s']:>10.1f}s {r['slots_per_s']:>11,.0f} "
              f"{r['tokens_per_s']:>11,.0f} {r['tokens_per_s'] / demand:>7.0f}x {r['padding']:>8.2%}")
    cfg.data.pair_ratio = 0.3


if __name__ == "__main__":
    from codegen_jax.hostenv import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()  # the training demand measured as `codegen-jax train` runs it
    main()
