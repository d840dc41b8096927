"""The code tokenizer: train a byte-level BPE, save/load it as an HF tokenizer, and wrap it.

`CodeTokenizer` is the one tokenizer type the rest of the stack sees. It wraps a
`transformers.PreTrainedTokenizerFast` (`.hf`, what HF export saves) and encodes through its own copy
of the Rust tokenizer, with special-token strings inside text encoded as plain text, so that
`decode(encode(x)) == x` holds for every UTF-8 string.

Our special tokens: `<|endoftext|>` (BOS and EOS, GPT-2 style), `<|pad|>`, `<|inst|>` (starts an
instruction), `<|code|>` (separates instruction from code), and the fill-in-the-middle tokens under
StarCoder's names (`<fim_prefix>`, `<fim_middle>`, `<fim_suffix>`, `<fim_pad>`), so editor templates
work unchanged. Imported tokenizers with StarCoder's or Qwen's (`<|fim_prefix|>`...) FIM tokens are
recognised too (`CodeTokenizer.fim`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from codegen_jax import storage
from codegen_jax.errors import UserError

if TYPE_CHECKING:
    from codegen_jax.config import Config

EOT = "<|endoftext|>"
PAD = "<|pad|>"
INST = "<|inst|>"
CODE = "<|code|>"
FIM_TOKENS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>")  # StarCoder's names
QWEN_FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")
SPECIAL_TOKENS = (EOT, PAD, INST, CODE, *FIM_TOKENS)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the specials
TRAIN_SAMPLE_BYTES = 8_000_000  # get_tokenizer trains on at most this much text


@dataclasses.dataclass(frozen=True)
class FimTokens:
    """A tokenizer's fill-in-the-middle tokens: their ids and their text (the names in the vocabulary)."""

    prefix: int
    middle: int
    suffix: int
    pad: int | None
    names: tuple[str, str, str, str]

    def psm(self, prefix: list[int], suffix: list[int], middle: list[int]) -> list[int]:
        """Prefix-suffix-middle order: <prefix> P <suffix> S <middle> M."""
        return [self.prefix, *prefix, self.suffix, *suffix, self.middle, *middle]

    def spm(self, prefix: list[int], suffix: list[int], middle: list[int]) -> list[int]:
        """Suffix-prefix-middle order in BigCode's variant: <prefix> <suffix> S <middle> P M (prefix and
        middle stay contiguous, so a model continues the prefix into the middle)."""
        return [self.prefix, self.suffix, *suffix, self.middle, *prefix, *middle]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_CHARS = {c: b for b, c in _bytes_to_unicode().items()}


class CodeTokenizer:
    """A fast HF tokenizer plus the ids the data pipeline and sampler need."""

    def __init__(self, hf):
        from tokenizers import Tokenizer

        self.hf = hf
        # A private copy of the Rust tokenizer: encode specials-in-text as text, never as control tokens.
        self._rust = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        self._rust.encode_special_tokens = True
        self._rust.no_padding()
        self._rust.no_truncation()
        self._special_ids = frozenset(int(i) for i in hf.all_special_ids)
        self._special_ids |= {int(i) for i, t in hf.added_tokens_decoder.items() if t.special}
        self.bos_id, self.eos_id, self.pad_id = self._resolve_bos_eos_pad()
        self.inst_id = self._token_id(INST)
        self.sep_id = self._token_id(CODE)
        # one of ours (trained by `train_tokenizer`): prompts are BOS + text; any other follows its own
        # convention (see `prompt_ids`)
        self.own = self.inst_id is not None and self.sep_id is not None and self._token_id(EOT) is not None
        self.fim = self._find_fim()
        self._fim_re = re.compile("|".join(map(re.escape, self.fim.names))) if self.fim else None
        self._decode_skip = self._special_ids | {self.bos_id, self.eos_id, self.pad_id}

    def _find_fim(self) -> FimTokens | None:
        for names in (FIM_TOKENS, QWEN_FIM_TOKENS):
            ids = [self._token_id(n) for n in names]
            if None not in ids[:3]:
                return FimTokens(ids[0], ids[1], ids[2], ids[3], names)
        return None

    def _token_id(self, token: str) -> int | None:
        tid = self._rust.token_to_id(token)
        return None if tid is None else int(tid)

    def _resolve_bos_eos_pad(self) -> tuple[int, int, int]:
        """Our specials when present; else the tokenizer's own bos/eos, pad falling back to eos."""
        hf = self.hf
        eot = self._token_id(EOT)
        bos = eot if eot is not None else hf.bos_token_id
        eos = eot if eot is not None else hf.eos_token_id
        bos = eos if bos is None else bos
        eos = bos if eos is None else eos
        if bos is None:
            raise UserError("tokenizer has neither a bos nor an eos token; set one in its tokenizer_config.json")
        pad = self._token_id(PAD)
        pad = hf.pad_token_id if pad is None else pad
        pad = eos if pad is None else pad
        return int(bos), int(eos), int(pad)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self._rust.encode(text, add_special_tokens=False).ids

    def encode_with_fim(self, text: str) -> list[int]:
        """`encode`, except that FIM token strings written in the text (`<fim_prefix>` ...) become their
        single ids: how an editor's FIM prompt reaches the model."""
        if self._fim_re is None:
            return self.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._fim_re.finditer(text):
            ids += self.encode(text[pos:m.start()]) if m.start() > pos else []
            ids.append(self._token_id(m.group(0)))
            pos = m.end()
        return ids + (self.encode(text[pos:]) if pos < len(text) else [])

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt as the model was trained to see it. Ours: BOS + the text (special strings in it as
        plain text, FIM tokens as themselves). An imported tokenizer: exactly what
        `AutoTokenizer.from_pretrained(dir)(text)` gives, its own special tokens and BOS or not (StarCoder's
        and Qwen's add none, Llama's adds BOS). Never empty: an empty prompt is BOS alone."""
        if self.own:
            ids = [self.bos_id, *self.encode_with_fim(text)]
        else:
            ids = list(self.hf(text)["input_ids"])
        return ids or [self.bos_id]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust)."""
        return [e.ids for e in self._rust.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, with pad and other special tokens left out."""
        ids = [int(i) for i in ids if int(i) not in self._decode_skip]
        return self._rust.decode(ids, skip_special_tokens=False)

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json, loadable by `AutoTokenizer.from_pretrained`."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out_dir))
        _portable_config(Path(out_dir) / "tokenizer_config.json")

    def token_byte_lengths(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each id decodes to (0 for special tokens), for bits/byte."""
        out = np.zeros(self.vocab_size, np.int32)
        byte_level = _is_byte_level(self._rust)
        for token, tid in self._rust.get_vocab(with_added_tokens=True).items():
            if tid < self.vocab_size and tid not in self._decode_skip:
                out[tid] = _token_bytes(token, byte_level)
        return out


def _portable_config(path: Path) -> None:
    """Name the generic fast tokenizer class (also known to transformers 4.x loaders, vLLM, TGI)."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra is not None:
        cfg["extra_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _is_byte_level(rust_tokenizer) -> bool:
    """True when the decoder maps each vocabulary character back to one byte (GPT-2 style)."""
    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        return isinstance(node, list) and any(has(v) for v in node)

    return has(json.loads(rust_tokenizer.to_str()).get("decoder"))


def _token_bytes(token: str, byte_level: bool) -> int:
    """Byte length of one vocabulary entry: byte-level BPE, SentencePiece byte-fallback, or plain text."""
    if byte_level and all(c in _BYTE_CHARS for c in token):
        return len(token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return 1
    return len(token.replace("\u2581", " ").encode("utf-8"))


def _wrap(rust_tokenizer) -> CodeTokenizer:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=rust_tokenizer, bos_token=EOT, eos_token=EOT, pad_token=PAD,
        extra_special_tokens=[INST, CODE, *FIM_TOKENS], clean_up_tokenization_spaces=False,
        model_max_length=1 << 30)
    return CodeTokenizer(hf)


def _new_bpe():
    """An untrained byte-level BPE: digits split one by one, whitespace runs kept as tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        # GPT-2's regex: `\s+(?!\S)` keeps indentation runs together.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None) -> CodeTokenizer:
    """Train a byte-level BPE with our special tokens on `texts`; save it to `out_dir` if given."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB}")
    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, max_token_length=32)
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    code_tok = _wrap(tok)
    if out_dir is not None:
        code_tok.save(out_dir)
    return code_tok


def _batches(texts: Iterable[str], n: int = 256) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, n)):
        yield batch


def load_tokenizer(path: str | Path) -> CodeTokenizer:
    """Load our saved tokenizer or any HF tokenizer directory (a local path or a gs:// / s3:// URL,
    never the hub)."""
    from transformers import AutoTokenizer

    p = storage.local_copy(path)
    if not p.is_dir():
        raise UserError(f"tokenizer directory not found: {p}")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise UserError(f"{p} is not a tokenizer directory: it has no tokenizer.json or tokenizer_config.json")
    try:
        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"cannot load tokenizer from {p}: {str(e).splitlines()[0]}") from None
    if not hasattr(hf, "backend_tokenizer"):
        raise UserError(f"tokenizer at {p} has no fast (tokenizer.json) backend; convert it to a fast tokenizer")
    return CodeTokenizer(hf)


def get_tokenizer(cfg: Config, workdir: str | Path) -> CodeTokenizer:
    """`cfg.data.tokenizer` if set; else WORKDIR/tokenizer, trained on the corpus the first time."""
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
    else:
        out = storage.path(workdir) / "tokenizer"
        if (out / "tokenizer.json").is_file():
            tok = load_tokenizer(out)
        else:
            from codegen_jax.data.corpus import load_corpus

            corpus = load_corpus(cfg.data)
            tok = train_tokenizer(corpus.sample_texts(TRAIN_SAMPLE_BYTES), cfg.model.vocab_size)
            _save_atomically(tok, out)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"set model.vocab_size>={tok.vocab_size}")
    return tok


def _save_atomically(tok: CodeTokenizer, out: Any) -> None:
    """Save into a temporary sibling then rename, so a crash never leaves a half-written tokenizer.
    At a URL (no rename): upload the files with tokenizer.json, the one `get_tokenizer` looks for, last."""
    if storage.is_url(out):
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(tmp)
            files = sorted(Path(tmp).iterdir(), key=lambda f: f.name == "tokenizer.json")
            for f in files:
                storage.copy_file(f, out / f.name)
        return
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tok.save(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
