"""LoRA: adapters that start as the identity, train alone (the base frozen, optimizer state adapter-sized),
match HF + PEFT + torch AdamW step for step, export merged or in PEFT's format, and resume exactly."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from codegen_jax import cli, lora
from codegen_jax.checkpoint import write_params_checkpoint
from codegen_jax.config import ConfigError
from codegen_jax.hf_config import transformers_config
from codegen_jax.hf_params import to_hf_state_dict
from codegen_jax.model import create_model
from codegen_jax.sharding import make_mesh
from codegen_jax.train.optim import make_optimizer, schedule
from codegen_jax.train.step import TrainState, make_train_step

from conftest import losses_side_by_side, tiny_config

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.targets=[q,k,v,o,gate,up,down]"]
OPT = ["optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=1e-2", "optim.clip_norm=0",
       "optim.weight_decay=0.1"]


def _models(cfg, seed=3):
    """(plain model, LoRA model with the same base weights) and their params."""
    plain = create_model(cfg.model, seed=seed)
    adapted = create_model(cfg.model, seed=seed, lora=cfg.lora)
    base = nnx.to_pure_dict(nnx.state(plain))
    full = nnx.to_pure_dict(nnx.state(adapted))
    params = lora.join(lora.trained(full, cfg.lora), base)
    state = nnx.state(adapted)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(adapted, state)
    return plain, adapted, params


def _batch(seed, b=4, t=16, vocab=101):
    tokens = np.random.RandomState(seed).randint(0, vocab, (b, t)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones((b, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": np.ones((b, t), np.int32)}


def _step(cfg, params):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    graphdef, _ = nnx.split(create_model(cfg.model, lora=cfg.lora))
    opt = make_optimizer(cfg.optim, 10)
    trained = lora.trained(params, cfg.lora)
    shardings = TrainState(NamedSharding(mesh, P()), jax.tree.map(lambda _: NamedSharding(mesh, P()), params),
                           None)
    step = make_train_step(graphdef, opt, schedule(cfg.optim, 10), mesh, shardings, lora_cfg=cfg.lora)
    return step, TrainState(jnp.int32(0), params, opt.init(trained))


def test_fresh_adapters_leave_the_logits_unchanged():
    cfg = tiny_config(*LORA)
    plain = create_model(cfg.model, seed=3)
    adapted = create_model(cfg.model, seed=3, lora=cfg.lora)  # its own base weights, not copied in
    tokens = jnp.asarray(_batch(0)["tokens"])
    np.testing.assert_array_equal(np.asarray(adapted(tokens)[0]), np.asarray(plain(tokens)[0]))
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(adapted)))}
    assert "['blocks']['attn']['lora_a_o_hkr']" in names and "['blocks']['mlp']['lora_b_down_rd']" in names


def test_adapter_dropout_acts_in_training_only():
    cfg = tiny_config("lora.enabled=true", "lora.rank=4", "lora.dropout=0.5", "lora.targets=[q]", "model.scan_layers=false")
    model = create_model(cfg.model, seed=3, lora=cfg.lora)
    attn = model.blocks[0].attn
    nnx.update(attn, nnx.State({"lora_b_q_rhk": nnx.Param(jnp.ones_like(attn.lora_b_q_rhk[...]))}))
    x_btd = jax.random.normal(jax.random.key(0), (2, 8, cfg.model.d_model))
    plain = lora.delta(attn, "q", x_btd, 1, None)
    dropped = lora.delta(attn, "q", x_btd, 1, jax.random.key(1))
    assert not np.allclose(plain, dropped)
    np.testing.assert_array_equal(dropped, lora.delta(attn, "q", x_btd, 1, jax.random.key(1)))  # keyed


def test_a_step_changes_only_the_adapters_and_the_optimizer_state_is_adapter_sized():
    cfg = tiny_config(*LORA, *OPT)
    _, _, params = _models(cfg)
    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
    before = flat(params)  # host copies: the step donates its state
    step, state = _step(cfg, params)
    new, _ = step(state, jax.tree.map(jnp.asarray, _batch(1)))
    after = flat(new.params)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_b" in k for k in changed)  # B moved off zero
    adapters = sum(v.size for k, v in before.items() if "lora_" in k)
    moments = sum(x.size for x in jax.tree.leaves(new.opt_state) if x.ndim > 0)
    assert moments == 2 * adapters < sum(v.size for v in before.values())


def test_ten_steps_match_hf_with_peft_and_torch_adamw():
    import peft

    cfg = tiny_config(*LORA, *OPT)
    _, _, params = _models(cfg)
    m = cfg.model
    hf = transformers.AutoModelForCausalLM.from_config(transformers_config(m))
    hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(lora.strip(params), m).items()})
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ours_a = {t.name: t.value for t in lora.peft_tensors(jax.tree.map(np.asarray, params), m, cfg.lora)}
    with torch.no_grad():  # the same adapter start on both sides (A random, B zero)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.from_numpy(ours_a[name.replace(".default", "")].copy()))
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(trainable, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    step, state = _step(cfg, params)
    ours, theirs = losses_side_by_side(step, state, model, torch_opt, [_batch(100 + i % 2) for i in range(10)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < ours[0]


STARCODER2 = ["model.norm=layer", "model.mlp=gelu_tanh", "model.attention_bias=true", "model.attention_out_bias=true",
              "model.mlp_bias=true", "lora.targets=[q,k,v,o,fc,proj]"]


@pytest.mark.parametrize("arch", [[], [*STARCODER2, "model.scan_layers=false"]], ids=["llama", "starcoder2-unscanned"])
def test_merged_export_and_the_peft_adapter_both_compute_the_adapted_model(tmp_path, small_tokenizer, arch):
    import peft

    cfg = tiny_config(*LORA, *OPT, *arch, f"model.vocab_size={small_tokenizer.vocab_size}")
    _, _, params = _models(cfg)
    step, state = _step(cfg, params)
    for i in range(3):  # adapters away from their start (the state is donated step to step)
        state, _ = step(state, jax.tree.map(jnp.asarray, _batch(i, vocab=cfg.model.vocab_size)))
    tuned = jax.tree.map(np.asarray, state.params)
    write_params_checkpoint(tmp_path / "run", cfg, tuned, small_tokenizer, step=3)
    base_cfg = tiny_config(*OPT, *[o for o in arch if not o.startswith("lora.")],
                           f"model.vocab_size={small_tokenizer.vocab_size}")
    write_params_checkpoint(tmp_path / "base", base_cfg, lora.strip(tuned), small_tokenizer, step=0)
    for args in (["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "merged")],
                 ["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "adapter"), "--adapter-only"],
                 ["--checkpoint", str(tmp_path / "base"), "--out", str(tmp_path / "base_hf")]):
        assert cli.main(["export-hf", *args]) == 0
    model = create_model(cfg.model, lora=cfg.lora)
    nnx.update(model, _pure_state(model, tuned))
    tokens = _batch(9, vocab=cfg.model.vocab_size)["tokens"]
    ours = np.asarray(model(jnp.asarray(tokens))[0])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        for hf in (merged, adapted):
            np.testing.assert_allclose(hf(torch.from_numpy(tokens).long()).logits.numpy(), ours, atol=1e-4)


def _pure_state(model, params):
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    return state


def test_resume_with_lora_is_bit_identical(tmp_path):
    from codegen_jax.train.loop import train

    cfg = tiny_config(*LORA, "lora.dropout=0.1", "data.max_docs=60", "model.vocab_size=512", "train.steps=6",
                      "checkpoint.every=3", "checkpoint.async_save=false", "train.sample_prompts=[]",
                      "train.eval_every=100")
    ref = train(cfg, workdir=str(tmp_path / "ref"), samples=False)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "3", tmp_path / "run" / "checkpoints" / "3")
    shutil.copytree(tmp_path / "ref" / "tokenizer", tmp_path / "run" / "tokenizer")
    resumed = train(cfg, workdir=str(tmp_path / "run"), samples=False)
    assert resumed["losses"] == {s: ref["losses"][s] for s in (4, 5, 6)}  # dropout included


def test_plan_counts_adapter_sized_optimizer_state():
    from codegen_jax.plan import plan

    full, tuned = plan(tiny_config()), plan(tiny_config(*LORA))
    assert tuned["params_bytes"] > full["params_bytes"]  # the adapters add a little
    assert tuned["optimizer_bytes"] < full["optimizer_bytes"] / 5 and tuned["grads_bytes"] * 2 == tuned["optimizer_bytes"]


@pytest.mark.parametrize("overrides, message", [
    (["lora.enabled=true", "lora.targets=[q,fc]"], "fc is not a projection of this model"),
    (["lora.enabled=true", "lora.rank=0"], "lora.rank must be positive"),
    (["lora.enabled=true", "lora.targets=[q,v,q]"], "names a projection twice"),
])
def test_bad_lora_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_adapter_only_export_of_a_run_without_lora_is_one_line(tmp_path, small_tokenizer, capsys):
    cfg = tiny_config(f"model.vocab_size={small_tokenizer.vocab_size}")
    write_params_checkpoint(tmp_path / "run", cfg, nnx.to_pure_dict(nnx.state(create_model(cfg.model))),
                            small_tokenizer, step=0)
    assert cli.main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "a"),
                     "--adapter-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not trained with LoRA" in err[0]


def test_resuming_with_another_lora_section_or_rope_is_one_line():
    from codegen_jax.errors import UserError
    from codegen_jax.train.loop import _check_model_compatible

    saved = tiny_config(*LORA).to_dict()
    _check_model_compatible(saved, tiny_config(*LORA), "checkpoint in X")  # the same: fine
    with pytest.raises(UserError, match=r"lora.rank: 4 there, 8 here.*--init-from"):
        _check_model_compatible(saved, tiny_config(*LORA, "lora.rank=8"), "checkpoint in X")
    with pytest.raises(UserError, match="lora.enabled: True there, False here"):
        _check_model_compatible(saved, tiny_config(), "checkpoint in X")
    longer = tiny_config(*LORA, "model.rope_scaling=linear", "model.rope_factor=2")  # what the weights compute
    with pytest.raises(UserError, match="model.rope_scaling: none there, linear here"):
        _check_model_compatible(saved, longer, "checkpoint in X")
    _check_model_compatible(saved, longer, "--init-from X", layout_matters=False)  # a fine-tune may change it


def test_merge_of_bfloat16_weights_sums_in_float32():
    cfg = tiny_config(*LORA, "lora.targets=[q,o]")
    full = nnx.to_pure_dict(nnx.state(create_model(cfg.model, seed=1, lora=cfg.lora)))
    full = jax.tree.map(lambda x: np.asarray(x) + 0.01, full)  # B off zero
    as_bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), full)
    want, got = lora.merge(full, cfg.model, cfg.lora), lora.merge(as_bf16, cfg.model, cfg.lora)
    w_q = lambda p: p["blocks"]["attn"]["w_q_dhk"] if cfg.model.scan_layers else p["blocks"][0]["attn"]["w_q_dhk"]  # noqa: E731
    assert w_q(got).dtype == jnp.bfloat16
    np.testing.assert_allclose(w_q(got).astype(np.float32), w_q(want), rtol=2e-2, atol=2e-3)


def test_config_knows_the_same_targets_as_the_model():
    from codegen_jax.config import LORA_TARGETS  # config imports nothing of ours: its own copy of the names

    assert set().union(*LORA_TARGETS.values()) == set(lora.TARGETS)
    assert all(lora.TARGETS[t][0] in ("attn", "mlp") for t in lora.TARGETS)
