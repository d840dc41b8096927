"""HF parity of the architecture switches against transformers' PyTorch models (CPU, random weights,
never the hub): RoPE scaling (linear, llama3, yarn) on Llama, StarCoder2 (LayerNorm, GELU MLP, biases,
a sliding window), Mistral with a sliding window and a tied Qwen2 with yarn.

Each model is imported, then: logits equal HF's on inputs twice the original (pretraining) context,
32 greedy tokens from our Generator equal HF `generate` on the same ids, and the export has the
source's tensors, loads in `AutoModelForCausalLM` with no missing or unexpected keys and computes the
same RoPE frequencies.
"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from codegen_jax import cli
from codegen_jax.checkpoint import load_inference
from codegen_jax.config import ModelConfig
from codegen_jax.data.tokenizer import train_tokenizer
from codegen_jax.errors import UserError
from codegen_jax.hf import export_hf, import_hf
from codegen_jax.hf_config import (export_architecture, hf_config, model_config_from_hf,
                                    transformers_config)
from codegen_jax.rope import rope_attention_scale, rope_inv_freq
from codegen_jax.sample.generator import Generator

from test_hf import TEXT, _save_hf, _tensors

D_MODEL, N_HEADS, D_FF, N_LAYERS = 64, 4, 128, 2
ORIGINAL, MAX_LEN, TEST_LEN, VOCAB = 32, 128, 64, 270  # scaled RoPE: pretrained on 32, tested on 64
PROMPT_LEN, NEW_TOKENS = 40, 32  # the decode runs from past the original context to 72

ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    # head_dim 16, theta 1e4: wavelengths 6, 20, 63, ... cover llama3's kept, smoothed and scaled bands
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
}


def _base(n_kv: int, tie: bool, theta: float = 1e4) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF, num_hidden_layers=N_LAYERS,
                num_attention_heads=N_HEADS, num_key_value_heads=n_kv, tie_word_embeddings=tie,
                max_position_embeddings=MAX_LEN, rope_parameters={"rope_type": "default", "rope_theta": theta})


def _scaled(kind: str, theta: float = 1e4) -> dict:
    return {"rope_parameters": {**ROPE[kind], "rope_theta": theta}}


# (HF class, config kwargs, written in v4 spelling: rope_scaling + top-level rope_theta)
CASES = {
    "llama-linear-v4": ("LlamaForCausalLM", {**_base(2, False), **_scaled("linear")}, True),
    "llama-llama3-v4": ("LlamaForCausalLM", {**_base(4, False, 5e5), **_scaled("llama3", 5e5)}, True),
    "llama-yarn": ("LlamaForCausalLM", {**_base(1, True), **_scaled("yarn")}, False),
    "starcoder2-window16": ("Starcoder2ForCausalLM", {**_base(2, False, 1e5), "sliding_window": 16,
                                                      "norm_epsilon": 1e-5}, False),
    "starcoder2-full": ("Starcoder2ForCausalLM", {**_base(1, True), "sliding_window": None}, False),
    "mistral-window24": ("MistralForCausalLM", {**_base(2, False), "sliding_window": 24}, False),
    "qwen2-tied-yarn": ("Qwen2ForCausalLM", {**_base(2, True, 1e6), **_scaled("yarn", 1e6),
                                             "use_sliding_window": False}, False),
}
GREEDY = [c for c in CASES if not c.startswith("mistral")]  # Mistral's window decodes as StarCoder2's


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one torch thread


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT] * 20, VOCAB)


def _random_hf(cls_name: str, seed: int = 0, **kwargs):
    """A random HF model, every parameter random (norm scales and biases too, so a swapped or dropped
    one changes the logits), scaled so that greedy decodes wander over many tokens with decisive
    argmaxes (std 0.1 projections with std 1 embeddings get tied models stuck on one token)."""
    cfg = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_((0.2 if "norm" in name else 0.1) * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _to_v4(hf_dir) -> None:
    """Rewrite config.json as transformers 4.x wrote it: `rope_scaling` (with the old `type` key) and a
    top-level `rope_theta`, no `rope_parameters`."""
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    rp = config.pop("rope_parameters")
    config["rope_theta"] = rp.pop("rope_theta")
    config["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module", params=list(CASES))
def imported(request, tmp_path_factory, tok):
    cls, kwargs, v4 = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf = _random_hf(cls, seed=len(request.param), **kwargs)
    hf_dir = _save_hf(hf, tok, tmp / "hf")
    if v4:
        _to_v4(hf_dir)
    import_hf(hf_dir, tmp / "ours", scan_layers=cls != "MistralForCausalLM")
    cfg, model, tokenizer, _ = load_inference(tmp / "ours")
    return request.param, hf, hf_dir, tmp / "ours", cfg.model, model, tokenizer


def _assert_same_inv_freq(ours: np.ndarray, theirs: torch.Tensor) -> None:
    """Equal up to fp32 rounding: the formulas are transformers', but numpy's and torch's fp32 `pow`
    may round theta ** (i / k) differently by one ulp."""
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=3e-7, atol=0)


def _long_padded_batch(seed: int = 0):
    """[3, TEST_LEN] ids and mask (left padding of 0, 5 and 20), positions counting real tokens."""
    ids = np.random.RandomState(seed).randint(0, VOCAB, (3, TEST_LEN))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :20] = 0
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _assert_logits_equal_hf(model, hf) -> None:
    ids, mask, pos = _long_padded_batch()
    ours, _ = model(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=0)


def test_import_reads_the_architecture_and_matches_hf_logits_past_the_original_context(imported):
    name, hf, _, _, m, model, _ = imported
    c = hf.config
    assert (m.n_kv_heads, m.tie_embeddings, m.max_seq_len) == (c.num_key_value_heads, c.tie_word_embeddings, MAX_LEN)
    assert m.rope_scaling == (c.rope_parameters["rope_type"] if c.rope_parameters["rope_type"] != "default"
                              else "none")
    assert m.rope_theta == c.rope_parameters["rope_theta"]
    _assert_same_inv_freq(rope_inv_freq(m), hf.model.rotary_emb.inv_freq)
    assert rope_attention_scale(m) == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    window = getattr(c, "sliding_window", None)
    assert m.sliding_window == (window or 0)
    starcoder2 = name.startswith("starcoder2")
    assert (m.norm, m.mlp) == (("layer", "gelu_tanh") if starcoder2 else ("rms", "swiglu"))
    assert (m.attention_bias, m.attention_out_bias, m.mlp_bias) == (
        (True, True, True) if starcoder2 else (name.startswith("qwen2"), False, False))
    _assert_logits_equal_hf(model, hf)


@pytest.mark.parametrize("imported", GREEDY, indirect=True)
def test_greedy_generate_equals_hf_generate(imported):
    """32 greedy tokens from a 40-token prompt (past the original context and every window) through
    the Generator (prefill + compiled KV-cache decode) equal HF `generate` on the same ids. A row may
    differ only from a step where our two best logits tie."""
    _, hf, _, _, _, model, tokenizer = imported
    prompt = np.random.RandomState(5).randint(0, VOCAB, (2, PROMPT_LEN))
    gen = Generator(model, tokenizer, max_batch_size=2)
    ours = [c[0].tokens for c in gen.generate_ids(prompt.tolist(), ignore_eos=True, max_new_tokens=NEW_TOKENS,
                                                   temperature=0.0, stop=[])]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), attention_mask=torch.ones_like(torch.tensor(prompt)),
                             max_new_tokens=NEW_TOKENS, do_sample=False).numpy()[:, PROMPT_LEN:]
    for row, (a, b) in enumerate(zip(ours, theirs.tolist())):
        assert len(a) == NEW_TOKENS and len(set(a)) > 3, a  # a decode stuck on one token proves little
        diff = [j for j in range(NEW_TOKENS) if a[j] != b[j]]
        if diff:
            j = diff[0]
            logits, _ = model(jnp.asarray([prompt[row].tolist() + b[:j]]))
            top2 = np.sort(np.asarray(logits[0, -1]))[-2:]
            assert top2[1] - top2[0] < 1e-4, f"row {row} differs at step {j}: ours {a}, HF {b}"


def test_export_has_the_source_tensors_and_loads_in_transformers(imported, tmp_path):
    name, hf, hf_dir, ours_dir, _, model, _ = imported
    export_hf(ours_dir, tmp_path / "exp")
    before, after = _tensors(hf_dir), _tensors(tmp_path / "exp")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(exported) is type(hf)
    _assert_same_inv_freq(exported.model.rotary_emb.inv_freq.numpy(), hf.model.rotary_emb.inv_freq)
    assert exported.model.rotary_emb.attention_scaling == pytest.approx(hf.model.rotary_emb.attention_scaling)
    assert getattr(exported.config, "sliding_window", None) == getattr(hf.config, "sliding_window", None)
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    rope_type = hf.config.rope_parameters["rope_type"]
    assert config["rope_parameters"]["rope_type"] == rope_type
    assert (config["rope_scaling"] or {}).get("rope_type", "default") == rope_type  # v4 readers
    _assert_logits_equal_hf(model, exported.eval())


# ---------------------------------------------------------------------------------------------------
# the config mapping alone


def _llama_json(**extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "hidden_size": D_MODEL, "intermediate_size": D_FF, "num_hidden_layers": N_LAYERS,
            "num_attention_heads": N_HEADS, "max_position_embeddings": MAX_LEN, **extra}


@pytest.mark.parametrize("kind", list(ROPE))
def test_v4_and_v5_rope_spellings_read_the_same_and_match_transformers(kind):
    rp = dict(ROPE[kind])
    v5 = model_config_from_hf(_llama_json(rope_parameters={**rp, "rope_theta": 5e5}, rope_theta=None))
    v4 = model_config_from_hf(_llama_json(rope_scaling={"type": rp.pop("rope_type"), **rp}, rope_theta=5e5))
    assert v4 == v5 and v5["rope_scaling"] == kind
    m = ModelConfig(**v5)
    hf_cfg = transformers.LlamaConfig(**_llama_json(rope_parameters={**ROPE[kind], "rope_theta": 5e5}))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[kind](hf_cfg)
    _assert_same_inv_freq(rope_inv_freq(m), inv_freq)
    assert rope_attention_scale(m) == pytest.approx(attention_factor, rel=1e-12)


@pytest.mark.parametrize("extra", [
    dict(beta_fast=16.0, beta_slow=2.0, truncate=False),  # gpt-oss style: untruncated ramp
    dict(mscale=1.0, mscale_all_dim=0.5),  # DeepSeek style: attention factor from mscale ratios
    dict(attention_factor=1.25, factor=None),  # factor from max_position / original
])
def test_yarn_options_match_transformers(extra):
    rp = {**ROPE["yarn"], **extra, "rope_theta": 1e4}
    m = ModelConfig(**model_config_from_hf(_llama_json(rope_parameters=rp)))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**_llama_json(rope_parameters=rp)))
    _assert_same_inv_freq(rope_inv_freq(m), inv_freq)
    assert rope_attention_scale(m) == pytest.approx(attention_factor, rel=1e-12)


def test_qwen2_mixing_sliding_and_full_layers_is_refused_in_one_line():
    hf = {**_llama_json(), "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
          "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}
    with pytest.raises(UserError, match=r"sliding window \(16\) in 1 of 2 layers") as e:
        model_config_from_hf(hf)
    assert "\n" not in str(e.value)
    assert model_config_from_hf({**hf, "max_window_layers": 0})["sliding_window"] == 16  # every layer slides


@pytest.mark.parametrize("changes, message", [
    (dict(norm="layer"), "model.norm=layer with model.mlp=swiglu has no Hugging Face architecture"),
    (dict(norm="layer", mlp="gelu_tanh", attention_bias=True), "one use_bias"),
    (dict(attention_out_bias=True), "also needs model.attention_bias"),
])
def test_export_refuses_models_no_hf_architecture_computes(changes, message):
    m = ModelConfig(head_dim=64, **changes)
    with pytest.raises(UserError, match=message) as e:
        export_architecture(m)
    assert "\n" not in str(e.value)


def test_export_picks_the_architecture_that_computes_the_model():
    pick = lambda **kw: export_architecture(ModelConfig(head_dim=64, **kw))  # noqa: E731
    assert pick() == "LlamaForCausalLM" and pick(sliding_window=4096) == "LlamaForCausalLM"  # >= context
    assert pick(sliding_window=512) == "MistralForCausalLM"
    assert pick(attention_bias=True, sliding_window=512) == "Qwen2ForCausalLM"
    assert pick(attention_bias=True, attention_out_bias=True) == "LlamaForCausalLM"
    assert pick(norm="layer", mlp="gelu_tanh") == "Starcoder2ForCausalLM"


def test_cli_refuses_an_unsupported_rope_type_in_one_line(tmp_path, tok, capsys):
    hf_dir = _save_hf(_random_hf("LlamaForCausalLM", **_base(2, False)), tok, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    (hf_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # save_pretrained's progress bar
    assert cli.main(["import-hf", "--hf", str(hf_dir), "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "rope_type 'dynamic'" in err and "default, linear, llama3, yarn" in err
    assert not (tmp_path / "ours").exists()
    shutil.rmtree(hf_dir)


@pytest.mark.parametrize("changes", [
    dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=512, rope_beta_fast=16.0,
         rope_truncate=False, rope_attention_factor=1.2),
    dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=256, rope_high_freq_factor=2.0),
    dict(rope_scaling="linear", rope_factor=2.0, sliding_window=512),  # Mistral
    dict(attention_bias=True, sliding_window=512),  # Qwen2, every layer sliding
    dict(attention_bias=True, attention_out_bias=True),  # Llama attention_bias
    dict(norm="layer", mlp="gelu_tanh", attention_bias=True, attention_out_bias=True, mlp_bias=True,
         sliding_window=256, tie_embeddings=True),
    dict(norm="layer", mlp="gelu_tanh", norm_eps=1e-6),  # StarCoder2 use_bias=false
], ids=["yarn", "llama3", "mistral", "qwen2-window", "llama-bias", "starcoder2", "starcoder2-no-bias"])
def test_model_config_round_trips_through_config_json(changes):
    """Export's config.json reads back as the same model config, and transformers builds the same RoPE."""
    m = ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=2,
                    head_dim=16, d_ff=D_FF, **changes)
    hf = hf_config(m, bos_id=None, eos_id=None, pad_id=None, dtype="float32")
    back = ModelConfig(**{**model_config_from_hf(hf), "scan_layers": m.scan_layers})
    assert back == m
    rotary = transformers.AutoModelForCausalLM.from_config(transformers_config(m)).model.rotary_emb
    _assert_same_inv_freq(rope_inv_freq(m), rotary.inv_freq)
    assert rope_attention_scale(m) == pytest.approx(rotary.attention_scaling, rel=1e-12)


def test_a_missing_sliding_window_key_means_the_architectures_default():
    from codegen_jax.hf_config import _sliding_window

    # transformers' MistralConfig (and Qwen2Config with use_sliding_window) default to 4096 when absent
    assert _sliding_window({}, "MistralForCausalLM", 2, 131072) == 4096
    assert _sliding_window({"sliding_window": None}, "MistralForCausalLM", 2, 131072) == 0  # explicit: none
    assert _sliding_window({"use_sliding_window": True, "max_window_layers": 0}, "Qwen2ForCausalLM", 2, 32768) == 4096
    assert _sliding_window({}, "Starcoder2ForCausalLM", 2, 4096) == 0
