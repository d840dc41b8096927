"""Tokenizer: training, exact round trip, HF save/load, foreign tokenizers, get_tokenizer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen_jax.config import Config, DataConfig
from codegen_jax.data import tokenizer as T
from codegen_jax.errors import UserError

CODE = "def f(x):\n\tif x > 10:\n        return [i * 2 for i in range(x)]  # ok\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_round_trip_any_text(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([T.EOT, T.PAD, T.INST, T.CODE, "x", " ", "\n", "    ", "é", "123"])).map("".join))
def test_special_token_strings_in_text_are_plain_text(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    specials = {small_tokenizer.eos_id, small_tokenizer.pad_id, small_tokenizer.inst_id, small_tokenizer.sep_id}
    assert not specials & set(ids)
    assert small_tokenizer.decode(ids) == text


def test_special_ids_and_decode_skips_them(small_tokenizer):
    tok = small_tokenizer
    assert tok.bos_id == tok.eos_id == 0 and (tok.pad_id, tok.inst_id, tok.sep_id) == (1, 2, 3)
    assert tok.vocab_size == 512
    ids = tok.encode(CODE)
    assert tok.decode([tok.bos_id, tok.inst_id, *ids, tok.sep_id, tok.eos_id, tok.pad_id]) == CODE


def test_digits_split_and_indentation_runs_are_tokens(small_tokenizer):
    tok = small_tokenizer.hf
    pieces = tok.convert_ids_to_tokens(small_tokenizer.encode("x = 12345\n        y"))
    assert [p for p in pieces if p.isdigit()] == list("12345")
    # A newline plus its indentation run is a single token (byte-level: Ċ = "\n", Ġ = " ").
    assert any(p.startswith("Ċ") and set(p[1:]) == {"Ġ"} and len(p) >= 4 for p in pieces), pieces


def test_token_byte_lengths_sum_to_text_bytes(small_tokenizer):
    lengths = small_tokenizer.token_byte_lengths()
    assert lengths.shape == (small_tokenizer.vocab_size,) and lengths.dtype == np.int32
    assert lengths[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]
    for text in (CODE, "ünïcödé → 😀\n"):
        assert lengths[small_tokenizer.encode(text)].sum() == len(text.encode())


def test_saved_tokenizer_loads_with_auto_tokenizer(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    small_tokenizer.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (T.EOT, T.EOT, T.PAD)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (T.EOT, T.EOT, T.PAD)
    assert hf.encode(CODE, add_special_tokens=False) == small_tokenizer.encode(CODE)
    loaded = T.load_tokenizer(tmp_path / "tok")
    assert loaded.encode(CODE) == small_tokenizer.encode(CODE)
    assert (loaded.inst_id, loaded.sep_id, loaded.vocab_size) == (2, 3, 512)


def _foreign(tmp_path, **specials):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    rust = Tokenizer(models.BPE(vocab, [("a", "b")]))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=rust, **specials).save_pretrained(str(tmp_path))
    return T.load_tokenizer(tmp_path)


def test_foreign_tokenizer_maps_bos_eos_pad(tmp_path):
    tok = _foreign(tmp_path / "a", bos_token="<s>", eos_token="</s>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)  # pad falls back to eos
    assert tok.inst_id is None and tok.sep_id is None
    assert tok.encode("ab") == [4] and tok.token_byte_lengths().tolist() == [0, 0, 1, 1, 2]
    only_eos = _foreign(tmp_path / "b", eos_token="</s>")
    assert only_eos.bos_id == only_eos.eos_id == only_eos.pad_id == 1


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        T.load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="not a tokenizer directory"):
        T.load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="too small"):
        T.train_tokenizer(["abc"], 100)


def _cfg(corpus, vocab: int, tokenizer: str = "") -> Config:
    cfg = Config()
    cfg.data = DataConfig(source="files", paths=[str(corpus)], tokenizer=tokenizer)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab)
    return cfg


def test_get_tokenizer_trains_once_then_reuses(code_corpus, tmp_path):
    tok = T.get_tokenizer(_cfg(code_corpus, 400), tmp_path)
    saved = tmp_path / "tokenizer" / "tokenizer.json"
    assert saved.is_file() and tok.vocab_size <= 400
    mtime = saved.stat().st_mtime_ns
    again = T.get_tokenizer(_cfg(code_corpus, 400), tmp_path)
    assert saved.stat().st_mtime_ns == mtime and again.encode(CODE) == tok.encode(CODE)
    with pytest.raises(UserError, match="model.vocab_size"):
        T.get_tokenizer(_cfg(code_corpus, 300), tmp_path)  # the saved one has more tokens than this model


def test_get_tokenizer_prefers_configured_dir(code_corpus, small_tokenizer, tmp_path):
    small_tokenizer.save(tmp_path / "mine")
    tok = T.get_tokenizer(_cfg(code_corpus, 4096, str(tmp_path / "mine")), tmp_path / "run")
    assert tok.vocab_size == 512 and not (tmp_path / "run" / "tokenizer").exists()


def test_train_tokenizer_cli(code_corpus, tmp_path, capsys):
    from codegen_jax.cli import main

    assert main(["tokenizer", "train", "--data", str(code_corpus), "--vocab-size", "300",
                 "--out", str(tmp_path / "out")]) == 0
    assert "saved to" in capsys.readouterr().out
    assert T.load_tokenizer(tmp_path / "out").vocab_size <= 300
    assert main(["tokenizer", "train", "--data", str(tmp_path / "nope"), "--vocab-size", "300",
                 "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]
