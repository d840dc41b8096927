"""Throughput of `codegen-jax data prepare` (local executor) on the stdlib corpus, with 1 and 2 workers.

    .venv/bin/python benchmarks/data_prepare.py [--dup-files 300] [--tasks 2] [--workers 1,2]

Two inputs: the Python standard library (data.source=stdlib), and a synthetic corpus of its first
--dup-files files written 10 times (copy 0 unchanged, copies 1-9 with one added line: near
duplicates) for the dedup stages. For each input and worker count it prints documents/s and MB/s of
input, the time of every stage, and the dedup share (signatures + buckets + clusters; the signatures
are timed separately on the clean stage's output, since they run inside that stage). It then times
datasketch alone (MinHash with 128 permutations + MinHashLSH at the same threshold, one process) on
the same cleaned documents and shingles, and projects the time for 1 TB at the measured per-core rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codegen_jax.config import load_config  # noqa: E402
from codegen_jax.data import sources  # noqa: E402

BASE = ["model.vocab_size=4096", "data.seq_len=256"]


def duplicated_corpus(root: Path, n_files: int, copies: int = 10) -> tuple[Path, int]:
    """The first `n_files` stdlib .py files, `copies` times; every copy but the first gets one more line."""
    files = [r for r in sources.read_stdlib()][:n_files]
    total = 0
    for k in range(copies):
        for rec in files:
            path = root / f"copy{k}" / rec.path
            path.parent.mkdir(parents=True, exist_ok=True)
            data = rec.content + (f"\n# synthetic copy {k}\n".encode() if k else b"")
            path.write_bytes(data)
            total += len(data)
    return root, total


def stdlib_bytes() -> int:
    return sum(len(r.content) for r in sources.read_stdlib())


def timed_run(cfg, out: Path, tasks: int, workers: int) -> dict[str, float]:
    """Seconds per stage of one prepare run into a fresh `out`."""
    from codegen_jax.data.prepare import stages

    stages.check_inputs(cfg)
    info = stages.settings(cfg, tasks)
    plan = stages.plan(cfg, str(out), tasks, info)
    stages.claim_dir(out, info)
    times = {}
    for stage in plan:
        t = time.perf_counter()
        stages.run_local([stage], out, workers, _Quiet())
        times[stage.name] = time.perf_counter() - t
    return times


class _Quiet:
    def message(self, text): ...
    def start(self, *a, **k): ...
    def update(self, *a, **k): ...
    def close(self): ...


def clean_texts(out: Path, tasks: int) -> list[str]:
    from codegen_jax.data.prepare.store import docs_file, iter_docs

    return [d.text for r in range(tasks) for d in iter_docs(docs_file(str(out), "clean", r))]


def signature_seconds(texts: list[str], threshold: float) -> float:
    """Our shingling + MinHash signatures of `texts`, one process (what the clean stage spends on them)."""
    from codegen_jax.data.prepare.neardup import CodeMinhashSignature, minhash_config

    step = CodeMinhashSignature(tempfile.mkdtemp(), minhash_config(threshold))
    t = time.perf_counter()
    for text in texts:
        shingles = step.get_shingles(text)
        if shingles.size:
            step.get_signature(shingles)
    return time.perf_counter() - t


def datasketch_seconds(texts: list[str], threshold: float) -> tuple[float, int]:
    """datasketch alone: MinHash(128) of the same shingles + MinHashLSH; (seconds, documents with a match)."""
    from datasketch import MinHash, MinHashLSH
    from datatrove.utils.text import simplify_text

    from codegen_jax.data.prepare.neardup import CodeMinhashSignature, minhash_config

    step = CodeMinhashSignature(tempfile.mkdtemp(), minhash_config(threshold))
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    dups = 0
    for i, text in enumerate(texts):
        words = simplify_text(text, step.config.norm_config).split()
        grams = [" ".join(words[j:j + 5]).encode() for j in range(max(len(words) - 4, 1 if words else 0))]
        if not grams:
            continue
        m = MinHash(num_perm=128)
        m.update_batch(grams)
        if lsh.query(m):
            dups += 1
        lsh.insert(str(i), m)
    return time.perf_counter() - t, dups


def report(name: str, n_docs: int, n_bytes: int, times: dict[str, float], sig_s: float, workers: int) -> float:
    total = sum(times.values())
    dedup = sig_s / workers + times["buckets"] + times["clusters"]  # signatures run spread over the workers
    print(f"{name}, {workers} worker(s): {total:.1f} s, {n_docs / total:.0f} documents/s, "
          f"{n_bytes / 1e6 / total:.2f} MB/s; dedup share {dedup / total:.0%} "
          f"(signatures ~{sig_s / workers:.1f} s, buckets {times['buckets']:.1f} s, clusters {times['clusters']:.1f} s)")
    print("    stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    return n_bytes / 1e6 / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dup-files", type=int, default=300)
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--workers", default="1,2")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="cj_prepare_bench_"))
    try:
        dup_root, dup_bytes = duplicated_corpus(tmp / "dup", args.dup_files)
        inputs = {"stdlib": (BASE, stdlib_bytes()),
                  f"stdlib[:{args.dup_files}] x10": (BASE + ["data.source=files", f"data.paths=[{dup_root}]"], dup_bytes)}
        print(f"{os.cpu_count()} CPUs; tasks={args.tasks}")
        for name, (overrides, n_bytes) in inputs.items():
            cfg = load_config(None, overrides)
            rates = {}
            for w in workers:
                out = tmp / f"out_{len(rates)}_{name.split()[0]}_{w}"
                times = timed_run(cfg, out, args.tasks, w)
                manifest = json.loads((out / "manifest.json").read_text())
                texts = clean_texts(out, args.tasks)
                sig_s = signature_seconds(texts, cfg.data.near_dup_threshold)
                rates[w] = report(name, manifest["documents"]["seen"], n_bytes, times, sig_s, w)
                print(f"    kept {manifest['documents']['kept']} of {manifest['documents']['seen']}; drops "
                      f"{manifest['drops']}")
            if len(rates) > 1:
                lo, hi = min(rates), max(rates)
                print(f"    scaling {lo} -> {hi} workers: {rates[hi] / rates[lo]:.2f}x")
            ds_s, ds_dups = datasketch_seconds(texts, cfg.data.near_dup_threshold)
            ours = sig_s + times["buckets"] + times["clusters"]
            print(f"    datasketch alone (1 process, same {len(texts)} cleaned documents): {ds_s:.1f} s, "
                  f"{ds_dups} documents with a match; ours (signatures + buckets + clusters, 1 process): {ours:.1f} s")
            per_core = rates[min(rates)] / min(rates)
            print(f"    1 TB at {per_core:.2f} MB/s per core: {1e6 / per_core / 3600:.0f} core-hours "
                  f"({1e6 / per_core / 3600 / 64:.1f} h on 64 cores, {1e6 / per_core / 3600 / 512:.2f} h on 512)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # worker processes import this module: only the main process runs the benchmark
    main()
