"""Fill-in-the-middle in training: the tokenizer's FIM tokens (StarCoder's names), documents cut at two
random points and written in PSM or SPM order, deterministically from the data seed."""

from __future__ import annotations

import itertools

import numpy as np

from codegen_jax.config import Config, DataConfig
from codegen_jax.data import examples, pipeline
from codegen_jax.data.tokenizer import FIM_TOKENS


def _cfg(corpus, **data) -> Config:
    cfg = Config()
    cfg.data = DataConfig(source="files", paths=[str(corpus)], seq_len=128, pair_ratio=0.0, val_fraction=0.1,
                          **data)
    cfg.train.batch_size = 8
    return cfg


def test_trained_tokenizer_has_fim_tokens_that_auto_tokenizer_maps_to_single_ids(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    fim = small_tokenizer.fim
    assert fim is not None and fim.names == FIM_TOKENS
    prompt = "<fim_prefix>def f(x):\n    <fim_suffix>\n    return y<fim_middle>"
    ids = small_tokenizer.encode_with_fim(prompt)
    assert ids[0] == fim.prefix and ids[-1] == fim.middle and ids.count(fim.suffix) == 1
    assert small_tokenizer.encode(prompt).count(fim.prefix) == 0  # plain encode keeps them as text
    small_tokenizer.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf(prompt, add_special_tokens=False)["input_ids"] == ids
    assert [hf.convert_tokens_to_ids(t) for t in FIM_TOKENS] == [fim.prefix, fim.middle, fim.suffix, fim.pad]


def test_fim_split_cuts_at_two_points_and_the_orders_keep_every_piece(small_tokenizer):
    rng = np.random.default_rng(0)
    text = "abcdefghij" * 3
    for _ in range(50):
        doc = examples.fim_split(text, rng, spm_rate=0.5)
        assert doc.prefix + doc.middle + doc.suffix == text
    fim = small_tokenizer.fim
    p, s, m = [1, 2], [3], [4, 5]
    assert fim.psm(p, s, m) == [fim.prefix, 1, 2, fim.suffix, 3, fim.middle, 4, 5]
    assert fim.spm(p, s, m) == [fim.prefix, fim.suffix, 3, fim.middle, 1, 2, 4, 5]  # BigCode's SPM
    tokens, mask = examples.encode_batch(small_tokenizer, [examples.FimDoc("a", "b", "c", False)])[0]
    assert tokens[0] == small_tokenizer.bos_id and tokens[-1] == small_tokenizer.eos_id
    assert mask[0] == 0 and mask[1:].all()  # the loss covers every token of a FIM example


def test_an_editors_fim_prompt_is_the_start_of_a_psm_training_example(small_tokenizer):
    """What `serve` receives (literal FIM tokens in a prompt, or a `suffix` it writes the same way) is
    encoded exactly as training laid out a PSM example, up to its middle."""
    tok, pre, suf = small_tokenizer, "def area(r):\n    return ", "\n\nprint(area(2))\n"
    prompt = tok.prompt_ids(f"<fim_prefix>{pre}<fim_suffix>{suf}<fim_middle>")
    trained, _ = examples.encode_batch(tok, [examples.FimDoc(pre, "3.14 * r * r", suf, False)])[0]
    assert prompt == trained[:len(prompt)].tolist()
    assert prompt == [tok.bos_id, tok.fim.prefix, *tok.encode(pre), tok.fim.suffix, *tok.encode(suf), tok.fim.middle]


def _fim_rows(batches, tok):
    rows = [b["tokens"][r] for b in batches for r in range(b["tokens"].shape[0])]
    return sum(int((row == tok.fim.prefix).sum()) for row in rows), rows


def test_training_documents_are_rewritten_at_the_rate_deterministically(code_corpus, small_tokenizer):
    tok = small_tokenizer
    n_docs = len(pipeline.example_set(pipeline.load_corpus(_cfg(code_corpus).data), tok, "train", 128, 0).docs)
    one_epoch = list(pipeline.make_iterator(_cfg(code_corpus, fim_rate=0.5), tok, num_epochs=4))
    fim_docs, _ = _fim_rows(one_epoch, tok)
    assert 0.3 * 4 * n_docs < fim_docs < 0.7 * 4 * n_docs  # about half of the 4 epochs' documents
    again = list(pipeline.make_iterator(_cfg(code_corpus, fim_rate=0.5), tok, num_epochs=4))
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(one_epoch, again))
    other_seed = list(pipeline.make_iterator(_cfg(code_corpus, fim_rate=0.5, shuffle_seed=1), tok, num_epochs=4))
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(one_epoch, other_seed))
    spm = sum(int(((row[:-1] == tok.fim.prefix) & (row[1:] == tok.fim.suffix)).sum())
              for b in one_epoch for row in b["tokens"])
    assert 0 < spm < fim_docs  # both orders occur
    assert _fim_rows(list(pipeline.make_iterator(_cfg(code_corpus, fim_rate=0.0), tok, num_epochs=1)), tok)[0] == 0
    val = list(pipeline.make_iterator(_cfg(code_corpus, fim_rate=1.0), tok, split="validation", num_epochs=1))
    assert _fim_rows(val, tok)[0] == 0  # the held-out loss stays left to right


def test_resume_mid_stream_gives_the_same_fim_batches(code_corpus, small_tokenizer):
    cfg = _cfg(code_corpus, fim_rate=0.7)
    it = pipeline.make_iterator(cfg, small_tokenizer)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = pipeline.make_iterator(cfg, small_tokenizer)
    resumed.set_state(state)
    for want, got in zip(expected, itertools.islice(resumed, 3)):
        assert all(np.array_equal(want[k], got[k]) for k in want)
    assert _fim_rows(expected, small_tokenizer)[0] > 0


def test_a_tokenizer_without_fim_tokens_trains_left_to_right(code_corpus, tmp_path):
    from codegen_jax.data.tokenizer import load_tokenizer

    old = load_tokenizer("tests/fixtures/run_v1/tokenizer")  # made before FIM tokens existed
    assert old.fim is None and not pipeline.fim_active(_cfg(code_corpus, fim_rate=0.5), old, "train")
    assert old.encode_with_fim("<fim_prefix>x") == old.encode("<fim_prefix>x")  # plain text to it
