"""Training examples as tokens: encode documents and instruction pairs, then cut them into rows.

An example is `(tokens, loss_mask)`, two int32 arrays of equal length; `loss_mask[t]` is 1 where
token t is a training target (the train step predicts token t+1 at position t, weighted by
`loss_mask[t+1]`).

- plain document: `[bos] + encode(text) + [eos]`, loss_mask 1 except on bos;
- instruction pair: `[bos, inst] + encode(instruction) + [sep]` with loss_mask 0, then
  `encode(code) + [eos]` with loss_mask 1 (a foreign tokenizer without inst/sep leaves them out).

Examples longer than `seq_len` are split into `seq_len` pieces, never dropped. Every piece becomes
its own packed segment, so the first token of each piece has no predecessor in its segment: its
mask is 0, which makes the mask alone enough to keep the loss inside segments.
"""

from __future__ import annotations

import numpy as np

from codegen_jax.data.tokenizer import CodeTokenizer

Example = tuple[np.ndarray, np.ndarray]  # (tokens, loss_mask), int32


def wrap_prompt(tok: CodeTokenizer, instruction_ids: list[int]) -> list[int]:
    """Token ids of the non-target part of a pair: bos, inst, the instruction, sep."""
    head = [tok.bos_id] + ([tok.inst_id] if tok.inst_id is not None else [])
    tail = [tok.sep_id] if tok.sep_id is not None else []
    return head + instruction_ids + tail


def max_prompt_len(seq_len: int) -> int:
    """Longest prompt a pair may have: it must leave at least half of a row to its completion."""
    return max(seq_len // 2, 1)


def document_example(tok: CodeTokenizer, text: str, ids: list[int] | None = None) -> Example:
    """(tokens, loss_mask) of a plain document; `ids` = precomputed `tok.encode(text)`."""
    ids = tok.encode(text) if ids is None else ids
    tokens = np.array([tok.bos_id, *ids, tok.eos_id], np.int32)
    mask = np.ones_like(tokens)
    mask[0] = 0
    return tokens, mask


def pair_example(tok: CodeTokenizer, prompt: list[int], code_ids: list[int]) -> Example:
    """(tokens, loss_mask) of an instruction pair from its prompt ids and encoded code."""
    tokens = np.array([*prompt, *code_ids, tok.eos_id], np.int32)
    mask = np.zeros_like(tokens)
    mask[len(prompt):] = 1
    return tokens, mask


def encode_batch(tok: CodeTokenizer, items: list[str | tuple[str, str]]) -> list[Example]:
    """Examples for a batch of items: a str is a document, a tuple an (instruction, code) pair.

    All texts go through one batched tokenizer call (Rust, parallel, outside the GIL).
    """
    texts: list[str] = []
    for item in items:
        texts.extend(item if isinstance(item, tuple) else (item,))
    ids = iter(tok.encode_batch(texts))
    out = []
    for item in items:
        if isinstance(item, tuple):
            prompt = wrap_prompt(tok, next(ids))
            out.append(pair_example(tok, prompt, next(ids)))
        else:
            out.append(document_example(tok, item, next(ids)))
    return out


def split_rows(example: Example, seq_len: int) -> list[dict[str, np.ndarray]]:
    """Pieces of at most `seq_len` tokens; each piece's first token is not a target."""
    tokens, mask = example
    pieces = []
    for start in range(0, len(tokens), seq_len):
        piece_mask = mask[start:start + seq_len].copy()
        piece_mask[0] = 0
        pieces.append({"tokens": tokens[start:start + seq_len], "loss_mask": piece_mask})
    return pieces
