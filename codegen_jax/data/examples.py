"""Training examples as tokens: encode documents and instruction pairs, then cut them into rows.

An example is `(tokens, loss_mask)`, two int32 arrays of equal length; `loss_mask[t]` is 1 where
token t is a training target (the train step predicts token t+1 at position t, weighted by
`loss_mask[t+1]`).

- plain document: `[bos] + encode(text) + [eos]`, loss_mask 1 except on bos;
- instruction pair: `[bos, inst] + encode(instruction) + [sep]` with loss_mask 0, then
  `encode(code) + [eos]` with loss_mask 1 (a foreign tokenizer without inst/sep leaves them out);
- chat (`Chat`, OpenAI-style role/content turns): `chat_example`, the loss on assistant turns only;
- fill-in-the-middle document (`FimDoc`, a document cut at two points): `[bos]` + the pieces in PSM
  or SPM order with the FIM tokens (`FimTokens.psm` / `.spm`) + `[eos]`, loss_mask 1 except on bos:
  the loss covers every token of a FIM example, as in Bavarian et al. 2022.

Examples longer than `seq_len` are split into `seq_len` pieces, never dropped. Every piece becomes
its own packed segment, so the first token of each piece has no predecessor in its segment: its
mask is 0, which makes the mask alone enough to keep the loss inside segments.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from codegen_jax.data.tokenizer import CodeTokenizer
from codegen_jax.errors import UserError

Example = tuple[np.ndarray, np.ndarray]  # (tokens, loss_mask), int32


class Chat(NamedTuple):
    """A chat row's (role, content) turns; the loss covers the assistant turns only."""

    turns: tuple[tuple[str, str], ...]


class FimDoc(NamedTuple):
    """A document split into prefix / middle / suffix, to be written in PSM or SPM order."""

    prefix: str
    middle: str
    suffix: str
    spm: bool


def fim_split(text: str, rng: np.random.Generator, spm_rate: float) -> FimDoc:
    """Cut `text` at two uniformly random character positions (BigCode Megatron's `permute`)."""
    a, b = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return FimDoc(text[:a], text[a:b], text[b:], bool(rng.random() < spm_rate))


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


def fim_example(tok: CodeTokenizer, doc: FimDoc, ids: list[list[int]]) -> Example:
    """(tokens, loss_mask) of a FIM document from its encoded (prefix, middle, suffix)."""
    prefix, middle, suffix = ids
    body = tok.fim.spm(prefix, suffix, middle) if doc.spm else tok.fim.psm(prefix, suffix, middle)
    tokens = np.array([tok.bos_id, *body, tok.eos_id], np.int32)
    mask = np.ones_like(tokens)
    mask[0] = 0
    return tokens, mask


def fim_tokens(tok: CodeTokenizer, example: Example, rng: np.random.Generator, spm_rate: float) -> Example:
    """A tokenized document (`document_example`) as a FIM example, cut at two random token positions:
    what `fim_split` does to text, for data that is already token ids (prepared shards)."""
    tokens = example[0]
    content = tokens[1:-1].tolist()
    a, b = sorted(int(x) for x in rng.integers(0, len(content) + 1, size=2))
    prefix, middle, suffix = content[:a], content[a:b], content[b:]
    body = tok.fim.spm(prefix, suffix, middle) if rng.random() < spm_rate else tok.fim.psm(prefix, suffix, middle)
    out = np.array([tokens[0], *body, tokens[-1]], np.int32)
    mask = np.ones_like(out)
    mask[0] = 0
    return out, mask


def chat_example(tok: CodeTokenizer, chat: Chat) -> Example:
    """(tokens, loss_mask) of a chat: through the tokenizer's `chat_template` when it has one (an
    imported tokenizer: its own format, tokenized as `AutoTokenizer` does, the mask over each assistant
    turn's span of the rendered text, end-of-turn marker included), else in our format, the pair
    format over several turns: bos, then `inst` + system/user text + `sep` per turn to answer, then the
    assistant text + eos (the targets)."""
    if getattr(tok.hf, "chat_template", None):
        return _templated_chat(tok, chat)
    if not tok.own:
        raise UserError("chat rows need a tokenizer with a chat_template (this imported one has none), or "
                        "one of ours; set data.tokenizer to such a tokenizer")
    texts = [text for _, text in chat.turns]
    ids_per_turn = tok.encode_batch(texts)
    tokens, mask, asked = [tok.bos_id], [0], False
    for (role, _), ids in zip(chat.turns, ids_per_turn):
        if role == "assistant":
            if asked:
                tokens.append(tok.sep_id)
                mask.append(0)
            tokens += [*ids, tok.eos_id]
            mask += [1] * (len(ids) + 1)
            asked = False
        else:  # a turn to answer; one after another (system, then user) apart by a blank line
            head = tok.encode("\n\n") if asked else [tok.inst_id]
            tokens += head + ids
            mask += [0] * (len(head) + len(ids))
            asked = True
    return np.array(tokens, np.int32), np.array(mask, np.int32)


def _templated_chat(tok: CodeTokenizer, chat: Chat) -> Example:
    """The chat rendered by the template; each assistant turn's span found by rendering the chat up to
    it (with the generation prompt) and through it, which must be prefixes of the whole."""
    import jinja2

    messages = [{"role": r, "content": t} for r, t in chat.turns]
    spans = []
    try:
        text = tok.hf.apply_chat_template(messages, tokenize=False)
        for k, (role, _) in enumerate(chat.turns):
            if role == "assistant":
                before = tok.hf.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
                through = tok.hf.apply_chat_template(messages[:k + 1], tokenize=False)
                if not (text.startswith(before) and text.startswith(through)):
                    raise UserError("the tokenizer's chat_template renders earlier turns differently once later "
                                    "ones follow, so the assistant turns cannot be located for the loss mask; "
                                    "use a tokenizer whose template only appends")
                spans.append((len(before), len(through)))
    except jinja2.TemplateError as e:
        raise UserError(f"the tokenizer's chat_template refuses a chat row ({e}); fix the row or the template") from None
    enc = tok.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a and b <= e for s, e in spans) and b > a) for a, b in enc["offset_mapping"]]
    return np.array(enc["input_ids"], np.int32), np.array(mask, np.int32)


def encode_batch(tok: CodeTokenizer, items: list) -> list[Example]:
    """Examples for a batch of items: a str is a document, a `FimDoc` a FIM document, a tuple an
    (instruction, code) pair.

    All texts go through one batched tokenizer call (Rust, parallel, outside the GIL).
    """
    texts: list[str] = []
    for item in items:
        if isinstance(item, FimDoc):
            texts.extend((item.prefix, item.middle, item.suffix))
        elif not isinstance(item, Chat):
            texts.extend(item if isinstance(item, tuple) else (item,))
    ids = iter(tok.encode_batch(texts))
    out = []
    for item in items:
        if isinstance(item, Chat):
            out.append(chat_example(tok, item))
        elif isinstance(item, FimDoc):
            out.append(fim_example(tok, item, [next(ids), next(ids), next(ids)]))
        elif isinstance(item, tuple):
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
