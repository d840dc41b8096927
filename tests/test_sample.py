"""Sampler tests: the compiled prefill + decode loop against a naive full-recompute loop, batching and
left padding, sampling filters, stop strings and finish reasons, seeds, the mesh, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen_jax import cli
from codegen_jax.checkpoint import write_params_checkpoint
from codegen_jax.errors import UserError
from codegen_jax.model import create_model
from codegen_jax.sample import Completion, Generator, find_stop
from codegen_jax.sample.filters import min_p_filter, top_k_filter, top_p_filter
from codegen_jax.sample.scheduler import bucket
from conftest import run_with_devices, tiny_config

PROMPTS = ["def add(a, b):\n    return", "", "import os\n\n\nclass Walker:\n    def walk(self, path):\n"]
MAX_NEW = 20


def _config(*overrides: str, vocab: int = 512):
    return tiny_config(f"model.vocab_size={vocab}", "model.max_seq_len=128", *overrides)


@pytest.fixture(scope="module")
def setup(small_tokenizer):
    cfg = _config(vocab=small_tokenizer.vocab_size)
    model = create_model(cfg.model, seed=0)
    return cfg, model, small_tokenizer, Generator(model, small_tokenizer, max_batch_size=8)


def naive_greedy(model, prompt_ids: list[int], n: int, max_len: int = 128) -> list[int]:
    """Reference: recompute the whole sequence each step (right-padded to one shape, one compile)."""
    forward = jax.jit(lambda tokens, seg: model(tokens, segment_ids_bt=seg)[0])
    ids, out = list(prompt_ids), []
    for _ in range(n):
        tokens, seg = np.zeros((1, max_len), np.int32), np.zeros((1, max_len), np.int32)
        tokens[0, :len(ids)], seg[0, :len(ids)] = ids, 1
        nxt = int(jnp.argmax(forward(tokens, seg)[0, len(ids) - 1]))
        out.append(nxt)
        ids.append(nxt)
    return out


def gen_model(gen: Generator):
    """The model a Generator decodes with (its engine's layout of the parameters)."""
    return nnx.merge(gen.engine.graphdef, gen.engine.params)


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


# ---- the compiled loop against the model ----------------------------------------------------------

def test_greedy_equals_naive_full_recompute(setup):
    cfg, model, tok, gen = setup
    results = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=0.0, stop=[])
    for prompt, (c,) in zip(PROMPTS, results):
        ref = naive_greedy(model, gen.prompt_ids(prompt, MAX_NEW), MAX_NEW)
        assert c.tokens == _until_eos(ref, tok.eos_id)
        assert c.finish_reason == ("eos" if tok.eos_id in ref else "length")
        assert c.text == tok.decode(c.tokens)


def test_decode_step_variants_equal_naive(small_tokenizer):
    """Unscanned layers, tied embeddings, q/k/v biases and one kv head take other paths."""
    cfg = _config("model.scan_layers=false", "model.tie_embeddings=true", "model.attention_bias=true",
                  "model.n_kv_heads=1", vocab=small_tokenizer.vocab_size)
    model = create_model(cfg.model, seed=1)
    state = nnx.state(model)  # random biases (they are initialised to zero)
    for i in range(cfg.model.n_layers):
        for name in ("b_q_hk", "b_k_gk", "b_v_gk"):
            var = state["blocks"][i]["attn"][name]
            var[...] = 0.5 * jax.random.normal(jax.random.key(i), var.shape)
    nnx.update(model, state)
    gen = Generator(model, small_tokenizer)
    (c,), = gen.generate([PROMPTS[2]], max_new_tokens=12, stop=[])
    ref = naive_greedy(model, gen.prompt_ids(PROMPTS[2], 12), 12)
    assert c.tokens == _until_eos(ref, small_tokenizer.eos_id)


def test_mixed_lengths_batch_equals_one_by_one(setup):
    _, _, _, gen = setup
    batch = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, stop=[])
    for prompt, (c,) in zip(PROMPTS, batch):
        (alone,), = gen.generate([prompt], max_new_tokens=MAX_NEW, stop=[])
        assert alone.tokens == c.tokens


def test_continuous_batching_refills_slots_and_equals_each_row_alone(setup):
    """Five rows of different prompts, budgets and sampling settings through 2 slots, each slot refilled
    as its row ends: every row equals the same row run alone, and the slots were reused."""
    from codegen_jax.sample.scheduler import Request, Scheduler

    _, _, tok, gen = setup
    ids = [gen.prompt_ids(p, 8) for p in PROMPTS] + [gen.prompt_ids("x = [", 8), gen.prompt_ids("", 8)]
    requests = [Request(ids[0], 3), Request(ids[1], 17), Request(ids[2], 6, temperature=0.8, seed=4),
                Request(ids[3], 11, temperature=1.2, top_p=0.9, top_k=20, seed=5, key=(1, 2)), Request(ids[4], 2)]
    sched = Scheduler(gen.engine, tok, slots=2, refill=True, chunk=4)
    together = sched.run(requests)
    assert sched.stats["prefills"] >= 3  # rows joined while others were running
    for request, result in zip(requests, together):
        (alone,) = Scheduler(gen.engine, tok, slots=2, refill=True, chunk=4).run([request])
        assert (result.tokens, result.finish_reason) == (alone.tokens, alone.finish_reason)
        assert len(result.tokens) <= request.max_new_tokens and result.request is request


def test_decode_runs_only_the_live_rows_over_the_cache_they_reach_and_equals_each_row_alone(setup):
    """Six slots emptying one by one: each decode call runs a bucket of rows that holds the live ones
    (with free slots as padding, or every slot in slot order) over a bucket of cache slots they can
    reach, not the whole state; every row still equals the same row alone."""
    from codegen_jax.sample.scheduler import Request, Scheduler

    _, _, tok, gen = setup
    prompts = PROMPTS + ["x = [", "import os\n", "class A:\n", "def f(x):\n"]
    budgets = [2, 30, 11, 15, 7, 26, 19]  # chunks of 4: about one row ends per call
    requests = [Request(gen.prompt_ids(p, 8 + 3 * i), n) for i, (p, n) in enumerate(zip(prompts, budgets))]
    capacity = gen.model_cfg.max_seq_len
    sched = Scheduler(gen.engine, tok, slots=6, refill=True, chunk=4, min_capacity=capacity, open_queue=True)
    together = sched.run(requests)
    shapes = set(sched.decode_shapes)
    assert {m for _, m, _ in shapes} == {1, 2, 4, 6} and all(live <= m for live, m, _ in shapes)
    assert any(live < m == 6 for live, m, _ in shapes) and any(live < m < 6 for live, m, _ in shapes)
    assert {length for _, _, length in shapes} == {64} and capacity > 64  # prompts + budgets reach < 64
    for request, result in zip(requests, together):
        (alone,) = Scheduler(gen.engine, tok, slots=6, refill=True, chunk=4, min_capacity=capacity).run([request])
        assert (result.tokens, result.finish_reason) == (alone.tokens, alone.finish_reason)


def test_decode_length_buckets_are_powers_of_two_then_finer_steps_above_256(setup):
    """Decode reads every attended slot each step: a call runs over the bucket of the slots its rows
    reach (74 here: 70 of prompt, a chunk of 4 -> 128). Above 256, calls of many rows take four steps
    per doubling, calls of few rows 1.5x steps (fewer programs to compile)."""
    from codegen_jax.sample.scheduler import Request, Scheduler, decode_length

    reaches = (1, 64, 65, 96, 129, 256, 257, 384, 385, 513, 769, 1025)
    assert [decode_length(n) for n in reaches] == [64, 64, 128, 128, 256, 256, 320, 384, 448, 640, 896, 1280]
    assert [decode_length(n, fine=False) for n in reaches] == \
        [64, 64, 128, 128, 256, 256, 384, 384, 512, 768, 1024, 1536]
    _, _, tok, gen = setup
    capacity = gen.model_cfg.max_seq_len
    ids = (gen.encode_prompt("x = 1\n" * 40))[:70]
    assert len(ids) == 70 and capacity >= 128
    sched = Scheduler(gen.engine, tok, slots=2, chunk=4, min_capacity=capacity, open_queue=True)
    sched.run([Request(ids, 4)])
    assert set(sched.decode_shapes) == {(1, 1, 128)}


def test_fixed_shapes_decode_every_slot_over_the_whole_cache(setup):
    """`fixed_shapes` (the server's --batch-invariant): the same rows run in one shape only, every slot
    over the state's capacity, whatever is live, with the same tokens."""
    from codegen_jax.sample.scheduler import Request, Scheduler

    _, _, tok, gen = setup
    requests = [Request(gen.prompt_ids(p, 8), n) for p, n in zip(PROMPTS, [3, 17, 9])]
    capacity = gen.model_cfg.max_seq_len
    runs = [Scheduler(gen.engine, tok, slots=4, chunk=4, min_capacity=capacity, open_queue=True, fixed_shapes=fixed)
            for fixed in (True, False)]
    fixed, bucketed = (sched.run(requests) for sched in runs)
    assert {(m, length) for _, m, length in runs[0].decode_shapes} == {(4, capacity)}
    assert {live for live, _, _ in runs[0].decode_shapes} == {3, 2, 1}
    assert len({(m, length) for _, m, length in runs[1].decode_shapes}) > 1
    assert [r.tokens for r in fixed] == [r.tokens for r in bucketed]


def test_cancelling_a_waiting_row_returns_its_result_and_a_running_one_ends_next_step(setup):
    """A server client that leaves: every row it had gets a result (so the server's count of rows in
    hand comes back down), the waiting ones at once, the running ones at the next step."""
    from codegen_jax.sample.scheduler import Request, Scheduler

    _, _, tok, gen = setup
    running, waiting = object(), object()
    sched = Scheduler(gen.engine, tok, slots=1, refill=True, chunk=2, open_queue=True)
    ids = gen.prompt_ids(PROMPTS[0], 8)
    sched.submit(Request(ids, 40, tag=running))
    first = sched.step()
    assert not first and len(sched.rows) == 1  # admitted and decoding
    sched.submit(Request(ids, 5, tag=waiting))
    (dropped,) = sched.cancel(waiting)
    assert dropped.finish_reason == "cancelled" and dropped.request.tag is waiting and dropped.tokens == []
    assert not sched.waiting and sched.cancel(running) == []
    ended = sched.step()
    assert [(r.request.tag, r.finish_reason) for r in ended] == [(running, "cancelled")] and not sched.busy


def test_buckets_are_few_and_tight():
    assert [bucket(n) for n in (1, 16, 17, 25, 33, 100, 129)] == [16, 16, 24, 32, 48, 128, 192]
    assert len({bucket(n) for n in range(1, 2049)}) <= 16


# ---- sampling -------------------------------------------------------------------------------------

def test_top_k_one_equals_greedy(setup):
    _, _, _, gen = setup
    greedy = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, stop=[])
    sampled = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=1.3, top_k=1, num_samples=2,
                           stop=[], seed=3)
    for (g,), samples in zip(greedy, sampled):
        assert [s.tokens for s in samples] == [g.tokens, g.tokens]


def _kept(filtered) -> list[int]:
    return np.flatnonzero(np.isfinite(np.asarray(filtered)[0])).tolist()


def test_top_p_keeps_smallest_set_with_mass_at_least_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    assert _kept(top_p_filter(logits, 0.49)) == [1]
    assert _kept(top_p_filter(logits, 0.51)) == [1, 3]
    assert _kept(top_p_filter(logits, 0.79)) == [1, 3]
    assert _kept(top_p_filter(logits, 0.81)) == [1, 2, 3]
    assert _kept(top_p_filter(logits, 0.96)) == [0, 1, 2, 3]
    assert _kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=2, max_size=12), st.floats(0.05, 0.95))
def test_top_p_property(weights, p):
    probs = np.array(weights) / np.sum(weights)
    kept = _kept(top_p_filter(jnp.log(jnp.asarray(probs, jnp.float32))[None], p))
    mass, least = probs[kept].sum(), probs[kept].min()
    assert mass >= p - 1e-5  # enough mass ...
    assert mass - probs[np.isclose(probs, least, rtol=1e-5)].sum() < p + 1e-5  # ... none to spare
    assert least >= np.delete(probs, kept).max(initial=0.0) - 1e-7  # and the most likely ones
    # (tokens tied with the last one needed are all kept, as in top-k)


@settings(max_examples=40, deadline=None)
# no subnormals: XLA on CPU flushes them to zero, where they tie with 0.0 (numpy keeps them apart)
@given(st.lists(st.sampled_from([-1e30, -3.5, -1.0, -0.0, 0.0, 0.25, 2.0, 7.0])
                | st.floats(-50, 50, width=32, allow_subnormal=False), min_size=1, max_size=16), st.integers(1, 20))
def test_top_k_property(values, k):
    """The exact-threshold search keeps what a sort would (negative values, zeros and ties included)."""
    logits = np.array(values, np.float32)
    kth = np.sort(logits)[::-1][min(k, len(logits)) - 1]
    expected = np.flatnonzero(logits >= kth).tolist()
    assert _kept(top_k_filter(jnp.asarray(logits)[None], k)) == expected
    assert _kept(top_k_filter(jnp.asarray(logits)[None], jnp.float32(k))) == expected  # a runtime k
    assert _kept(top_k_filter(jnp.asarray([[-0.0, 0.0, -1.0]]), 1)) == [0, 1]


def test_top_k_and_min_p_filters():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    assert _kept(top_k_filter(logits, 2)) == [1, 3]
    assert _kept(top_k_filter(logits, 0)) == [0, 1, 2, 3]
    assert _kept(min_p_filter(logits, 0.5)) == [1, 3]  # p >= 0.5 * 0.5
    assert _kept(min_p_filter(logits, 0.0)) == [0, 1, 2, 3]


def test_same_seed_same_samples_whatever_the_batching(setup):
    cfg, model, tok, gen = setup
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, num_samples=3,
              stop=[])
    a = gen.generate(PROMPTS, seed=7, **kw)
    b = gen.generate(PROMPTS, seed=7, **kw)
    assert [[s.tokens for s in r] for r in a] == [[s.tokens for s in r] for r in b]
    assert len({tuple(s.tokens) for s in a[2]}) > 1  # samples of one prompt differ
    c = Generator(model, tok, max_batch_size=2).generate(PROMPTS[:1], seed=7, **kw)
    assert [s.tokens for s in c[0]] == [s.tokens for s in a[0]]
    d = gen.generate(PROMPTS, seed=8, **kw)
    assert [[s.tokens for s in r] for r in d] != [[s.tokens for s in r] for r in a]
    assert all(isinstance(s, Completion) and (s.prompt_index, s.sample_index) == (i, j)
               for i, r in enumerate(a) for j, s in enumerate(r))


# ---- stop strings, EOS, finish reasons ------------------------------------------------------------

def test_row_text_decodes_only_new_tokens_and_equals_decoding_them_all(setup):
    """A running row's text is kept between rounds and only the new tokens are decoded (streaming 32
    rows re-decoded every row's whole text each round); after each round, including rounds that end
    inside a multi-byte character, it equals decoding every token so far."""
    from codegen_jax.sample.scheduler import Request, Scheduler, _Row

    _, _, tok, gen = setup
    ids = tok.encode("s = 'déjà vu → ✓ 日本語'\n    return naïve  # ünïcödé ✓✓\n")[1:]  # no BOS
    sched = Scheduler(gen.engine, tok, slots=2)
    decoded = []
    sched.tokenizer = type("Counting", (), {"eos_id": tok.eos_id,
                                            "decode": lambda self, t: decoded.append(len(t)) or tok.decode(t)})()
    row, split_char, k = _Row(Request([1], 1)), False, 0
    for size in [1, 2, 3] * len(ids):
        if k >= len(ids):
            break
        row.tokens.extend(ids[k:k + size])
        k += size
        expected = tok.decode(row.tokens)
        split_char |= expected.endswith("\ufffd")
        assert sched._text(row) == expected
    assert sched._text(row) == tok.decode(ids) and split_char  # the rounds did end inside a character
    assert sum(decoded) < len(ids) * len(ids) / 4  # far fewer tokens than decoding every prefix whole


def test_stop_string_trimmed_and_finish_reasons(setup):
    _, _, tok, gen = setup
    (full,), = gen.generate([PROMPTS[0]], max_new_tokens=MAX_NEW, stop=[])
    assert full.finish_reason == "length" and len(full.tokens) == MAX_NEW
    stop = full.text[len(full.text) // 2:][:3]
    cut = full.text.find(stop)
    for every in (32, 3):  # one decode call, and several with stop checks between them
        gen.stop_check_every = every
        (c,), = gen.generate([PROMPTS[0]], max_new_tokens=MAX_NEW, stop=["never-there", stop])
        assert (c.text, c.finish_reason) == (full.text[:cut], "stop")
        assert c.tokens == full.tokens[:len(c.tokens)] and tok.decode(c.tokens).startswith(c.text)
        assert len(tok.decode(c.tokens[:-1])) < cut <= len(tok.decode(c.tokens))
    gen.stop_check_every = 32
    assert find_stop("a\ndef b\nclass", ["\nclass", "\ndef"]) == 1


def test_eos_stops_the_row(setup):
    cfg, model, tok, _ = setup
    (full,), = Generator(model, tok).generate([PROMPTS[2]], max_new_tokens=MAX_NEW, stop=[])
    eos = full.tokens[5]  # pretend the 6th generated token is EOS

    class EosAt:
        def __getattr__(self, name):
            return eos if name == "eos_id" else getattr(tok, name)

    gen = Generator(model, EosAt())
    (c, other), = gen.generate([PROMPTS[2]] * 1, max_new_tokens=MAX_NEW, stop=[], num_samples=2)
    first = full.tokens.index(eos)
    assert c.tokens == other.tokens == full.tokens[:first] and c.finish_reason == "eos"


def test_empty_prompt_starts_from_bos(setup):
    _, model, tok, gen = setup
    assert gen.prompt_ids("", 8) == [tok.bos_id]
    (c,), = gen.generate([""], max_new_tokens=4, stop=[])
    ref = naive_greedy(model, [tok.bos_id], 4)
    assert c.tokens == _until_eos(ref, tok.eos_id)
    assert c.finish_reason == ("eos" if tok.eos_id in ref else "length")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"min_p": 2.0}, "min_p"), ({"num_samples": 0}, "num_samples"), ({"max_new_tokens": 128}, "context"),
])
def test_bad_options_raise_user_error(setup, kwargs, message):
    _, _, _, gen = setup
    with pytest.raises(UserError, match=message):
        gen.generate(["x"], **kwargs)


def test_long_prompt_errors_or_truncates(setup):
    _, _, tok, gen = setup
    long_prompt = "x = 1\n" * 200
    with pytest.raises(UserError, match="--truncate"):
        gen.generate([long_prompt], max_new_tokens=8)
    ids = gen.prompt_ids(long_prompt, 8, truncate=True)
    assert len(ids) == 120 and ids[0] == tok.bos_id and ids[1:] == tok.encode(long_prompt)[-119:]
    (c,), = gen.generate([long_prompt], max_new_tokens=8, truncate=True, stop=[])
    ref = naive_greedy(gen_model(gen), ids, 8)
    assert c.tokens == _until_eos(ref, tok.eos_id)
    assert c.finish_reason == ("eos" if tok.eos_id in ref else "length")


# ---- checkpoint, CLI, mesh ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(setup, tmp_path_factory):
    cfg, model, tok, _ = setup
    workdir = tmp_path_factory.mktemp("run")
    write_params_checkpoint(workdir, cfg, nnx.to_pure_dict(nnx.state(model)), tok, step=3)
    return workdir


def test_from_checkpoint_matches_in_memory(setup, ckpt):
    _, _, _, gen = setup
    loaded = Generator.from_checkpoint(ckpt / "checkpoints" / "3")
    assert loaded.step == 3
    kw = dict(max_new_tokens=MAX_NEW, stop=[])
    expected = [c.tokens for (c,) in gen.generate(PROMPTS, **kw)]
    assert [c.tokens for (c,) in loaded.generate(PROMPTS, **kw)] == expected


def test_cli_generate_jsonl(setup, ckpt, tmp_path, capsys):
    _, _, _, gen = setup
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p, "id": f"p{i}"}) for i, p in enumerate(PROMPTS)) + "\n")
    out = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--prompts-file", str(src), "--out", str(out),
                   "--max-new-tokens", str(MAX_NEW), "--stop"])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    expected = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, stop=[])
    assert [x["id"] for x in lines] == ["p0", "p1", "p2"] and [x["prompt"] for x in lines] == PROMPTS
    for line, (c,) in zip(lines, expected):
        got = (line["completion"], line["tokens"], line["finish_reason"])
        assert got == (c.text, c.tokens, c.finish_reason)
    assert "tok/s" in capsys.readouterr().err

    rc = cli.main(["generate", "--checkpoint", str(ckpt), "--prompt", PROMPTS[0], "--max-new-tokens", "4",
                   "--num-samples", "2", "--temperature", "0.8", "--seed", "1", "--stop", "\\ndef"])
    assert rc == 0 and capsys.readouterr().out.count(PROMPTS[0]) == 2


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"), (["--top-p", "1.1"], "top_p"), (["--top-k", "-2"], "top_k"),
    (["--prompts-file", "MISSING"], "prompts file not found"), (["--prompts-file", "NOPROMPT"], "'prompt'"),
    (["--prompts-file", "BADJSON"], "not valid JSON"), (["--prompt", "x = 1\n" * 300], "--truncate"),
])
def test_cli_bad_input_exits_2_with_one_line(ckpt, tmp_path, capsys, args, message):
    files = {"MISSING": tmp_path / "missing.jsonl", "NOPROMPT": tmp_path / "np.jsonl",
             "BADJSON": tmp_path / "bad.jsonl"}
    files["NOPROMPT"].write_text('{"prompt": "ok"}\n{"id": 3}\n')
    files["BADJSON"].write_text('{"prompt": "ok"}\n{"prompt": \n')
    args = [str(files.get(a, a)) for a in args]
    if "--prompt" not in args and "--prompts-file" not in args:
        args += ["--prompt", "def f():"]
    rc = cli.main(["generate", "--checkpoint", str(ckpt), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_cli_subprocess_one_stderr_line(ckpt):
    proc = subprocess.run([sys.executable, "-m", "codegen_jax.cli", "generate", "--checkpoint", str(ckpt),
                           "--prompt", "y = 2\n" * 300], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--truncate" in proc.stderr


SHARDED = """
import json, sys
import jax
from flax import nnx
from codegen_jax.checkpoint import load_inference, write_params_checkpoint
from codegen_jax.sample import Generator
from codegen_jax.sharding import make_mesh
from jax.sharding import PartitionSpec
prompts, ckpt, out_dir = json.loads({args})
kw = dict(max_new_tokens={max_new}, stop=[])
sample_kw = dict(kw, temperature=0.9, top_p=0.9, num_samples=2, seed=5)
def run(gen):
    return [[c.tokens for c in r] for r in gen.generate(prompts, **kw) + gen.generate(prompts, **sample_kw)]
mesh_a = make_mesh({{"data": 2, "fsdp": 2, "tensor": 2}})
a = Generator.from_checkpoint(ckpt, mesh=mesh_a)
assert a.engine.params["blocks"][0]["mlp"]["w_up_df"][...].sharding.spec == PartitionSpec("fsdp", "tensor")
first = run(a)
# params sharded on the (2, 2, 2) mesh, saved, then generating on another mesh
cfg, model, tok, _ = load_inference(ckpt, mesh_a)
write_params_checkpoint(out_dir, cfg, nnx.to_pure_dict(nnx.state(model)), tok, step=9)
b = Generator.from_checkpoint(out_dir, mesh=make_mesh({{"data": 1, "fsdp": 4, "tensor": 2}}))
print(json.dumps({{"a": first, "b": run(b)}}))
"""


def test_sharded_8_devices_equals_single_device(setup, ckpt, tmp_path):
    _, _, _, gen = setup
    max_new = 12
    args = json.dumps([PROMPTS, str(ckpt), str(tmp_path / "resharded")])
    out = run_with_devices(SHARDED.format(args=repr(args), max_new=max_new), n_devices=8)
    got = json.loads(out.strip().splitlines()[-1])
    kw = dict(max_new_tokens=max_new, stop=[])
    single = [[c.tokens for c in r] for r in gen.generate(PROMPTS, **kw)
              + gen.generate(PROMPTS, **dict(kw, temperature=0.9, top_p=0.9, num_samples=2, seed=5))]
    assert got["a"] == single
    assert got["b"] == single


MULTI_PROCESS = """
import json, sys
from codegen_jax import distributed
distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from codegen_jax.sample import Generator
from codegen_jax.sharding import make_mesh
import jax
gen = Generator.from_checkpoint({ckpt!r}, mesh=make_mesh({{"data": 2, "fsdp": 2, "tensor": 1}}))
out = gen.generate({prompts!r}, max_new_tokens=12, stop=[], temperature=0.9, num_samples=2, seed=5)
print(json.dumps([[c.tokens for c in r] for r in out]))
"""


@pytest.mark.slow
def test_two_processes_equal_single_device(setup, ckpt):
    """The multi-host path: global arrays built per process, results gathered across processes."""
    import os
    import socket

    _, _, _, gen = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = MULTI_PROCESS.format(port=port, ckpt=str(ckpt), prompts=PROMPTS)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
    single = gen.generate(PROMPTS, max_new_tokens=12, stop=[], temperature=0.9, num_samples=2, seed=5)
    expected = [[c.tokens for c in r] for r in single]
    for stdout, _ in outs:
        assert json.loads(stdout.strip().splitlines()[-1]) == expected


def test_stats_report_compile_separately(setup):
    _, model, tok, _ = setup
    gen = Generator(model, tok, max_batch_size=8)  # a fresh engine: nothing compiled yet
    gen.generate(PROMPTS, max_new_tokens=MAX_NEW, stop=[])
    assert gen.last_stats["compile_s"] > 0
    gen.generate(PROMPTS, max_new_tokens=MAX_NEW, stop=[])
    st = gen.last_stats
    assert st["compile_s"] == 0.0 and st["run_s"] > 0 and st["new_tokens"] > 0
    assert math.isclose(st["tokens_per_s"], st["new_tokens"] / st["run_s"])


@pytest.mark.parametrize("kind", ["missing", "file", "empty_dir"])
def test_bad_checkpoint_path_exits_2_with_one_line(tmp_path, capsys, kind):
    path = tmp_path / "ckpt"
    if kind == "file":
        path.write_text("not a checkpoint")
    elif kind == "empty_dir":
        path.mkdir()
    rc = cli.main(["generate", "--checkpoint", str(path), "--prompt", "def f():"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and ("not found" in err[0] or "holds no checkpoint" in err[0]), err


def test_repetition_controls_are_off_by_default_and_forbid_repeats_when_on(setup):
    """no_repeat_ngram: with it off (the default) greedy is the model's argmax; on, no n-gram of prompt
    plus completion occurs twice. repetition_penalty scales the seen tokens' logits as HF does."""
    from codegen_jax.sample.filters import repetition_penalty

    _, model, tok, gen = setup
    prompt = "x = x + x + x + x"
    (plain,), = gen.generate([prompt], max_new_tokens=24, stop=[])
    assert plain.tokens == _until_eos(naive_greedy(model, gen.prompt_ids(prompt, 24), 24), tok.eos_id)
    (blocked,), = gen.generate([prompt], max_new_tokens=24, stop=[], no_repeat_ngram=2)
    ids = gen.prompt_ids(prompt, 24)[1:] + blocked.tokens  # the prompt's own repeats are its own
    generated_bigrams = [tuple(ids[i:i + 2]) for i in range(len(ids) - len(blocked.tokens) - 1, len(ids) - 1)]
    earlier = {tuple(ids[i:i + 2]) for i in range(len(ids) - 1)}
    assert len(generated_bigrams) == len(set(generated_bigrams)) and blocked.tokens != plain.tokens
    assert all(sum(1 for i in range(len(ids) - 1) if tuple(ids[i:i + 2]) == bg) == 1 for bg in generated_bigrams)
    assert earlier  # (non-empty)
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
    out = repetition_penalty(logits, jnp.array([[0, 1, 3, 3]]), jnp.array([2]), jnp.array([2.0]))
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 3.0]])  # only tokens 0 and 1 (the first 2 slots)
