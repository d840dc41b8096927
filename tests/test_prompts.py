"""Prompts are encoded the way the model's own tokenizer does it: ours BOS + text; an imported one exactly
as `AutoTokenizer.from_pretrained(dir)(text)` (its own BOS or none), in Generator, generate and serve."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from codegen_jax import cli
from codegen_jax.data.tokenizer import load_tokenizer

PROMPT = "def add(a, b):\n    return"


def _foreign_tokenizer(out: Path, add_bos: bool) -> Path:
    """A byte-level BPE with none of our special tokens; with `add_bos` its post-processor puts BOS
    first (as Llama's does), without it adds nothing (as StarCoder's and Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rust.train_from_iterator([textwrap.dedent(transformers.__doc__ or "") + PROMPT * 20], trainer=trainer)
    if add_bos:
        rust.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out


@pytest.mark.parametrize("add_bos", [False, True])
def test_an_imported_tokenizer_encodes_prompts_as_autotokenizer_does(tmp_path, add_bos):
    from codegen_jax.model import create_model
    from codegen_jax.sample import Generator

    from conftest import tiny_config

    path = _foreign_tokenizer(tmp_path / "tok", add_bos)
    tok = load_tokenizer(path)
    assert not tok.own
    hf = transformers.AutoTokenizer.from_pretrained(path)
    gen = Generator(create_model(tiny_config("model.vocab_size=300").model), tok)
    for text in (PROMPT, "x = 1", "<s>two</s> specials"):
        assert gen.prompt_ids(text, 8) == hf(text)["input_ids"]
    assert (gen.prompt_ids(PROMPT, 8)[0] == tok.bos_id) == add_bos


def test_our_tokenizer_puts_bos_first_and_its_export_does_the_same(small_tokenizer, tmp_path):
    from codegen_jax.hf_io import add_bos_by_default

    assert small_tokenizer.own and small_tokenizer.prompt_ids(PROMPT) == [small_tokenizer.bos_id,
                                                                          *small_tokenizer.encode(PROMPT)]
    small_tokenizer.save(tmp_path / "tok")
    add_bos_by_default(tmp_path / "tok" / "tokenizer.json", "<|endoftext|>", small_tokenizer.bos_id)
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert exported(PROMPT)["input_ids"] == small_tokenizer.prompt_ids(PROMPT)


def test_generate_on_an_imported_llama_equals_hf_generate_on_its_tokenizers_ids(tmp_path):
    """The issue's case: GQA 8/2, tied embeddings, rope_theta 5e5, a tokenizer that adds no BOS."""
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5,
                                   tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=0,
                                   eos_token_id=1)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    _foreign_tokenizer(tmp_path / "hf", add_bos=False)
    assert cli.main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "ours"), "--prompts-file", str(tmp_path / "p.jsonl"),
                     "--out", str(tmp_path / "out.jsonl"), "--temperature", "0", "--max-new-tokens", "32",
                     "--stop"]) == 0
    ours = json.loads((tmp_path / "out.jsonl").read_text())
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0] != 0  # no BOS: the convention an imported model must be prompted with
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    theirs = out[0, ids.shape[1]:].tolist()
    if ours["finish_reason"] == "eos":
        theirs = theirs[:theirs.index(1)] if 1 in theirs else theirs
    assert ours["tokens"] == theirs and np.asarray(theirs).size > 0
