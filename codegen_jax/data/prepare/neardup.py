"""Exact and near deduplication across all tasks, on datatrove's MinHash stages.

1. `CodeMinhashSignature` (every clean task): datatrove's stage-1 signatures over 5-gram shingles of
   normalized code (datatrove's `simplify_text`: lower case, punctuation -> spaces, so whitespace,
   layout and punctuation do not matter; digits are kept, as in BigCode's tokenization), one
   shingle for documents shorter than 5 words. Besides datatrove's
   per-band files it keeps each document's full signature and a BLAKE2 digest of its text, in the
   task's document order.
2. `MinhashDedupBuckets` (datatrove, one task per band): candidate pairs, documents equal in a band.
   Bands x rows are chosen for data.near_dup_threshold as datasketch does (`lsh_params`).
3. `DedupClusters` (one task): a candidate pair is an exact duplicate when the digests match, a near
   duplicate when the share of equal signature values (the Jaccard estimate) is >= the threshold;
   other candidates are rejected. Clusters are the connected components; the first member (by task,
   then document index) is kept. Members with the kept one's text are `duplicate`; in every other
   group of equal texts the first is `near_duplicate` and the rest `duplicate`. Exact duplicates
   collide in every band, so they are always found (also with data.near_dedup=false).
4. `DedupFilter` (every filter task): drops what the clusters chose, with its reason.
"""

from __future__ import annotations

import collections
import hashlib
import json
import struct

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from codegen_jax.data.prepare.store import replace_atomically, work_path, write_counts, write_json

NUM_PERM = 128  # signature values per document (bands * rows of them are used)
N_GRAMS = 5
DIGEST_BYTES = 16
_NORM = TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=True,
                       norm_unicode_diacritics=False, norm_numbers=False)


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band), bands * rows <= num_perm, minimizing the equal-weighted false positive and
    false negative probability mass around `threshold` (datasketch's MinHashLSH rule)."""
    def area(f, lo, hi):
        s = np.linspace(lo, hi, 101)
        return float(np.sum((f(s[1:]) + f(s[:-1])) / 2 * np.diff(s)))

    best = (np.inf, 1, 1)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = area(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = area(lambda s: (1 - s ** r) ** b, threshold, 1.0)
            best = min(best, (0.5 * fp + 0.5 * fn, b, r))
    return best[1], best[2]


def minhash_config(threshold: float) -> MinhashConfig:
    bands, rows = lsh_params(threshold)
    return MinhashConfig(n_grams=N_GRAMS, num_buckets=bands, hashes_per_bucket=rows, seed=1, norm_config=_NORM,
                         hash_config=HashConfig(precision=32, hash_fc="xxhash"))


_WORD_CACHE = 1 << 20  # distinct words kept hashed per task
_POSITION = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                      0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x2545F4914F6CDD1D, 0x27BB2EE687B0B0FD],
                     dtype=np.uint64)[:N_GRAMS]  # odd multipliers, one per position in a window


def _word_hash(word: str) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(word.encode("utf-8", "surrogatepass"))


def digest(text: str, prompt: str | None = None) -> bytes:
    key = text if prompt is None else f"{prompt}\x00{text}"
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES).digest()


class _CodeWords(WordTokenizer):
    """Words of `simplify_text` output: it already split punctuation into spaces."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def _paths(root: str) -> dict[str, str]:
    return {k: str(work_path(root, "minhash", k)) for k in ("sigs", "dups", "full", "digests", "remove")}


class CodeMinhashSignature(MinhashDedupSignature):
    """datatrove's stage-1 signatures on code shingles, plus full signatures and text digests."""

    name = "🎯 MinHash signatures (code)"

    def __init__(self, root: str, config: MinhashConfig):
        super().__init__(output_folder=_paths(root)["sigs"], config=config, language=_CodeWords())
        self.root = root
        self._row: np.ndarray | None = None
        self._words: dict[str, int] = {}

    def get_shingles(self, text: str) -> np.ndarray:
        """uint64 [n, 1] hashes (< 2**32, as datatrove's) of the 5-word windows of normalized `text`.

        Vectorized: each distinct word is hashed once (xxh64, cached per task), and a window's hash is a
        mix of its words' hashes weighted by position, so the hot loop is numpy rather than one Python
        join + hash per window (3x faster on the stdlib)."""
        words = simplify_text(text, self.config.norm_config).split()
        if not words:
            return np.zeros((0, 1), np.uint64)
        cache = self._words
        if len(cache) > _WORD_CACHE:
            cache.clear()
        h = np.fromiter((cache[w] if w in cache else cache.setdefault(w, _word_hash(w)) for w in words),
                        dtype=np.uint64, count=len(words))
        n = min(self.config.n_grams, len(h))
        windows = len(h) - n + 1
        x = np.zeros(windows, np.uint64)
        for k in range(n):  # uint64 arithmetic wraps: a polynomial hash of the window
            x += h[k:k + windows] * _POSITION[k]
        x ^= x >> np.uint64(31)  # splitmix64's finalizer: every input bit reaches the top 32 kept below
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return (x >> np.uint64(32)).reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        sig = super().get_signature(shingles)
        self._row = np.asarray(sig, np.uint32).reshape(-1)
        return sig

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        paths = {k: work_path(self.root, "minhash", k, f"{rank:05d}.bin") for k in ("full", "digests")}
        tmp = {k: p.with_name(f".{p.name}.tmp") for k, p in paths.items()}
        for p in tmp.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        empty = np.zeros(self.num_hashes, np.uint32)
        with open(tmp["full"], "wb") as full, open(tmp["digests"], "wb") as digests:
            def tap():
                for doc in data:
                    self._row = None
                    digests.write(digest(doc.text, doc.metadata.get("prompt")))
                    yield doc
                    # back here once the parent step has signed `doc` (no row: it had no words)
                    full.write((empty if self._row is None else self._row).tobytes())

            super().run(tap(), rank, world_size)
        for k in paths:
            replace_atomically(tmp[k], paths[k])


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        self.parent.setdefault(ra, ra)
        self.parent.setdefault(rb, rb)
        if ra != rb:  # the smaller node roots the merged set
            self.parent[max(ra, rb)] = min(ra, rb)


def _read_pairs(dups_dir: str) -> set[tuple[int, int, int, int]]:
    from pathlib import Path

    pairs = set()
    for f in sorted(Path(dups_dir).glob("*.dups")):
        data = f.read_bytes()
        pairs.update(struct.iter_unpack("<4I", data))
    return pairs


class DedupClusters(PipelineStep):
    """Stage 3, one task: verify candidate pairs, cluster, choose what each task drops and why."""

    type = "🫂 - DEDUP"
    name = "🎯 clusters (exact + near)"

    def __init__(self, root: str, config: MinhashConfig, threshold: float, near: bool):
        super().__init__()
        self.root, self.config, self.threshold, self.near = root, config, threshold, near

    def _arrays(self, kind: str, rank: int) -> np.ndarray:
        path = work_path(self.root, "minhash", kind, f"{rank:05d}.bin")
        width = DIGEST_BYTES if kind == "digests" else self.config.num_buckets * self.config.hashes_per_bucket
        dtype = np.uint8 if kind == "digests" else np.uint32
        if path.stat().st_size == 0:
            return np.zeros((0, width), dtype)
        return np.memmap(path, dtype, mode="r").reshape(-1, width)  # paged in as pairs need rows

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        cache: dict[tuple[str, int], np.ndarray] = {}

        def row(kind, f, d):
            if (kind, f) not in cache:
                cache[kind, f] = self._arrays(kind, f)
            return cache[kind, f][d]

        uf, counts = _UnionFind(), collections.Counter()
        for f1, d1, f2, d2 in sorted(_read_pairs(_paths(self.root)["dups"])):
            counts["candidate_pairs"] += 1
            exact = bool((row("digests", f1, d1) == row("digests", f2, d2)).all())
            similar = exact or float(np.mean(row("full", f1, d1) == row("full", f2, d2))) >= self.threshold
            if exact or (self.near and similar):
                uf.union((f1, d1), (f2, d2))
            else:
                counts["rejected_pairs"] += 1
        clusters: dict = collections.defaultdict(list)
        for node in list(uf.parent):
            clusters[uf.find(node)].append(node)
        remove: dict[int, dict[str, list[int]]] = collections.defaultdict(lambda: {"duplicate": [], "near_duplicate": []})
        for members in clusters.values():
            counts["clusters"] += 1
            seen: set[bytes] = set()
            for i, (f, d) in enumerate(sorted(members)):
                text_id = row("digests", f, d).tobytes()
                if i > 0:
                    remove[f]["duplicate" if text_id in seen else "near_duplicate"].append(d)
                seen.add(text_id)
        for f, reasons in remove.items():
            write_json(work_path(self.root, "minhash", "remove", f"{f:05d}.json"), {k: sorted(v) for k, v in reasons.items()})
        write_counts(self.root, "clusters", 0, dict(counts))


class DedupFilter(PipelineStep):
    """Drop the documents `DedupClusters` chose for this task (`duplicate` / `near_duplicate`)."""

    type = "🫂 - DEDUP"
    name = "🎯 dedup filter"

    def __init__(self, root: str):
        super().__init__()
        self.root = root

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = work_path(self.root, "minhash", "remove", f"{rank:05d}.json")
        reasons = json.loads(path.read_text()) if path.is_file() else {}
        drop = {d: reason for reason, docs in reasons.items() for d in docs}
        dropped: collections.Counter = collections.Counter()
        examples: dict[str, list[str]] = {}
        for i, doc in enumerate(data):
            if i in drop:
                dropped[drop[i]] += 1
                ex = examples.setdefault(drop[i], [])
                if len(ex) < 3:
                    ex.append(doc.metadata["path"])
                self.stat_update(f"dropped_{drop[i]}")
                continue
            yield doc
        write_counts(self.root, "dedup", rank, {"dropped": dict(dropped), "examples": examples})
