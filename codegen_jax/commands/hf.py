"""`codegen-jax export-hf --checkpoint DIR --out HF_DIR [--dtype ...]` and
`codegen-jax import-hf --hf HF_DIR --out DIR`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="write a Hugging Face checkpoint (safetensors)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run: write PEFT's adapter files instead of the merged model")
    p.set_defaults(run=run_export)

    p = sub.add_parser("import-hf", help="read a Hugging Face Llama/Mistral/Qwen2 checkpoint")
    p.add_argument("--hf", required=True, help="local HF model directory (safetensors)")
    p.add_argument("--out", required=True, help="workdir to write our checkpoint into")
    p.set_defaults(run=run_import)


def run_export(args: argparse.Namespace) -> None:
    from codegen_jax.hf import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype, adapter_only=args.adapter_only)
    print(f"wrote {out}")


def run_import(args: argparse.Namespace) -> None:
    from codegen_jax.hf import import_hf

    step_dir = import_hf(args.hf, args.out)
    print(f"wrote {step_dir}")
