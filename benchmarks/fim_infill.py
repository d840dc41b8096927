"""Fill-in-the-middle on held-out code: how often a model's infill makes the file parse again.

For each checkpoint given, held-out Python files (the run's own validation split, never trained on)
each lose 1-3 whole lines inside a function body at a seeded random place; the model gets the
editor's prompt (`<fim_prefix>` + the text before + `<fim_suffix>` + the text after + `<fim_middle>`,
both sides cut to a window around the hole, as `codegen-jax serve` builds it from `suffix`) and fills
the hole greedily until EOS. Reported per checkpoint: the share of cases whose reassembled file
`ast.parse` accepts, and the share whose infill equals the removed lines (whitespace-stripped). Run it
on a model trained with FIM and one trained with `data.fim_rate=0` (same config otherwise).

    python benchmarks/fim_infill.py runs/fim runs/nofim [--cases 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PREFIX_CHARS, SUFFIX_CHARS = 500, 250  # the window an editor would send (the model trained on 256 tokens)


def holes(texts: list[str], n: int, seed: int) -> list[tuple[str, str, str]]:
    """n cases of (before, removed lines, after): 1-3 consecutive indented non-blank lines, spread
    evenly over the files (a validation split has few)."""
    rng = random.Random(seed)
    usable = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        spots = [i for i, line in enumerate(lines) if line.startswith((" ", "\t")) and line.strip()
                 and not line.strip().startswith("#")]
        if len(spots) >= 10:
            usable.append((lines, spots))
    out = []
    while usable and len(out) < n:
        lines, spots = usable[len(out) % len(usable)]
        i, k = rng.choice(spots), rng.randint(1, 3)
        j = i + 1
        while j < len(lines) and j - i < k and lines[j].strip():
            j += 1
        out.append(("".join(lines[:i]), "".join(lines[i:j]), "".join(lines[j:])))
    return out


def evaluate(ckpt: str, n_cases: int, seed: int) -> dict:
    from codegen_jax.data.corpus import load_corpus
    from codegen_jax.sample import Generator

    gen = Generator.from_checkpoint(ckpt)
    tok = gen.tokenizer
    if tok.fim is None:
        raise SystemExit(f"{ckpt}: its tokenizer has no FIM tokens")
    texts = []
    for d in load_corpus(gen.config.data).plain("validation"):
        if not d.path.endswith(".py"):
            continue
        try:
            ast.parse(d.text)
        except (SyntaxError, ValueError):
            continue
        texts.append(d.text)
    cases = holes(texts, n_cases, seed)
    pre, mid, suf = tok.fim.names[:3]
    prompts = [f"{pre}{b[-PREFIX_CHARS:]}{suf}{a[:SUFFIX_CHARS]}{mid}" for b, _, a in cases]
    done = gen.generate(prompts, max_new_tokens=64, temperature=0.0)
    parsed = exact = 0
    for (before, removed, after), [c] in zip(cases, done):
        middle = c.text
        try:
            ast.parse(before + middle + after)
            parsed += 1
        except (SyntaxError, ValueError):
            pass
        exact += middle.strip() == removed.strip()
    return {"checkpoint": ckpt, "fim_rate": gen.config.data.fim_rate, "cases": len(cases),
            "parse_rate": parsed / len(cases),
            "exact_rate": exact / len(cases), "example": {"removed": cases[0][1], "infill": done[0][0].text}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for ckpt in args.checkpoints:
        print(json.dumps(evaluate(ckpt, args.cases, args.seed)), flush=True)


if __name__ == "__main__":
    from codegen_jax.hostenv import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()
    main()
