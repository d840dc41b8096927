"""HF interop against transformers' PyTorch models (CPU, random weights, never the hub).

Import: a random HF Llama/Mistral/Qwen2 -> our checkpoint -> our logits equal HF's on a padded batch.
Export: our random checkpoint -> HF directory -> AutoModelForCausalLM logits and a 64-token greedy
decode equal ours. Round trips are bit exact; every refusal is one clear UserError line.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import torch
import transformers
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from codegen_jax import cli  # noqa: E402
from codegen_jax.checkpoint import load_inference, write_params_checkpoint  # noqa: E402
from codegen_jax.data.tokenizer import train_tokenizer  # noqa: E402
from codegen_jax.errors import UserError  # noqa: E402
from codegen_jax.hf import export_hf, import_hf  # noqa: E402
from codegen_jax.model import abstract_model  # noqa: E402

from conftest import run_with_devices, tiny_config  # noqa: E402

D_MODEL, N_HEADS, D_FF, N_LAYERS, MAX_LEN = 64, 4, 128, 2, 128
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n"

# Each axis value appears at least once: kv heads (n_heads, 2, 1), tied/untied, rope theta 1e4/5e5,
# odd/even vocab, scanned/looped layers. Six cases instead of the 48-way cross product.
CASES = [
    pytest.param(dict(n_kv=4, tie=True, theta=1e4, vocab=273, scan=True), id="mha-tied-1e4-odd-scan"),
    pytest.param(dict(n_kv=2, tie=False, theta=5e5, vocab=288, scan=False), id="gqa-untied-5e5-loop"),
    pytest.param(dict(n_kv=1, tie=False, theta=1e4, vocab=273, scan=True), id="mqa-untied-1e4-odd-scan"),
    pytest.param(dict(n_kv=2, tie=True, theta=5e5, vocab=275, scan=True), id="gqa-tied-5e5-odd-scan"),
    pytest.param(dict(n_kv=4, tie=False, theta=5e5, vocab=288, scan=False), id="mha-untied-5e5-loop"),
    pytest.param(dict(n_kv=1, tie=True, theta=1e4, vocab=288, scan=False), id="mqa-tied-1e4-loop"),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one torch thread


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT] * 20, 270)


# ---------------------------------------------------------------------------------------------------
# helpers


def _hf_kwargs(case: dict) -> dict:
    return dict(vocab_size=case["vocab"], hidden_size=D_MODEL, intermediate_size=D_FF,
                num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=case["n_kv"],
                rope_theta=case["theta"], tie_word_embeddings=case["tie"], max_position_embeddings=MAX_LEN,
                rms_norm_eps=1e-5)


def _random_hf(cls_name: str, seed: int = 0, **kwargs):
    """A random HF model whose norm scales and biases are random too, so a swapped or dropped norm or
    bias changes the logits."""
    cfg = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _save_hf(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save(path)
    return path


def _padded_batch(vocab: int, seed: int = 0):
    """ids, mask (left padding of 0, 4 and 9 tokens), positions counting real tokens only."""
    ids = np.random.RandomState(seed).randint(0, vocab, (3, 14))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, pos


def _our_logits(model, ids, mask, pos) -> np.ndarray:
    logits, _ = model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    return np.asarray(logits)


def _hf_logits(model, ids, mask, pos) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


def _assert_logits_match(ours_model, hf_model, vocab: int, atol: float = 1e-4) -> None:
    ids, mask, pos = _padded_batch(vocab)
    ours, ref = _our_logits(ours_model, ids, mask, pos), _hf_logits(hf_model, ids, mask, pos)
    real = mask.astype(bool)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours[real], ref[real], atol=atol, rtol=0)


def _load_exported(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _random_params(cfg, seed: int):
    """Our params with random values everywhere (norm scales and biases included), scaled so that
    greedy decodes wander over many tokens instead of repeating one, with decisive argmaxes."""
    _, abs_state = abstract_model(cfg)
    leaves, treedef = jax.tree.flatten_with_path(abs_state.to_pure_dict())
    rng = np.random.RandomState(seed)
    out = []
    for path, a in leaves:
        name = str(path[-1].key)
        x = rng.standard_normal(a.shape).astype(np.float32)
        out.append(1 + 0.2 * x if name == "weight" else 0.3 * x if name == "embed_vd" else 0.2 * x)
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in out])


def _our_checkpoint(tmp: Path, case: dict, tok, seed: int = 0, **extra) -> Path:
    overrides = [f"model.vocab_size={case['vocab']}", f"model.d_model={D_MODEL}", f"model.n_heads={N_HEADS}",
                 f"model.n_kv_heads={case['n_kv']}", f"model.d_ff={D_FF}", f"model.n_layers={N_LAYERS}",
                 f"model.max_seq_len={MAX_LEN}", f"model.rope_theta={case['theta']}",
                 f"model.tie_embeddings={case['tie']}", f"model.scan_layers={case['scan']}",
                 *[f"model.{k}={v}" for k, v in extra.items()]]
    cfg = tiny_config(*overrides)
    write_params_checkpoint(tmp, cfg, _random_params(cfg.model, seed), tok)
    return tmp


def _our_greedy(model, prompt_bp: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Naive greedy decode by full recompute over a fixed-length buffer (one compile): (new tokens
    [b, n], gap between the top two logits at each step [b, n])."""
    b, p = prompt_bp.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_logits(state, toks_bt, t):
        seg_bt = jnp.broadcast_to((jnp.arange(p + n) < t).astype(jnp.int32), toks_bt.shape)
        logits_btv, _ = nnx.merge(graphdef, state)(toks_bt, None, seg_bt)
        return logits_btv[:, t - 1]

    toks = np.zeros((b, p + n), np.int32)
    toks[:, :p] = prompt_bp
    gaps = np.zeros((b, n), np.float32)
    for t in range(p, p + n):
        logits = np.asarray(next_logits(state, jnp.asarray(toks), t))
        top2 = np.sort(logits, axis=-1)[:, -2:]
        gaps[:, t - p] = top2[:, 1] - top2[:, 0]
        toks[:, t] = logits.argmax(-1)
    return toks[:, p:], gaps


def _assert_same_greedy(ours: np.ndarray, gaps: np.ndarray, theirs: np.ndarray) -> None:
    """Equal token for token; a row may differ only from a step where our top two logits tie."""
    for r in range(ours.shape[0]):
        diff = np.flatnonzero(ours[r] != theirs[r])
        if diff.size:
            j = diff[0]
            assert gaps[r, j] < 1e-4, f"row {r} differs at step {j}: ours {ours[r]}, HF {theirs[r]}"


def _tensors(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


# ---------------------------------------------------------------------------------------------------
# import


@pytest.fixture(scope="module", params=CASES)
def imported(request, tmp_path_factory, tok):
    case = request.param
    tmp = tmp_path_factory.mktemp("imp")
    hf = _random_hf("LlamaForCausalLM", seed=1, **_hf_kwargs(case))
    hf_dir = _save_hf(hf, tok, tmp / "hf")
    import_hf(hf_dir, tmp / "ours", scan_layers=case["scan"])
    return case, hf, hf_dir, tmp / "ours"


def test_import_matches_hf_logits(imported):
    case, hf, _, ours_dir = imported
    cfg, model, _, _ = load_inference(ours_dir)
    m = cfg.model
    assert (m.n_kv_heads, m.tie_embeddings, m.rope_theta, m.vocab_size, m.scan_layers) == (
        case["n_kv"], case["tie"], case["theta"], case["vocab"], case["scan"])
    assert (m.max_seq_len, m.norm_eps, m.head_dim, m.attention_bias) == (MAX_LEN, 1e-5, 16, False)
    _assert_logits_match(model, hf, case["vocab"])


def test_import_export_is_bit_exact(imported, tmp_path):
    case, _, hf_dir, ours_dir = imported
    export_hf(ours_dir, tmp_path / "exp")
    before, after = _tensors(hf_dir), _tensors(tmp_path / "exp")
    assert sorted(before) == sorted(after)
    assert ("lm_head.weight" in after) != case["tie"]
    for name, x in before.items():
        assert after[name].dtype == x.dtype and torch.equal(after[name], x), name


# ---------------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("case", CASES)
def test_export_matches_ours(case, tmp_path, tok):
    ckpt = _our_checkpoint(tmp_path / "ours", case, tok)
    export_hf(ckpt, tmp_path / "hf")
    hf = _load_exported(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] == case["tie"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == case["theta"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.config.num_key_value_heads == case["n_kv"]
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}

    _, model, _, _ = load_inference(ckpt)
    _assert_logits_match(model, hf, case["vocab"])
    prompt = np.random.RandomState(3).randint(0, case["vocab"], (2, 5))
    ours, gaps = _our_greedy(model, prompt, 64)
    assert min(len(set(row)) for row in ours) > 10  # a decode stuck on one token would prove little
    hf.generation_config.eos_token_id = None  # run all 64 steps; stopping at EOS is tested end to end
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             max_new_tokens=64, do_sample=False).numpy()[:, 5:]
    _assert_same_greedy(ours, gaps, theirs)


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, tok):
    case = CASES[1].values[0]
    return case, _our_checkpoint(tmp_path_factory.mktemp("one"), case, tok, seed=5)


def test_export_sharded_writes_index_and_loads(one_checkpoint, tmp_path):
    case, ckpt = one_checkpoint
    export_hf(ckpt, tmp_path / "hf", max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and "model.safetensors" not in shards
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(x.numel() * 4 for x in _tensors(tmp_path / "hf").values())
    _, model, _, _ = load_inference(ckpt)
    _assert_logits_match(model, _load_exported(tmp_path / "hf"), case["vocab"])
    import_hf(tmp_path / "hf", tmp_path / "back", scan_layers=case["scan"])  # reads the index too
    _, back, _, _ = load_inference(tmp_path / "back")
    same = jax.tree.map(np.array_equal, nnx.state(model).to_pure_dict(), nnx.state(back).to_pure_dict())
    assert all(jax.tree.leaves(same))


def test_export_bfloat16_halves_size_and_loads(one_checkpoint, tmp_path):
    case, ckpt = one_checkpoint
    export_hf(ckpt, tmp_path / "f32")
    export_hf(ckpt, tmp_path / "bf16", dtype="bfloat16")
    size32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert 0.49 < size16 / size32 < 0.52
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    hf16 = _load_exported(tmp_path / "bf16")
    assert hf16.dtype == torch.bfloat16
    w32, w16 = _tensors(tmp_path / "f32"), _tensors(tmp_path / "bf16")
    for name, x in w32.items():  # round to nearest even, as torch does
        assert torch.equal(w16[name], x.to(torch.bfloat16)), name
    ids, mask, pos = _padded_batch(case["vocab"])
    ref = _hf_logits(_load_exported(tmp_path / "f32"), ids, mask, pos)
    got = _hf_logits(hf16, ids, mask, pos)
    real = mask.astype(bool)
    assert np.abs(got[real] - ref[real]).max() < 0.1 * np.abs(ref[real]).max()


# ---------------------------------------------------------------------------------------------------
# Qwen2 and Mistral


def test_qwen2_round_trip(tmp_path, tok):
    kwargs = {**_hf_kwargs(dict(n_kv=2, tie=True, theta=1e6, vocab=273)), "use_sliding_window": False}
    hf = _random_hf("Qwen2ForCausalLM", seed=2, **kwargs)
    hf_dir = _save_hf(hf, tok, tmp_path / "hf")
    import_hf(hf_dir, tmp_path / "ours")
    cfg, model, _, _ = load_inference(tmp_path / "ours")
    assert cfg.model.attention_bias and cfg.model.tie_embeddings
    _assert_logits_match(model, hf, 273)

    export_hf(tmp_path / "ours", tmp_path / "exp")
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    before, after = _tensors(hf_dir), _tensors(tmp_path / "exp")
    assert sorted(before) == sorted(after) and any(k.endswith("q_proj.bias") for k in after)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    _assert_logits_match(model, _load_exported(tmp_path / "exp"), 273)


def test_mistral_round_trip(tmp_path, tok):
    """A bfloat16 Mistral whose sliding window covers the whole context (so it is plain causal)."""
    kwargs = {**_hf_kwargs(dict(n_kv=2, tie=False, theta=1e4, vocab=275)), "sliding_window": MAX_LEN}
    hf = _random_hf("MistralForCausalLM", seed=3, **kwargs)
    with torch.no_grad():  # bf16-representable fp32 weights: the reference for our fp32 import
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    hf_dir = _save_hf(copy.deepcopy(hf).to(torch.bfloat16), tok, tmp_path / "hf")
    import_hf(hf_dir, tmp_path / "ours", scan_layers=False)
    _, model, _, _ = load_inference(tmp_path / "ours")
    _assert_logits_match(model, hf, 275)
    export_hf(tmp_path / "ours", tmp_path / "exp", dtype="bfloat16")  # written as Llama: same function
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", dtype=torch.float32)
    _assert_logits_match(model, exported, 275)
    before, after = _tensors(hf_dir), _tensors(tmp_path / "exp")
    assert sorted(before) == sorted(after) and all(torch.equal(after[k], v) for k, v in before.items())
    assert next(iter(after.values())).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def base_hf_dir(tmp_path_factory, tok):
    hf = _random_hf("LlamaForCausalLM", **_hf_kwargs(dict(n_kv=2, tie=False, theta=1e4, vocab=273)))
    return _save_hf(hf, tok, tmp_path_factory.mktemp("base") / "hf")


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, drop: str | None = None, add: dict | None = None) -> None:
    tensors = load_file(d / "model.safetensors")
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


_DROP = object()
REFUSALS = [
    pytest.param(_pickle_only, "pickle weights", id="pickle-only"),
    pytest.param(lambda d: _edit_config(d, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"},
                                        architectures=["XForCausalLM"]), "trust_remote_code", id="remote-code"),
    pytest.param(lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                 "unsupported architecture", id="architecture"),
    pytest.param(lambda d: _edit_config(d, rope_parameters={"rope_type": "longrope", "rope_theta": 5e5}),
                 "rope_type 'longrope', which is not supported; supported rope types: default, linear, "
                 "llama3, yarn", id="rope-type-v5"),
    pytest.param(lambda d: _edit_config(d, rope_parameters=_DROP, rope_scaling={"type": "dynamic", "factor": 2.0}),
                 "rope_type 'dynamic'", id="rope-type-v4"),
    pytest.param(lambda d: _edit_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0}),
                 "lacks numeric low_freq_factor, high_freq_factor", id="rope-llama3-incomplete"),
    pytest.param(lambda d: _edit_config(d, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                        use_sliding_window=True, sliding_window=16, max_window_layers=1),
                 r"sliding window \(16\) in 1 of 2 layers", id="qwen2-mixed-sliding-layers"),
    pytest.param(lambda d: _edit_config(d, architectures=["Starcoder2ForCausalLM"], model_type="starcoder2",
                                        hidden_act="gelu"), "hidden_act 'gelu' is not supported for StarCoder2",
                 id="starcoder2-exact-gelu"),
    pytest.param(lambda d: _edit_config(d, mlp_bias=True), "mlp_bias", id="mlp-bias"),
    pytest.param(lambda d: _edit_config(d, tie_word_embeddings=True), "lm_head.weight differs",
                 id="tied-but-different-lm-head"),
    pytest.param(lambda d: _edit_config(d, intermediate_size=96), r"implies \[96, 64\]",
                 id="shape-mismatch"),
    pytest.param(lambda d: _edit_tensors(d, drop="model.layers.1.mlp.up_proj.weight"), "missing",
                 id="missing-tensor"),
    pytest.param(lambda d: _edit_tensors(d, add={"model.layers.0.mlp.up_proj.bias": torch.zeros(D_FF)}),
                 "does not describe", id="unexpected-tensor"),
    pytest.param(lambda d: _edit_config(d, attention_bias=True), "missing", id="llama-attention-bias-missing"),
]


@pytest.mark.parametrize("mutate, message", REFUSALS)
def test_import_refusals(base_hf_dir, tmp_path, mutate, message):
    d = tmp_path / "hf"
    shutil.copytree(base_hf_dir, d)
    mutate(d)
    with pytest.raises(UserError, match=message) as e:
        import_hf(d, tmp_path / "ours")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "ours").exists()


def test_import_reads_a_v4_style_config(base_hf_dir, tmp_path):
    """transformers 4.x writes rope_theta at the top level and torch_dtype instead of dtype."""
    d = tmp_path / "hf"
    shutil.copytree(base_hf_dir, d)
    _edit_config(d, rope_parameters=_DROP, dtype=_DROP, rope_theta=5e5, rope_scaling=None, torch_dtype="float32")
    import_hf(d, tmp_path / "ours")
    cfg, _, _, _ = load_inference(tmp_path / "ours")
    assert cfg.model.rope_theta == 5e5


def test_llama_attention_bias_round_trip(tmp_path, tok):
    """Llama's attention_bias (q/k/v and o_proj biases, all random) imports as model.attention_bias +
    model.attention_out_bias and exports back as Llama, bit exact."""
    hf = _random_hf("LlamaForCausalLM", seed=4, attention_bias=True,
                    **_hf_kwargs(dict(n_kv=2, tie=False, theta=1e4, vocab=273)))
    hf_dir = _save_hf(hf, tok, tmp_path / "hf")
    import_hf(hf_dir, tmp_path / "ours")
    cfg, model, _, _ = load_inference(tmp_path / "ours")
    assert cfg.model.attention_bias and cfg.model.attention_out_bias
    _assert_logits_match(model, hf, 273)
    export_hf(tmp_path / "ours", tmp_path / "exp")
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["attention_bias"] is True
    before, after = _tensors(hf_dir), _tensors(tmp_path / "exp")
    assert sorted(before) == sorted(after) and any(k.endswith("o_proj.bias") for k in after)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    _assert_logits_match(model, _load_exported(tmp_path / "exp"), 273)


def test_cli_refusals_exit_2_with_one_line(base_hf_dir, one_checkpoint, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    d = tmp_path / "pickled"
    shutil.copytree(base_hf_dir, d)
    _pickle_only(d)
    _, ckpt = one_checkpoint
    calls = [(["import-hf", "--hf", str(d), "--out", str(tmp_path / "a")], "pickle"),
             (["import-hf", "--hf", str(base_hf_dir), "--out", str(tmp_path / "full")], "not empty"),
             (["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "full")], "not empty"),
             (["import-hf", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")], "not found")]
    for argv, message in calls:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_import_and_export_on_a_sharded_mesh(base_hf_dir, tmp_path):
    """Params are created sharded on a 2x2 (fsdp, tensor) mesh; export gathers them back bit exact."""
    run_with_devices(f"""
        import numpy as np
        from safetensors.numpy import load_file
        from codegen_jax import hf, hf_io
        from codegen_jax.checkpoint import load_inference
        from codegen_jax.sharding import make_mesh

        mesh = make_mesh({{"data": 1, "fsdp": 2, "tensor": 2}})
        out = hf.import_hf("{base_hf_dir}", "{tmp_path}/ours", mesh=mesh)
        cfg, model, _, _ = load_inference(out, mesh)
        params = hf.read_params(hf_io.SafetensorsReader(hf.Path("{base_hf_dir}")), cfg.model, mesh)
        assert tuple(params["blocks"]["attn"]["w_q_dhk"].sharding.spec) == (None, "fsdp", "tensor", None)
        assert len(params["blocks"]["mlp"]["w_up_df"].addressable_shards) == 4
        hf.export_hf(out, "{tmp_path}/exp", mesh=mesh)
        a, b = load_file("{base_hf_dir}/model.safetensors"), load_file("{tmp_path}/exp/model.safetensors")
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    """, n_devices=4)


# ---------------------------------------------------------------------------------------------------
# end to end: our checkpoint -> export-hf -> transformers generates the same greedy text as ours


def test_exported_model_generates_like_codegen_jax_generate(tmp_path, tok, capsys):
    case = dict(n_kv=2, tie=False, theta=1e4, vocab=273, scan=True)
    ckpt = _our_checkpoint(tmp_path / "run", case, tok, seed=7)
    assert cli.main(["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    prompt = "def add(a, b):\n"
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    assert cli.main(["generate", "--checkpoint", str(ckpt), "--prompts-file", str(tmp_path / "prompts.jsonl"),
                     "--out", str(tmp_path / "out.jsonl"), "--temperature", "0", "--max-new-tokens", "40",
                     "--stop"]) == 0
    ours = json.loads((tmp_path / "out.jsonl").read_text())

    hf = _load_exported(tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.generation_config.eos_token_id == tok.eos_id == hf_tok.eos_token_id
    enc = hf_tok(prompt, return_tensors="pt")  # the plain HF way: BOS comes first, as in our generate
    assert enc.input_ids[0].tolist() == [tok.bos_id] + tok.encode(prompt)
    assert hf_tok(prompt, add_special_tokens=False).input_ids == tok.encode(prompt)
    with torch.no_grad():  # stops at EOS through generation_config.json
        out = hf.generate(**enc, max_new_tokens=40, do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    if out and out[-1] == tok.eos_id:
        out = out[:-1]
    assert out == ours["tokens"] and len(out) >= 10
    assert hf_tok.decode(out, skip_special_tokens=True) == ours["completion"]
