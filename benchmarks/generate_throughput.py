"""Greedy generation throughput: our Generator (prefill + compiled decode loop) against Hugging Face
transformers `LlamaForCausalLM.generate` (PyTorch CPU, `use_cache=True`) on the same random weights.

For each config and batch size: every row gets a random prompt of --prompt-len tokens and generates
exactly --new-tokens tokens (EOS ignored on both sides); the greedy tokens are asserted equal (up to
near-ties of random weights, see `compare_greedy`), then generated tokens/s are reported (best of
--repeats timed runs, after one warm-up that compiles; prefill included on both sides).

    python benchmarks/generate_throughput.py                      # tiny and small, batch 1/8/32
    python benchmarks/generate_throughput.py --configs tiny --batches 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the ModelConfig values from the issue, used when configs/<name>.yaml is missing
FALLBACK = {
    "tiny": ["model.vocab_size=4096", "model.d_model=256", "model.n_layers=4", "model.n_heads=4",
             "model.d_ff=704"],
    "small": ["model.vocab_size=32000", "model.d_model=768", "model.n_layers=12", "model.n_heads=12",
              "model.d_ff=2048"],
}


class IdTokenizer:
    """A stand-in tokenizer for token-id benchmarks: ids are text, nothing special is skipped."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id = vocab_size, 0, 0, 0

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def load_model_config(name: str, dtype: str):
    from codegen_jax.config import load_config

    path = ROOT / "configs" / f"{name}.yaml"
    overrides = [f"model.dtype={dtype}", "model.param_dtype=float32", "model.remat=none"]
    if path.is_file():
        return load_config(path, overrides).model
    return load_config(None, FALLBACK[name] + overrides).model


def hf_model(params, cfg):
    """transformers LlamaForCausalLM holding our weights (float32, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    from codegen_jax.hf_config import transformers_config
    from codegen_jax.hf_params import to_hf_state_dict

    hf_cfg = transformers_config(cfg)  # no special token ids: EOS never stops a row
    model = AutoModelForCausalLM.from_config(hf_cfg).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(params, cfg).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def time_hf(model, prompts_bp: np.ndarray, new_tokens: int, repeats: int) -> tuple[float, int, np.ndarray]:
    """(best seconds, torch threads it took, tokens [b, n]): HF's best over torch's default thread
    count and one thread (on a loaded machine OpenMP's spinning threads can be 10x slower)."""
    import torch

    default_threads = torch.get_num_threads()
    best = (float("inf"), default_threads, None)
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        seconds, out = _time_hf(model, prompts_bp, new_tokens, repeats)
        best = min(best, (seconds, threads, out), key=lambda r: r[0])
    torch.set_num_threads(default_threads)
    return best


def _time_hf(model, prompts_bp: np.ndarray, new_tokens: int, repeats: int) -> tuple[float, np.ndarray]:
    import torch

    ids = torch.from_numpy(prompts_bp.astype(np.int64))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    best, out = float("inf"), None
    with torch.inference_mode():
        model.generate(ids[:, :8], **{**kwargs, "attention_mask": torch.ones_like(ids[:, :8]),
                                      "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            best = min(best, time.perf_counter() - t0)
    return best, out[:, prompts_bp.shape[1]:].numpy()


def time_ours(gen, prompts_bp: np.ndarray, new_tokens: int, repeats: int) -> tuple[float, float, np.ndarray]:
    """(compile seconds, best run seconds, tokens [b, n])."""
    kwargs = dict(ignore_eos=True, max_new_tokens=new_tokens, temperature=0.0, stop=[])
    gen.generate_ids(prompts_bp.tolist(), **kwargs)  # compiles
    compile_s = gen.last_stats["compile_s"]
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate_ids(prompts_bp.tolist(), **kwargs)
        best = min(best, time.perf_counter() - t0)  # wall time, like HF's
        assert gen.last_stats["compile_s"] == 0.0, "a timed run recompiled"
    return compile_s, best, np.array([[c.tokens for c in row][0] for row in out])


def compare_greedy(model, prompts_bp: np.ndarray, ours_bn: np.ndarray, hf_bn: np.ndarray,
                   tol: float = 1e-4) -> tuple[bool, int]:
    """(equal, rows that part at a near-tie). Random weights give occasional near-ties (top-2 logits
    within float noise), where fp32 JAX and torch may pick different tokens and the rows part ways.
    A row passes if it is identical, or if at its first difference our model's full-recompute logits
    for the two tokens are within `tol`."""
    import jax.numpy as jnp

    ties = 0
    for r in np.flatnonzero((ours_bn != hf_bn).any(axis=1)):
        t = int(np.argmax(ours_bn[r] != hf_bn[r]))
        seq = np.concatenate([prompts_bp[r], ours_bn[r, :t]])[None]
        logits_v = np.asarray(model(jnp.asarray(seq))[0][0, -1])
        if abs(logits_v[ours_bn[r, t]] - logits_v[hf_bn[r, t]]) > tol:
            return False, ties
        ties += 1
    return True, ties


def bench_config(name: str, batches: list[int], prompt_len: int, new_tokens: int, repeats: int,
                 dtype: str) -> list[dict]:
    from flax import nnx

    from codegen_jax.model import create_model
    from codegen_jax.sample import Generator

    cfg = load_model_config(name, dtype)
    cfg.max_seq_len = max(cfg.max_seq_len, prompt_len + new_tokens)
    model = create_model(cfg, seed=0)
    torch_model = hf_model(nnx.to_pure_dict(nnx.state(model)), cfg)
    gen = Generator(model, IdTokenizer(cfg.vocab_size), max_batch_size=max(batches))
    rng = np.random.default_rng(0)
    rows = []
    for b in batches:
        prompts_bp = rng.integers(1, cfg.vocab_size, size=(b, prompt_len))
        compile_s, ours_s, ours_bn = time_ours(gen, prompts_bp, new_tokens, repeats)
        hf_s, hf_threads, hf_bn = time_hf(torch_model, prompts_bp, new_tokens, repeats)
        same, ties = compare_greedy(model, prompts_bp, ours_bn, hf_bn)
        row = {"config": name, "batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "ours_tok_s": b * new_tokens / ours_s, "hf_tok_s": b * new_tokens / hf_s,
               "hf_torch_threads": hf_threads, "speedup": hf_s / ours_s, "compile_s": compile_s,
               "greedy_equal": same, "rows_split_at_near_tie": ties}
        rows.append(row)
        print(f"{name:5s} b={b:3d}  ours {row['ours_tok_s']:8.1f} tok/s  HF {row['hf_tok_s']:7.1f} tok/s "
              f"({hf_threads} thr)  x{row['speedup']:5.1f}  compile {compile_s:4.1f}s  greedy equal: {same}"
              + (f" ({ties} rows part at a near-tie)" if ties else ""), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="compute dtype of our model (HF runs float32)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--single-thread", action="store_true",
                   help="run XLA single-threaded too (HF is always measured at its best thread count)")
    args = p.parse_args(argv)
    if args.single_thread:  # must be set before jax initialises its CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (HF runs in this process too)")
    rows = []
    for name in args.configs:
        rows += bench_config(name, args.batches, args.prompt_len, args.new_tokens, args.repeats, args.dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not all(r["greedy_equal"] for r in rows):
        print("greedy outputs differ from HF beyond near-ties", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from codegen_jax.hostenv import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()  # both sides of the comparison share this process and its allocator
    sys.exit(main())
