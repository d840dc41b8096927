"""`codegen-jax serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--slots 16] [--api-key KEY]
[--max-queue N]`: an OpenAI-compatible completion server (see codegen_jax/serve/app.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from codegen_jax.errors import UserError

API_KEY_ENV = "CODEGEN_JAX_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over OpenAI's /v1/completions (with FIM)")
    p.add_argument("--checkpoint", required=True, help="a run's workdir (latest step) or a step dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=16, help="rows decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=64, help="rows that may wait for a slot; more get 429")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--model-name", help="the model id clients use (default: the checkpoint's directory name)")
    p.add_argument("--drain-s", type=float, default=30.0, help="on SIGTERM, let requests finish this long")
    p.add_argument("--warmup", type=int, default=0,
                   help="before listening, compile the programs for prompts up to this many tokens (plus the "
                        "BOS the server adds) and every decode bucket (rows x cache length) for greedy, "
                        "sampled and top_p requests")
    p.add_argument("--batch-invariant", action="store_true",
                   help="decode every slot over the whole context each step, so a request's output is "
                        "bitwise what it is alone (by default the live rows run in buckets: faster, equal "
                        "up to float rounding)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.slots < 1 or args.max_queue < 0 or not 0 < args.port < 65536:
        raise UserError("--slots must be >= 1, --max-queue >= 0 and --port in 1..65535")
    import uvicorn

    from codegen_jax.sample import Generator
    from codegen_jax.serve.app import create_app
    from codegen_jax.serve.worker import Worker

    gen = Generator.from_checkpoint(args.checkpoint)
    name = args.model_name or _default_name(args.checkpoint)
    worker = Worker(gen, slots=args.slots, max_queue=args.max_queue, precompile=bool(args.warmup),
                    batch_invariant=args.batch_invariant)
    worker.start()
    if args.warmup:
        _warm_up(gen, worker, args.warmup)
    app = create_app(gen, worker, name, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    print(f"serving {name} (step {gen.step}) on http://{args.host}:{args.port}/v1 with {worker.slots} slots",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.drain_s)
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, let requests finish), then re-raises the
    # signal to whatever handler was there before: ours notes it, so a drained shutdown exits 0
    stopped: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stopped.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run()
    finally:
        worker.stop(drain_s=args.drain_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        print(f"stopped by signal {stopped[0]} after draining", file=sys.stderr)


def _default_name(checkpoint: str) -> str:
    p = Path(checkpoint.rstrip("/"))
    return (p.parent.parent.name if p.name.isdigit() and p.parent.name == "checkpoints" else p.name) or "model"


def _warm_up(gen, worker, max_prompt: int) -> None:
    """A greedy request and two sampled ones (without and with top_p: each is its own program; the
    `openai` client's defaults, temperature 1 and top_p 1, are the first) per prompt bucket up to
    the one of `max_prompt` tokens and the BOS the server puts before them (512 text tokens are 513
    ids, bucket 768: without it, such a prompt compiled mid-traffic and stalled every slot)."""
    import threading

    from codegen_jax.sample.scheduler import Request, bucket

    sizes, n = [], 1
    while bucket(n) <= bucket(max_prompt + 1) and bucket(n) < gen.model_cfg.max_seq_len - 1:
        sizes.append(bucket(n))
        n = bucket(n) + 1
    done = threading.Semaphore(0)
    requests = [Request([gen.tokenizer.bos_id] * size, 2, temperature, top_p=top_p)
                for size in sizes for temperature, top_p in ((0.0, 1.0), (0.8, 1.0), (0.8, 0.95))]
    for r in requests:
        worker.submit([r], lambda _: done.release())
        done.acquire()
