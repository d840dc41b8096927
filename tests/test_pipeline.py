"""The grain pipeline: packing invariants, masks, epochs, determinism, checkpoint resume, sharding."""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen_jax.config import Config, DataConfig
from codegen_jax.data import examples, pipeline
from codegen_jax.data.corpus import load_corpus
from codegen_jax.errors import UserError

PAD = 1


def _cfg(corpus, *, seq_len=128, batch=8, pair_ratio=0.0, seed=0, pack="first_fit", **data) -> Config:
    cfg = Config()
    data = {"source": "files", "val_fraction": 0.1, "fim_rate": 0.0, **data}  # FIM: tests/test_fim.py
    cfg.data = DataConfig(paths=[str(corpus)], seq_len=seq_len, pair_ratio=pair_ratio, shuffle_seed=seed,
                          pack=pack, **data)
    cfg.train.batch_size = batch
    return cfg


def _segments(batches) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(tokens, loss_mask) of every segment of every row, in row order."""
    out = []
    for b in batches:
        for row in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][row]
            for s in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == s)
                out.append((tuple(b["tokens"][row, idx]), tuple(b["loss_mask"][row, idx])))
    return out


def _check_row(tokens, seg, pos, mask, pad_id):
    """Padding only at the end; segments numbered 1..n in order; positions restart per segment."""
    used = np.count_nonzero(seg)
    assert (seg[:used] > 0).all() and (seg[used:] == 0).all()
    assert (tokens[used:] == pad_id).all() and (mask[used:] == 0).all() and (pos[used:] == 0).all()
    if used:
        assert seg[0] == 1 and set(np.diff(seg[:used])) <= {0, 1}
        for s in range(1, seg[:used].max() + 1):
            assert (pos[seg == s] == np.arange(np.count_nonzero(seg == s))).all()


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=25), seq_len=st.integers(4, 24),
       bins=st.integers(1, 6), method=st.sampled_from(["first_fit", "best_fit"]), data=st.data())
def test_packing_invariants(lengths, seq_len, bins, method, data):
    # Unique token values: each input token must come out exactly once, in its piece, in order.
    exs, start = [], 10
    for n in lengths:
        mask = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), np.int32)
        exs.append((np.arange(start, start + n, dtype=np.int32), mask))
        start += n
    pieces = [p for ex in exs for p in examples.split_rows(ex, seq_len)]
    rows = list(pipeline.pack_rows(grain.MapDataset.source(pieces).to_iter_dataset(), seq_len,
                                   num_bins=bins, pad_id=PAD, seed=3, method=method))
    for r in rows:
        assert all(r[k].shape == (seq_len,) and r[k].dtype == np.int32 for k in pipeline.BATCH_KEYS)
        _check_row(r["tokens"], r["segment_ids"], r["positions"], r["loss_mask"], PAD)
    got = sorted(_segments([{k: r[k][None] for k in r} for r in rows]))
    want = sorted((tuple(p["tokens"]), tuple(p["loss_mask"])) for p in pieces)
    assert got == want  # no piece lost, duplicated, merged or cut across rows; masks line up
    assert all(m[0] == 0 for _, m in got)  # a segment's first token is never a target
    assert sum(len(t) for t, _ in got) == sum(lengths)


def test_batch_format(code_corpus, small_tokenizer):
    it = pipeline.make_iterator(_cfg(code_corpus), small_tokenizer)
    for b in itertools.islice(it, 3):
        assert sorted(b) == sorted(pipeline.BATCH_KEYS)
        assert all(v.shape == (8, 128) and v.dtype == np.int32 for v in b.values())
        for row in range(8):
            _check_row(*(b[k][row] for k in pipeline.BATCH_KEYS), small_tokenizer.pad_id)
    assert (b["segment_ids"] > 0).mean() > 0.9  # packed, not padded


def _expected_doc_pieces(cfg, tok, split="train"):
    docs = [d.text for d in load_corpus(cfg.data).plain(split)]
    return [(tuple(p["tokens"]), tuple(p["loss_mask"])) for ex in examples.encode_batch(tok, docs)
            for p in examples.split_rows(ex, cfg.data.seq_len)]


def test_one_epoch_holds_every_document_piece_exactly_once(code_corpus, small_tokenizer):
    cfg = _cfg(code_corpus, seq_len=64)
    batches = list(pipeline.make_iterator(cfg, small_tokenizer, num_epochs=1))
    want = _expected_doc_pieces(cfg, small_tokenizer)
    assert sorted(_segments(batches)) == sorted(want)
    long_docs = [p for p in want if p[0][0] != small_tokenizer.bos_id]
    assert long_docs  # documents longer than seq_len were split, not dropped
    # The final partial batch is padded with all-padding rows (segment 0), never dropped.
    assert all(b["tokens"].shape == (8, 64) for b in batches)
    assert (batches[-1]["segment_ids"].max(axis=1) == 0).any()


def test_epochs_repeat_the_data_in_a_new_order(code_corpus, small_tokenizer):
    cfg = _cfg(code_corpus, seq_len=64)
    one = _segments(pipeline.make_iterator(cfg, small_tokenizer, num_epochs=1))
    two = _segments(pipeline.make_iterator(cfg, small_tokenizer, num_epochs=2))
    assert collections.Counter(two) == collections.Counter(one + one)
    assert two != one + one  # epoch 2 is reshuffled (and packed differently)


def test_completion_only_masks_survive_packing(code_corpus, small_tokenizer):
    tok = small_tokenizer
    cfg = _cfg(code_corpus, seq_len=128, pair_ratio=0.5)
    segs = _segments(pipeline.make_iterator(cfg, tok, num_epochs=1))
    codes = {p.code for p in load_corpus(cfg.data).pairs("train")}
    pair_segs = [(t, m) for t, m in segs if t[:2] == (tok.bos_id, tok.inst_id)]
    doc_segs = [(t, m) for t, m in segs if t[0] == tok.bos_id and t[1] != tok.inst_id]
    n_docs = len(load_corpus(cfg.data).plain("train"))
    assert len(doc_segs) == n_docs and len(pair_segs) == n_docs  # pair_ratio 0.5: one pair per document
    for t, m in pair_segs:
        sep = t.index(tok.sep_id)
        assert not any(m[:sep + 1]) and all(m[sep + 1:])  # prompt masked, completion trained
        if t[-1] == tok.eos_id:  # whole pair in one piece
            assert tok.decode(t[sep + 1:]) in codes
    assert all(m[1:] == (1,) * (len(m) - 1) and m[0] == 0 for t, m in doc_segs)


def test_deterministic_given_the_seed(code_corpus, small_tokenizer):
    def first(seed):
        it = pipeline.make_iterator(_cfg(code_corpus, seed=seed), small_tokenizer)
        return _segments(itertools.islice(it, 3))

    assert first(0) == first(0) and first(0) != first(1)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("pack", ["first_fit", "best_fit"])
def test_resume_from_state_across_epochs(code_corpus, small_tokenizer, monkeypatch, pack):
    monkeypatch.setattr(pipeline, "PACK_TOKENS", 512)  # several packing groups per epoch
    cfg = _cfg(code_corpus, seq_len=64, pair_ratio=0.3, pack=pack)
    per_epoch = len(list(pipeline.make_iterator(cfg, small_tokenizer, num_epochs=1)))
    assert per_epoch > 6
    for stop in (3, per_epoch - 2):  # mid-epoch, and a state whose next batches cross into epoch 2
        it = pipeline.make_iterator(cfg, small_tokenizer)
        _take(it, stop)
        state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
        expected = _take(it, 6)
        restored = pipeline.make_iterator(cfg, small_tokenizer)
        restored.set_state(state)
        _assert_same(_take(restored, 6), expected)


def test_grain_checkpoint_helper(code_corpus, small_tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "PACK_TOKENS", 1024)
    cfg = _cfg(code_corpus, seq_len=128, batch=8, pair_ratio=0.3)
    ds = pipeline.make_dataset(cfg, small_tokenizer, num_epochs=2)
    grain.experimental.assert_equal_output_after_checkpoint(ds)


def test_two_processes_split_the_single_process_stream(code_corpus, small_tokenizer):
    cfg = _cfg(code_corpus, seq_len=64, pair_ratio=0.3)
    single = _take(pipeline.make_iterator(cfg, small_tokenizer), 5)
    parts = [_take(pipeline.make_iterator(cfg, small_tokenizer, process_index=i, process_count=2), 5)
             for i in range(2)]
    for s, p0, p1 in zip(single, *parts):
        assert p0["tokens"].shape == (4, 64)
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), s[k])
    with pytest.raises(UserError, match="divisible"):
        pipeline.make_iterator(cfg, small_tokenizer, process_count=3)


def test_validation_split_is_finite(code_corpus, small_tokenizer):
    cfg = _cfg(code_corpus, seq_len=64)
    batches = list(pipeline.make_iterator(cfg, small_tokenizer, split="validation", num_epochs=1))
    want = _expected_doc_pieces(cfg, small_tokenizer, "validation")
    assert batches and sorted(_segments(batches)) == sorted(want)


def test_prompts_longer_than_half_a_row_are_counted_skips(tmp_path, small_tokenizer):
    rows = [{"prompt": "# short\n", "completion": "x = 1\n"},
            {"prompt": "# " + "very long instruction " * 20 + "\n", "completion": "y = 2\n"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    cfg = _cfg(tmp_path / "p.jsonl", seq_len=64, pair_ratio=1.0, source="datasets", val_fraction=0.0)
    corpus = load_corpus(cfg.data)
    items = pipeline.example_set(corpus, small_tokenizer, "train", 64, 1.0)
    assert len(items.pairs) == 1 and items.skipped["prompt_too_long"] == 1  # rows deduplicated to 2
    batch = next(pipeline.make_iterator(cfg, small_tokenizer, batch_size=2))
    want = examples.encode_batch(small_tokenizer, [("# short\n", "x = 1\n")])[0]
    want = (tuple(want[0]), tuple(want[1]))
    assert set(_segments([batch])) == {want}  # only the short pair, repeated
    cfg.data.seq_len = 8
    with pytest.raises(UserError, match="seq_len"):
        pipeline.make_iterator(cfg, small_tokenizer)


def test_held_out_loss_is_measured_on_the_validation_documents_alone(code_corpus, small_tokenizer, tmp_path):
    """Whatever data.pair_ratio mixes into training, the held-out stream is the split's documents, each
    piece once (so bits/byte compares across mixes); data with nothing but pairs keeps its pairs."""
    cfg = _cfg(code_corpus, pair_ratio=0.7)
    held_out = pipeline.held_out_config(cfg)
    batches = list(pipeline.make_iterator(held_out, small_tokenizer, split="validation", num_epochs=1))
    assert sorted(_segments(batches)) == sorted(_expected_doc_pieces(cfg, small_tokenizer, "validation"))
    mixed = list(pipeline.make_iterator(cfg, small_tokenizer, split="validation", num_epochs=1))
    assert len(_segments(mixed)) > len(_segments(batches))  # the mix would have added the pairs
    rows = [{"prompt": f"# p{i}\n", "completion": f"x = {i}\n"} for i in range(40)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    only_pairs = _cfg(tmp_path / "p.jsonl", pair_ratio=0.7, source="datasets", val_fraction=0.5)
    assert load_corpus(only_pairs.data).pairs("validation")
    assert pipeline.held_out_config(only_pairs) is only_pairs


def test_worker_processes_give_the_in_process_batches_and_resume(code_corpus, small_tokenizer):
    cfg = _cfg(code_corpus, seq_len=64, pair_ratio=0.3)
    expected = _take(pipeline.make_iterator(cfg, small_tokenizer), 6)
    cfg.data.num_workers = 2
    it = pipeline.make_iterator(cfg, small_tokenizer)
    _assert_same(_take(it, 3), expected[:3])
    assert any("grain" in p.name for p in multiprocessing.active_children())  # came through a worker
    state = json.loads(json.dumps(it.get_state()))
    restored = pipeline.make_iterator(cfg, small_tokenizer)
    restored.set_state(state)
    _assert_same(_take(restored, 3), expected[3:])
