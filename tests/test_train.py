"""Training: masked loss, exact gradient accumulation, HF+torch AdamW parity, loss decrease, exact
resume after SIGKILL, SIGTERM saves, corrupt-latest fallback, NaN stop, incompatible resume, init-from."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from codegen_jax.model import create_model
from codegen_jax.sharding import make_mesh, state_shardings
from codegen_jax.train.optim import decay_mask, make_optimizer, muon_dims, schedule
from codegen_jax.train.step import TrainState, grads_and_metrics, make_train_step, masked_nll, target_weights

from conftest import TINY_CLI_TRAIN, losses_side_by_side, tiny_config

SMALL_DATA = ["data.max_docs=120", "model.vocab_size=512"]


def _batch(b=8, t=16, vocab=101, seed=0, prompt=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (b, t)).astype(np.int32)
    loss_mask = np.ones((b, t), np.int32)
    loss_mask[:, :prompt] = 0
    return {"tokens": tokens, "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": loss_mask}


def _state(cfg, mesh, seed=0):
    model = create_model(cfg.model, mesh, seed=seed)
    graphdef, st = nnx.split(model)
    params, params_sh = nnx.to_pure_dict(st), nnx.to_pure_dict(state_shardings(st, mesh))
    opt = make_optimizer(cfg.optim, cfg.train.steps)
    return graphdef, opt, TrainState(jnp.int32(0), params, opt.init(params)), params_sh


def test_prompt_labels_and_padding_carry_no_loss():
    batch = _batch(prompt=6)
    batch["segment_ids"][:, 12:] = 0  # padding tail
    w = np.asarray(target_weights(batch))
    assert w.shape == (8, 16) and w[:, :5].sum() == 0 and w[:, 5:11].all() and w[:, 11:].sum() == 0
    logits = jax.random.normal(jax.random.key(0), (8, 16, 101))
    labels = jnp.pad(jnp.asarray(batch["tokens"][:, 1:]), ((0, 0), (0, 1)))
    base = float(jnp.sum(masked_nll(logits, labels)[0] * w))
    prompt_changed = labels.at[:, 2].set((labels[:, 2] + 1) % 101)  # a prompt token's label
    pad_changed = labels.at[:, 13].set((labels[:, 13] + 1) % 101)  # a padding label
    completion_changed = labels.at[:, 7].set((labels[:, 7] + 1) % 101)
    assert float(jnp.sum(masked_nll(logits, prompt_changed)[0] * w)) == base
    assert float(jnp.sum(masked_nll(logits, pad_changed)[0] * w)) == base
    assert float(jnp.sum(masked_nll(logits, completion_changed)[0] * w)) != base


def test_packed_boundary_target_is_excluded():
    batch = _batch(t=8)
    batch["segment_ids"][:] = [1, 1, 1, 2, 2, 2, 2, 0]
    w = np.asarray(target_weights(batch))[0]
    # position 2 would predict the next document's first token: not a target; the last, nothing
    assert list(w) == [1, 1, 0, 1, 1, 1, 0, 0]


def test_chunked_loss_equals_the_whole_row_in_values_and_gradients():
    """train.loss_chunk: the LM head and cross entropy on 8 positions at a time (rematerialized)."""
    cfg = tiny_config()
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    graphdef, _, state, _ = _state(cfg, mesh)
    batch = jax.tree.map(jnp.asarray, _batch(t=32, prompt=3))
    whole = grads_and_metrics(graphdef, state.params, batch, 1, 1e-3)
    chunked = grads_and_metrics(graphdef, state.params, batch, 1, 1e-3, loss_chunk=8)
    assert float(chunked[1]["loss"]) == pytest.approx(float(whole[1]["loss"]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), chunked[0], whole[0])


def test_grad_accumulation_equals_full_batch():
    cfg = tiny_config()
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    graphdef, _, state, _ = _state(cfg, mesh)
    batch = jax.tree.map(jnp.asarray, _batch(prompt=3))
    batch["segment_ids"] = batch["segment_ids"].at[5:, 10:].set(0)  # unequal target counts per micro
    full, m_full = grads_and_metrics(graphdef, state.params, batch, 1, 0.0)
    acc, m_acc = grads_and_metrics(graphdef, state.params, batch, 4, 0.0)
    assert float(m_full["tokens"]) == float(m_acc["tokens"])
    np.testing.assert_allclose(float(m_full["loss"]), float(m_acc["loss"]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), full, acc)


def test_schedules_and_decay_mask():
    cfg = tiny_config("optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1")
    for kind in ("cosine", "linear", "wsd", "constant"):
        cfg.optim.schedule = kind
        s = schedule(cfg.optim, 100)
        assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
        end = float(s(100))
        assert end == pytest.approx(1.0 if kind == "constant" else 0.1, abs=1e-6)
    cfg.optim.schedule = "wsd"
    s = schedule(cfg.optim, 100)
    assert float(s(80)) == pytest.approx(1.0) and float(s(90)) < 1.0
    params = nnx.to_pure_dict(nnx.state(create_model(cfg.model)))
    mask = decay_mask(params, decay_all=False)
    assert mask["blocks"]["attn"]["w_q_dhk"] and mask["lm_head_dv"]
    assert not mask["embed_vd"] and not mask["final_norm"]["weight"] and not mask["blocks"]["attn_norm"]["weight"]


def test_muon_takes_the_block_matrices_by_their_shape_suffix():
    dims = muon_dims(nnx.to_pure_dict(nnx.state(create_model(tiny_config("model.scan_layers=true").model))))
    attn, mlp = dims["blocks"]["attn"], dims["blocks"]["mlp"]
    # a scanned stack's leading layer axis is a batch axis: each layer's matrix is orthogonalized alone
    assert tuple(attn["w_q_dhk"]) == ((1,), (2, 3)) and tuple(attn["w_o_hkd"]) == ((1, 2), (3,))
    assert tuple(mlp["w_gate_df"]) == ((1,), (2,)) and tuple(mlp["w_down_fd"]) == ((1,), (2,))
    assert dims["embed_vd"] is None and dims["lm_head_dv"] is None and dims["final_norm"]["weight"] is None
    assert dims["blocks"]["attn_norm"]["weight"] is None


def test_muon_step_matches_torch_muon_and_adamw_steps_match_torch_adamw():
    """optim.name=muon against torch.optim.Muon (its "match_rms_adamw" learning-rate scale is optax's
    consistent_rms=0.2) on a matrix and on a 3-D projection as its [d, h*k] matrix, and against torch's
    AdamW on the embedding (spared from weight decay). The Muon halves are compared on the first step:
    after it optax bias-corrects the momentum (NAdam-style) and torch does not, by design; torch also
    orthogonalizes in bfloat16, hence the 2% tolerance."""
    import torch

    cfg = tiny_config("optim.name=muon", "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.02",
                      "optim.clip_norm=0", "optim.weight_decay=0.1")
    rng = np.random.RandomState(0)
    params = {"blocks": {0: {"attn": {"w_q_dhk": rng.randn(16, 4, 8)}, "mlp": {"w_down_fd": rng.randn(24, 16)}}},
              "embed_vd": rng.randn(32, 16)}
    params = jax.tree.map(lambda x: jnp.asarray(x * 0.1, jnp.float32), params)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), params) for _ in range(3)]
    flat = lambda tree: [tree["blocks"][0]["attn"]["w_q_dhk"].reshape(16, 32), tree["blocks"][0]["mlp"]["w_down_fd"],  # noqa: E731
                         tree["embed_vd"]]
    ref = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in flat(params)]
    o = cfg.optim
    muon = torch.optim.Muon(ref[:2], lr=o.lr, weight_decay=o.weight_decay, momentum=o.muon_momentum,
                            eps=o.eps, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(ref[2:], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=0.0)
    opt = make_optimizer(cfg.optim, 10)
    ours, state = params, opt.init(params)
    for i, g in enumerate(grads):
        updates, state = opt.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        for p, x in zip(ref, flat(g)):
            p.grad = torch.tensor(np.asarray(x))
        muon.step()
        adamw.step()
        if i == 0:
            for start, got, want in zip(flat(params)[:2], flat(ours)[:2], ref[:2]):
                moved, want_moved = np.asarray(got - start), want.detach().numpy() - np.asarray(start)
                assert np.linalg.norm(moved - want_moved) <= 0.02 * np.linalg.norm(want_moved)
    np.testing.assert_allclose(np.asarray(flat(ours)[2]), ref[2].detach().numpy(), atol=1e-6)


def test_twenty_adamw_steps_match_hf_llama_and_torch():
    import torch
    import transformers

    from codegen_jax.hf_config import transformers_config
    from codegen_jax.hf_params import to_hf_state_dict

    cfg = tiny_config("optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=1e-3", "optim.clip_norm=0",
                      "optim.weight_decay=0.1", "optim.decay_norms_and_embeddings=true", "train.steps=20")
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    graphdef, opt, state, params_sh = _state(cfg, mesh, seed=3)
    m = cfg.model
    hf = transformers.AutoModelForCausalLM.from_config(transformers_config(m))
    hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(state.params, m).items()})
    torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    step = make_train_step(graphdef, opt, schedule(cfg.optim, 20), mesh,
                           TrainState(NamedSharding(mesh, P()), params_sh, None), 1, 0.0)
    batches = [_batch(b=4, t=16, seed=100 + i % 2) for i in range(20)]  # two in turn: learnable, so loss falls
    ours, theirs = losses_side_by_side(step, state, hf, torch_opt, batches)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0]


# ---- the loop, in this process -------------------------------------------------------------------


def test_loss_decreases_and_outputs_written(tmp_path):
    from codegen_jax.train.loop import train

    cfg = tiny_config(*SMALL_DATA, "train.steps=40", "train.log_every=5", "train.eval_every=20",
                      "checkpoint.every=20", "optim.lr=5e-3", "optim.warmup_steps=5")
    out = train(cfg, workdir=str(tmp_path), samples=False)
    losses = list(out["losses"].values())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train_recs[1:])
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and all(r["eval_bpb"] > 0 for r in evals)
    assert (tmp_path / "loss.png").stat().st_size > 0 and list((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "config.yaml").exists()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]


def test_resume_with_other_model_shape_fails_clearly(tmp_path):
    from codegen_jax.errors import UserError
    from codegen_jax.train.loop import train

    train(tiny_config(*SMALL_DATA, "train.steps=2", "checkpoint.every=2"), workdir=str(tmp_path), samples=False)
    with pytest.raises(UserError, match="model.n_layers: 2 there, 3 here"):
        train(tiny_config(*SMALL_DATA, "train.steps=4", "model.n_layers=3"), workdir=str(tmp_path), samples=False)


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path):
    from codegen_jax import checkpoint as ckpt
    from codegen_jax.errors import UserError
    from codegen_jax.train.loop import train

    base = [*SMALL_DATA, "train.steps=2", "checkpoint.every=2"]
    train(tiny_config(*base), workdir=str(tmp_path), samples=False)
    with pytest.raises(UserError, match="loss is not finite at step") as e:
        train(tiny_config(*SMALL_DATA, "train.steps=8", "checkpoint.every=1", "optim.lr=1e30",
                          "optim.schedule=constant", "optim.warmup_steps=0"),
              workdir=str(tmp_path), samples=False)
    import re

    bad, good = map(int, re.search(r"at step (\d+); the last good checkpoint \(step (\d+)\) is intact",
                                   str(e.value)).groups())
    assert good == bad - 1 and good >= 2
    mngr = ckpt.manager(tmp_path)
    assert max(mngr.all_steps()) == good  # nothing written from the bad step
    assert ckpt.read_meta(mngr, good)["step"] == good


def test_init_from_loads_params_with_fresh_optimizer(tmp_path):
    from codegen_jax import checkpoint as ckpt
    from codegen_jax.model import layer_layout
    from codegen_jax.train.loop import train

    src = tmp_path / "src"
    train(tiny_config(*SMALL_DATA, "train.steps=3", "checkpoint.every=3"), workdir=str(src), samples=False)
    _, model, _, _ = ckpt.load_inference(src)
    # the source scans its layers, the fine-tune does not: params convert on load
    expected = layer_layout(nnx.to_pure_dict(nnx.state(model)), scanned=True, scan_layers=False)
    dst = tmp_path / "dst"
    out = train(tiny_config(*SMALL_DATA, "train.steps=1", "optim.warmup_steps=0", "optim.lr=1e-9",
                            "optim.schedule=constant", "model.scan_layers=false"),
                workdir=str(dst), init_from=str(src), samples=False)
    assert list(out["losses"]) == [1]  # a fresh run: step 1, not 4
    _, tuned, _, _ = ckpt.load_inference(dst)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                 expected, nnx.to_pure_dict(nnx.state(tuned)))


# ---- the CLI in subprocesses: kill -9, SIGTERM, corrupt checkpoints ----------------------------------

CLI_ARGS = ["--config", "configs/tiny.yaml", *TINY_CLI_TRAIN, "data.max_docs=150"]


def _cli(workdir, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "codegen_jax.cli", "train", *CLI_ARGS, "--workdir", str(workdir),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _losses(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def _wait_for(pred, proc, timeout=300):
    t = time.time()
    while not pred():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t < timeout
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_then_restart_gives_bit_identical_losses(tmp_path):
    ref = _cli(tmp_path / "ref", "train.steps=12", "checkpoint.every=4")
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    killed = _cli(tmp_path / "run", "train.steps=12", "checkpoint.every=4")
    ckpt6 = tmp_path / "run" / "checkpoints" / "4"
    _wait_for(lambda: ckpt6.exists() and len(_losses(tmp_path / "run")) >= 6, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    again = _cli(tmp_path / "run", "train.steps=12", "checkpoint.every=4")
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    assert "resumed from step" in out
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")  # bit-identical floats, every step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = _cli(tmp_path, "train.steps=100000", "checkpoint.every=100000")
    _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(_losses(tmp_path)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and steps[0] >= 2 and "saved checkpoint at step" in out


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    first = _cli(tmp_path, "train.steps=4", "checkpoint.every=2")
    assert first.wait(timeout=600) == 0, first.stdout.read()
    for f in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    resumed = _cli(tmp_path, "train.steps=5", "checkpoint.every=2")
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "checkpoint step 4 is unreadable" in out and "resumed from step 2" in out
    assert list((tmp_path / "checkpoints_unreadable").iterdir())  # kept aside, not deleted
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 5]  # keep=2


@pytest.mark.slow
def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    first = _cli(tmp_path, "train.steps=2", "checkpoint.every=2")
    assert first.wait(timeout=600) == 0, first.stdout.read()

    # a write past 100 KB fails with EFBIG, as on a full disk (set in the child itself: no preexec_fn,
    # which is unsafe in this multithreaded process)
    small_disk = ("import resource, runpy, signal, sys; "
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
                  "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); sys.argv[0] = 'codegen-jax'; "
                  "runpy.run_module('codegen_jax.cli', run_name='__main__')")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    full = subprocess.run([sys.executable, "-c", small_disk, "train", *CLI_ARGS, "--workdir", str(tmp_path),
                           "train.steps=4", "checkpoint.every=2"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert full.returncode == 2, full.stderr[-3000:]
    # Orbax's save threads log the write error themselves, in any order with ours: find our line
    ours = [line for line in full.stderr.splitlines() if line.startswith("codegen-jax train: error: ")]
    assert len(ours) == 1 and "failed" in ours[0] and "the earlier checkpoints are intact" in ours[0], ours
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    again = _cli(tmp_path, "train.steps=4", "checkpoint.every=2")
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "resumed from step 2" in out, out
