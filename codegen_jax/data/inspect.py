"""What the data pipeline makes of a config's corpus, as the text `codegen-jax data inspect` prints.

Corpus and cleaning counts, instruction pairs, tokens per document, packing efficiency, and a few
packed rows in which tokens that are not training targets (prompts, first tokens) are shown inside
⟦ ⟧ and special tokens by name.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np

from codegen_jax.config import Config
from codegen_jax.data import examples
from codegen_jax.data.corpus import load_corpus
from codegen_jax.data.pipeline import example_set, make_iterator
from codegen_jax.data.tokenizer import (TRAIN_SAMPLE_BYTES, CodeTokenizer, get_tokenizer, load_tokenizer,
                                        train_tokenizer)

SAMPLE_BYTES = 5_000_000  # tokens-per-document statistics use at most this much text
PACK_BATCHES = 8
SHOW_ROWS = 2
SHOW_CHARS = 400


def _tokenizer(cfg: Config, workdir: str | Path | None) -> tuple[CodeTokenizer, str]:
    if workdir is not None:
        return get_tokenizer(cfg, workdir), f"{Path(workdir) / 'tokenizer'}"
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer
    texts = load_corpus(cfg.data).sample_texts(TRAIN_SAMPLE_BYTES)
    return train_tokenizer(texts, cfg.model.vocab_size), "trained in memory (not saved: pass --workdir)"


def _corpus_report(cfg: Config, out: list[str]) -> None:
    corpus = load_corpus(cfg.data)
    train, val = corpus.split("train"), corpus.split("validation")
    langs = collections.Counter(d.language for d in train + val)
    where = ", ".join(cfg.data.paths) or "the Python standard library"
    out.append(f"corpus: source={cfg.data.source} ({where})")
    out.append(f"  documents: train {len(train)}, validation {len(val)}; languages: "
          + ", ".join(f"{k} {v}" for k, v in langs.most_common(8)))
    out.append("cleaning:")
    out.append(corpus.stats.report())


def _pairs_report(cfg: Config, tok: CodeTokenizer, out: list[str]) -> None:
    if cfg.data.pair_ratio <= 0:
        out.append("instruction pairs: off (data.pair_ratio=0)")
        return
    corpus = load_corpus(cfg.data)
    for split in ("train", "validation"):
        items = example_set(corpus, tok, split, cfg.data.seq_len, cfg.data.pair_ratio)
        out.append(f"instruction pairs ({split}): {len(items.pairs)} used, "
              f"{items.skipped['prompt_too_long']} skipped (prompt > {examples.max_prompt_len(cfg.data.seq_len)} "
              "tokens)")
    mined = {k: v for k, v in sorted(corpus.pair_counts.items())}
    out.append("  mining: " + ", ".join(f"{k}={v}" for k, v in mined.items()))
    out.append(f"  mix: {cfg.data.pair_ratio:.0%} of examples are pairs (data.pair_ratio)")


def _fim_report(cfg: Config, tok: CodeTokenizer, out: list[str]) -> None:
    from codegen_jax.data.pipeline import fim_active

    if fim_active(cfg, tok, "train"):
        out.append(f"fill-in-the-middle: {cfg.data.fim_rate:.0%} of training documents (data.fim_rate), "
                   f"{cfg.data.fim_spm_rate:.0%} of those in SPM order; tokens {', '.join(tok.fim.names)}")
    else:
        why = "data.fim_rate=0" if cfg.data.fim_rate <= 0 else "the tokenizer has no FIM tokens"
        out.append(f"fill-in-the-middle: off ({why})")


def _tokens_report(cfg: Config, tok: CodeTokenizer, out: list[str]) -> None:
    docs, total = [], 0
    for d in load_corpus(cfg.data).plain("train"):
        docs.append(d.text)
        total += len(d.text)
        if total > SAMPLE_BYTES:
            break
    if not docs:
        return
    lengths = np.array([len(ids) + 2 for ids in tok.encode_batch(docs)])
    pieces = np.ceil(lengths / cfg.data.seq_len).astype(int)
    q = np.percentile(lengths, [50, 90, 99])
    out.append(f"tokens per document (first {len(docs)} train documents, {total / lengths.sum():.2f} bytes/token):")
    out.append(f"  mean {lengths.mean():.0f}, median {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, max {lengths.max()}; "
          f"{(lengths > cfg.data.seq_len).mean():.0%} are split into {cfg.data.seq_len}-token pieces "
          f"(mean {pieces.mean():.1f} pieces)")


def _render(tok: CodeTokenizer, ids: list[int]) -> str:
    """Text of `ids` with special tokens written by name."""
    fim = [tok.fim.prefix, tok.fim.middle, tok.fim.suffix, tok.fim.pad] if tok.fim else []
    specials = {tok.bos_id, tok.eos_id, tok.pad_id, tok.inst_id, tok.sep_id, *fim} - {None}
    return "".join("".join(tok.hf.convert_ids_to_tokens(run)) if special else tok.decode(run)
                   for special, run in ((k, list(g)) for k, g in itertools.groupby(ids, specials.__contains__)))


def _render_segment(tok: CodeTokenizer, tokens: np.ndarray, mask: np.ndarray) -> str:
    """Text of one segment: runs that are not training targets inside ⟦ ⟧."""
    parts = []
    for is_target, run in itertools.groupby(zip(tokens.tolist(), mask.tolist()), key=lambda tm: tm[1] > 0):
        text = _render(tok, [t for t, _ in run])
        parts.append(text if is_target else f"⟦{text}⟧")
    out = "".join(parts)
    return out if len(out) <= SHOW_CHARS else out[:SHOW_CHARS] + f" … (+{len(out) - SHOW_CHARS} chars)"


def _rows_to_show(batches: list[dict], tok: CodeTokenizer) -> list[tuple[int, int]]:
    """(batch, row) of a row holding an instruction pair and of one holding a FIM document (if any),
    then rows with the most segments."""
    rows = [(b, r) for b in range(len(batches)) for r in range(batches[b]["tokens"].shape[0])]
    by_segments = sorted(rows, key=lambda br: -int(batches[br[0]]["segment_ids"][br[1]].max()))

    def holding(token_id):
        return [(b, r) for b, r in rows if token_id is not None and (batches[b]["tokens"][r] == token_id).any()]

    fim = holding(tok.fim.prefix) if tok.fim else []
    return list(dict.fromkeys(holding(tok.inst_id)[:1] + fim[:1] + by_segments))[:SHOW_ROWS + bool(fim)]


def _row_report(tok: CodeTokenizer, b: dict, name: str, row: int, out: list[str]) -> None:
    n_seg = int(b["segment_ids"][row].max())
    out.append(f"--- {name}: {n_seg} segments, {int(np.count_nonzero(b['segment_ids'][row] == 0))} padding tokens")
    for s in range(1, n_seg + 1):
        idx = b["segment_ids"][row] == s
        out.append(f"[segment {s}: {int(idx.sum())} tokens, positions 0..{int(b['positions'][row][idx].max())}]")
        out.append(_render_segment(tok, b["tokens"][row][idx], b["loss_mask"][row][idx]))


def _packing_report(cfg: Config, tok: CodeTokenizer, out: list[str]) -> None:
    it = make_iterator(cfg, tok, batch_size=cfg.train.batch_size)
    batches = list(itertools.islice(it, PACK_BATCHES))
    seg = np.concatenate([b["segment_ids"] for b in batches])
    used = np.count_nonzero(seg) / seg.size
    targets = sum(int(b["loss_mask"].sum()) for b in batches) / seg.shape[0]
    out.append(f"packing ({cfg.data.pack}, first {len(batches)} batches of {cfg.train.batch_size}x{cfg.data.seq_len}):")
    out.append(f"  efficiency {used:.2%} (padding {1 - used:.2%}), {seg.max(axis=1).mean():.1f} segments per row, "
          f"{targets:.0f} target tokens per row")
    out.append("packed rows (⟦…⟧ = not a training target, loss_mask 0):")
    for b, row in _rows_to_show(batches, tok):
        _row_report(tok, batches[b], f"batch {b} row {row}", row, out)


def inspect_data(cfg: Config, workdir: str | Path | None = None) -> str:
    """The corpus, cleaning, pair, token and packing report for `cfg`."""
    out: list[str] = []
    _corpus_report(cfg, out)
    tok, where = _tokenizer(cfg, workdir)
    out.append(f"tokenizer: {tok.vocab_size} tokens, {where}")
    _pairs_report(cfg, tok, out)
    _fim_report(cfg, tok, out)
    _tokens_report(cfg, tok, out)
    _packing_report(cfg, tok, out)
    return "\n".join(out)
