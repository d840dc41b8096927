"""DIR/manifest.json: what a prepare run made, from what and how, summed over every task's counts.

Keys: `format`/`version`; `record_format`; `config` (the data settings the shards depend on,
`stages.PREPARE_FIELDS`, and model.vocab_size) and `tasks`; `seq_len`; `tokenizer` (`path` inside DIR, `fingerprint`
(`prepared.tokenizer_fingerprint`), `vocab_size`, special ids); `documents` (seen / kept);
`drops` (every reason with its count: cleaning, `language_excluded`, `duplicate`,
`near_duplicate`, `contaminated`, `prompt_too_long`) and `drop_examples`; `languages` (per
language: documents, tokens, pairs, pair tokens, over both splits, before resampling);
`redactions` (per kind: email, ip_address, key, password); `near_dedup` and `decontamination`
(settings, sources and what they found); `pairs` (mining counts per language); `splits` (per split
and kind: records and tokens as written, and every shard's path, records, tokens and SHA-256); and
`content_hash`, the SHA-256 of all of the above. Nothing in it depends on time or on the executor,
so equal inputs and settings give a byte-identical manifest.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from codegen_jax.data.prepare.store import read_counts, write_json
from codegen_jax.data.prepare.record import (FORMAT, FORMAT_VERSION, KINDS, MANIFEST, SPLITS,
                                            tokenizer_fingerprint)

RECORD_FORMAT = ("little-endian int32 [n_masked, tokens...]; loss_mask is 0 on the first n_masked tokens, "
                 "1 after")
_DROP_STEPS = ("clean", "language", "dedup", "decontam")


def _merge_examples(into: dict[str, list[str]], more: dict[str, list[str]]) -> None:
    for reason, paths in more.items():
        into.setdefault(reason, [])
        into[reason] += paths[:3 - len(into[reason])]


def _drops(root: str) -> tuple[int, collections.Counter, dict[str, list[str]]]:
    """(documents seen, drops by reason, up to 3 example paths per reason) over the document steps."""
    drops: collections.Counter = collections.Counter()
    examples: dict[str, list[str]] = {}
    seen = 0
    for c in read_counts(root, "read"):
        for reason, paths in c["skipped"].items():
            drops[reason] += len(paths)
            seen += len(paths)
            _merge_examples(examples, {reason: paths})
    for step in _DROP_STEPS:
        for c in read_counts(root, step):
            seen += c.get("seen", 0)
            drops.update(c["dropped"])
            _merge_examples(examples, c.get("examples", {}))
    return seen, drops, examples


def _splits(shards: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {s: {k: {"records": 0, "tokens": 0} for k in KINDS} for s in SPLITS}
    for s in SPLITS:
        out[s]["shards"] = sorted((x for x in shards if x["split"] == s), key=lambda x: x["path"])
        for x in out[s]["shards"]:
            out[s][x["kind"]]["records"] += x["records"]
            out[s][x["kind"]]["tokens"] += x["tokens"]
    return out


def _tokenizer(root: str) -> dict[str, Any]:
    from codegen_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(root, "tokenizer"))
    return {"path": "tokenizer", "fingerprint": tokenizer_fingerprint(tok), "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "inst_id": tok.inst_id,
            "sep_id": tok.sep_id}


def build(root: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the finished stages under `root`; `settings` comes from the plan (see `stages`)."""
    seen, drops, examples = _drops(root)
    shard_counts = read_counts(root, "shards")
    langs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    mining: collections.Counter = collections.Counter()
    for c in shard_counts:
        for lang, counts in c["languages"].items():
            langs[lang].update(counts)
        mining.update(c["pairs"])
    drops["prompt_too_long"] += sum(c.pop("prompt_too_long", 0) for c in langs.values())
    pair_skips = sum(c.pop("pair_prompt_too_long", 0) for c in langs.values())
    redactions: collections.Counter = collections.Counter()
    for step in ("secrets", "pii"):
        for c in read_counts(root, step):
            redactions.update(c["redacted"])
    clusters: collections.Counter = collections.Counter()
    for c in read_counts(root, "clusters"):
        clusters.update(c)
    by_source: collections.Counter = collections.Counter()
    for c in read_counts(root, "decontam"):
        by_source.update(c["by_source"])
    languages = {k: {f: langs[k][f] for f in ("documents", "tokens", "pairs", "pair_tokens")} for k in sorted(langs)}
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "record_format": RECORD_FORMAT,
        "config": settings["config"], "tasks": settings["tasks"], "seq_len": settings["seq_len"],
        "tokenizer": _tokenizer(root),
        "documents": {"seen": seen, "kept": sum(v["documents"] for v in languages.values())},
        "drops": dict(sorted((k, v) for k, v in drops.items() if v)),
        "drop_examples": {k: v for k, v in sorted(examples.items()) if drops.get(k)},
        "languages": languages,
        "redactions": {kind: redactions[kind] for kind in ("email", "ip_address", "key", "password")},
        "near_dedup": {**settings["near_dedup"], **dict(sorted(clusters.items()))},
        "decontamination": {**settings["decontamination"], "contaminated": dict(sorted(by_source.items()))},
        "pairs": {"mining": dict(sorted(mining.items())), "skipped_prompt_too_long": pair_skips},
        "splits": _splits([x for c in shard_counts for x in c["shards"]]),
    }
    manifest["content_hash"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return manifest


class WriteManifest(PipelineStep):
    """The last stage (one task): sum every task's counts into DIR/manifest.json."""

    type = "💽 - WRITER"
    name = "📜 manifest"

    def __init__(self, root: str, settings: dict[str, Any]):
        super().__init__()
        self.root, self.settings = root, settings

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        write_json(Path(self.root, MANIFEST), build(self.root, self.settings))
