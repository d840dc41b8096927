"""The prepared-data format shared by the writer (`shards`, `manifest`) and the reader (`data.prepared`).

A record is one example in `examples`' format, stored as little-endian int32 `[n_masked, tok_0, ...,
tok_n-1]`: its loss_mask is 0 on the first n_masked tokens and 1 after. The tokenizer fingerprint
names what decides token ids. Imports neither datatrove nor grain, so both sides load it cheaply.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "codegen-jax-prepared"
FORMAT_VERSION = 1
KINDS = ("docs", "pairs")
SPLITS = ("train", "validation")


def encode_record(tokens: np.ndarray, loss_mask: np.ndarray) -> bytes:
    """Bytes of one example; its mask must be 0 on a prefix and 1 after (as every example's is)."""
    n_masked = int(np.argmax(loss_mask)) if loss_mask.any() else len(loss_mask)
    if not (loss_mask[n_masked:] == 1).all():
        raise ValueError("loss mask is not a 0-prefix followed by ones")
    return np.concatenate([[n_masked], tokens]).astype("<i4").tobytes()


def decode_record(record: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss_mask) of one record, int32."""
    values = np.frombuffer(record, "<i4")
    tokens = values[1:].astype(np.int32)
    mask = np.ones_like(tokens)
    mask[:int(values[0])] = 0
    return tokens, mask


def tokenizer_fingerprint(tok) -> str:
    """SHA-256 of what decides the token ids of a `CodeTokenizer`: its model, normalizer, pre-tokenizer
    and added tokens (canonical JSON), and the bos/eos/pad/inst/sep ids."""
    spec = json.loads(tok.hf.backend_tokenizer.to_str())
    for volatile in ("truncation", "padding"):
        spec.pop(volatile, None)
    spec["_ids"] = [tok.bos_id, tok.eos_id, tok.pad_id, tok.inst_id, tok.sep_id]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
