"""The decoder: causality, segment-aware packing, KV cache, scan == loop, param count, HF parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codegen_jax.config import ConfigError, load_config
from codegen_jax.flops import flops_per_token, param_count
from codegen_jax.kv_cache import init_cache
from codegen_jax.model import create_model

from conftest import tiny_config


@pytest.fixture(scope="module")
def model_and_cfg():
    cfg = tiny_config().model
    return create_model(cfg, seed=0), cfg


def _tokens(shape, vocab=101, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def test_causality(model_and_cfg):
    model, _ = model_and_cfg
    tokens = _tokens((2, 16))
    base, _ = model(tokens)
    for t in (0, 7, 14):
        changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % 101)
        logits, _ = model(changed)
        np.testing.assert_array_equal(np.asarray(logits[:, : t + 1]), np.asarray(base[:, : t + 1]))
        assert not np.allclose(np.asarray(logits[:, t + 1]), np.asarray(base[:, t + 1]))


def test_packed_segments_equal_separate_runs(model_and_cfg):
    model, _ = model_and_cfg
    a, b = _tokens((1, 9), seed=1), _tokens((1, 6), seed=2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 9 + [2] * 6 + [0] * 3])
    pos = jnp.array([list(range(9)) + list(range(6)) + [0] * 3])
    logits, _ = model(packed, pos, seg)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_allclose(np.asarray(logits[0, :9]), np.asarray(la[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[0, 9:15]), np.asarray(lb[0]), atol=1e-5)


def test_kv_cache_prefill_and_steps_equal_full_forward(model_and_cfg):
    model, cfg = model_and_cfg
    tokens = _tokens((3, 20), seed=3)
    full, _ = model(tokens)
    logits, cache = model(tokens[:, :12], cache=init_cache(cfg, 3, 32))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :12]), atol=1e-5)
    assert cache.lengths_b.tolist() == [12, 12, 12] and cache.capacity == 32
    for t in range(12, 20):
        step, cache = model.decode(tokens[:, t], cache)
        np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, t]), atol=1e-5)
    assert cache.lengths_b.tolist() == [20, 20, 20]


def test_right_padded_prefill_rows_of_different_lengths_decode_like_each_alone():
    """Prefill rows of 7 and 4 tokens (then padding) and decode each at its own position."""
    cfg = tiny_config().model
    model = create_model(cfg, seed=4)
    a, b = _tokens((1, 10), seed=5), _tokens((1, 10), seed=6)
    ref_a, _ = model(a)
    ref_b, _ = model(b)
    prompts = jnp.concatenate([a[:, :8], jnp.concatenate([b[:, :4], jnp.zeros((1, 4), jnp.int32)], 1)])
    seg = jnp.array([[1] * 8, [1] * 4 + [0] * 4])
    last, cache = model(prompts, segment_ids_bt=seg, cache=init_cache(cfg, 2, 16),
                        logits_at_b=jnp.array([7, 3]))
    np.testing.assert_allclose(np.asarray(last[0]), np.asarray(ref_a[0, 7]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(last[1]), np.asarray(ref_b[0, 3]), atol=1e-5)
    assert cache.lengths_b.tolist() == [8, 4]
    for i in range(2):
        step, cache = model.decode(jnp.array([a[0, 8 + i], b[0, 4 + i]]), cache)
        np.testing.assert_allclose(np.asarray(step[0]), np.asarray(ref_a[0, 8 + i]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(step[1]), np.asarray(ref_b[0, 4 + i]), atol=1e-5)


@pytest.mark.parametrize("window", [3, 6])
def test_sliding_window_in_training_and_decode_equals_a_banded_mask(window):
    """model.sliding_window: training and prefill mask keys more than `window - 1` positions back, the
    decode path the same; against jax.nn.dot_product_attention's own local window."""
    from codegen_jax.attention import causal_attention, fused_attention

    b, h, g, k, t = 2, 4, 2, 8, 21
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (b, h, t, k))
    kv = [jax.random.normal(kk, (b, g, t, k)) for kk in keys[1:]]
    seg = jnp.ones((b, t), jnp.int32)
    ours = causal_attention(q, *kv, seg, window=window, block=8)
    ref = jax.nn.dot_product_attention(q.swapaxes(1, 2), kv[0].swapaxes(1, 2), kv[1].swapaxes(1, 2),
                                       is_causal=True, local_window_size=(window - 1, 0)).swapaxes(1, 2)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(fused_attention(q, *kv, seg, window=window), ref, atol=1e-5)
    cfg = tiny_config(f"model.sliding_window={window}").model
    model = create_model(cfg, seed=2)
    tokens = _tokens((2, 14), seed=9)
    full, _ = model(tokens)
    _, cache = model(tokens[:, :5], cache=init_cache(cfg, 2, 16))
    for t in range(5, 14):
        step, cache = model.decode(tokens[:, t], cache)
        np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, t]), atol=1e-5)
    unlimited, _ = create_model(tiny_config().model, seed=2)(tokens)
    assert not np.allclose(np.asarray(full[:, window:]), np.asarray(unlimited[:, window:]), atol=1e-3)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_and_loop_layers_agree(remat):
    cfg_scan = tiny_config(f"model.remat={remat}").model
    cfg_loop = tiny_config("model.scan_layers=false").model
    scan, loop = create_model(cfg_scan, seed=6), create_model(cfg_loop, seed=7)
    # copy the stacked weights into the per-layer modules so both hold the same function
    stacked = nnx.state(scan).to_pure_dict()
    per_layer = nnx.state(loop).to_pure_dict()
    for i in range(cfg_scan.n_layers):
        per_layer["blocks"][i] = jax.tree.map(lambda x: x[i], stacked["blocks"])
    for k in ("embed_vd", "final_norm", "lm_head_dv"):
        per_layer[k] = stacked[k]
    state = nnx.state(loop)
    nnx.replace_by_pure_dict(state, per_layer)
    nnx.update(loop, state)
    tokens = _tokens((2, 12), seed=8)
    # same function; XLA fuses a scan body and an unrolled loop differently, so allow fp32 rounding
    np.testing.assert_allclose(np.asarray(scan(tokens)[0]), np.asarray(loop(tokens)[0]), rtol=0, atol=1e-6)


def test_remat_gradients_match():
    tokens = _tokens((2, 12), seed=9)

    def loss(model):
        return model(tokens)[0].mean()

    grads = {}
    for remat in ("none", "full", "dots_saveable"):
        model = create_model(tiny_config(f"model.remat={remat}").model, seed=10)
        grads[remat] = nnx.grad(loss)(model)
    for remat in ("full", "dots_saveable"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                     nnx.state(grads["none"]), nnx.state(grads[remat]))


def test_bf16_compute_keeps_fp32_params():
    cfg = tiny_config("model.dtype=bfloat16").model
    model = create_model(cfg, seed=0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model)))
    logits, _ = model(_tokens((1, 8)))
    ref, _ = create_model(tiny_config().model, seed=0)(_tokens((1, 8)))
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.1


STARCODER2 = ["model.norm=layer", "model.mlp=gelu_tanh", "model.attention_bias=true",
              "model.attention_out_bias=true", "model.mlp_bias=true"]


@pytest.mark.parametrize("name,overrides", [("tiny", []), ("small", []), ("tiny", ["model.tie_embeddings=true"]),
                                            ("tiny", ["model.attention_bias=true"]), ("tiny", STARCODER2),
                                            ("small", ["model.norm=layer", "model.mlp=gelu_tanh"]),
                                            ("tiny", ["model.attention_bias=true", "model.attention_out_bias=true"])])
def test_param_count_matches_model(name, overrides):
    cfg = load_config(f"configs/{name}.yaml", overrides).model
    from codegen_jax.model import abstract_model

    _, state = abstract_model(cfg)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) == param_count(cfg)


def test_flops_per_token():
    cfg = load_config("configs/small.yaml").model
    n = param_count(cfg) - cfg.vocab_size * cfg.d_model  # the embedding lookup is not a matmul
    attn = cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * 1024 / 2
    assert flops_per_token(cfg, 1024) == pytest.approx(3 * (2 * (n - (2 * cfg.n_layers + 1) * cfg.d_model)
                                                             + attn))
    assert flops_per_token(cfg, 1024, training=False) == pytest.approx(flops_per_token(cfg, 1024) / 3)
    gelu = load_config("configs/small.yaml", ["model.mlp=gelu_tanh"]).model  # c_fc, c_proj: 2 matrices, not 3
    assert flops_per_token(cfg, 1024) - flops_per_token(gelu, 1024) == pytest.approx(
        3 * 2 * cfg.n_layers * cfg.d_model * cfg.d_ff)


def _random_state(cfg, seed: int):
    """(graphdef, state) of a Decoder with every parameter random, biases and norm shifts included
    (they start at zero), drawn on the host: no init program to compile."""
    from codegen_jax.model import abstract_model

    graphdef, state = abstract_model(cfg)
    leaves, treedef = jax.tree.flatten(state.to_pure_dict())
    rng = np.random.RandomState(seed)
    pure = jax.tree.unflatten(treedef, [jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) for x in leaves])
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


@pytest.mark.parametrize("overrides", [
    [*STARCODER2, "model.sliding_window=5"],
    ["model.rope_scaling=yarn", "model.rope_factor=4", "model.rope_original_max_seq_len=8"],
    ["model.rope_scaling=llama3", "model.rope_factor=8", "model.rope_original_max_seq_len=8"],
    ["model.rope_scaling=linear", "model.rope_factor=2", "model.scan_layers=false"],
], ids=["starcoder2-window", "yarn", "llama3", "linear-loop"])
def test_kv_cache_decode_equals_full_forward_for_each_architecture(overrides):
    """LayerNorm, the GELU MLP, all biases, a sliding window and scaled RoPE take the same values in
    prefill + decode (the sampler's path) as in the full forward (training's path)."""
    cfg = tiny_config(*overrides).model
    graphdef, state = _random_state(cfg, seed=13)
    full_fn = jax.jit(lambda state, toks: nnx.merge(graphdef, state)(toks)[0])
    prefill = jax.jit(lambda state, toks: nnx.merge(graphdef, state)(toks, cache=init_cache(cfg, 2, 24)))
    decode = jax.jit(lambda state, tok, cache: nnx.merge(graphdef, state).decode(tok, cache))
    tokens = _tokens((2, 20), seed=15)
    full = full_fn(state, tokens)
    logits, cache = prefill(state, tokens[:, :9])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :9]), atol=1e-5)
    for t in range(9, 20):
        step, cache = decode(state, tokens[:, t], cache)
        np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, t]), atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["model.rope_scaling=ntk"], "'model.rope_scaling' must be one of none, linear, llama3, yarn"),
    (["model.rope_scaling=yarn", "model.rope_factor=4"], "needs model.rope_original_max_seq_len"),
    (["model.rope_scaling=linear", "model.rope_factor=0.5"], "model.rope_factor must be >= 1"),
    (["model.rope_scaling=llama3", "model.rope_factor=8", "model.rope_original_max_seq_len=16",
      "model.rope_low_freq_factor=4"], "rope_low_freq_factor < model.rope_high_freq_factor"),
    (["model.mlp_bias=true"], "model.mlp_bias needs model.mlp=gelu_tanh"),
    (["model.norm=group"], "'model.norm' must be one of rms, layer"),
])
def test_config_refuses_bad_architecture_switches(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        tiny_config(*overrides)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scan", [True, False])
def test_logits_equal_hf_llama(scan):
    import torch
    import transformers

    from codegen_jax.hf_params import to_hf_state_dict

    cfg = tiny_config(f"model.scan_layers={scan}", "model.rope_theta=500000").model
    model = create_model(cfg, seed=11)
    # built by hand on purpose (not through codegen_jax.hf_config.transformers_config): an independent check
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len))
    sd = to_hf_state_dict(nnx.state(model).to_pure_dict(), cfg)
    hf.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    tokens = np.random.RandomState(12).randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf.eval()(torch.from_numpy(tokens)).logits.numpy()
    ours, _ = model(jnp.asarray(tokens))
    assert np.abs(np.asarray(ours) - ref).max() < 1e-5


@pytest.mark.parametrize("t,block,window", [(45, 16, 0), (64, 16, 0), (8, 128, 0), (45, 16, 10), (150, 128, 0)])
def test_blockwise_causal_attention_equals_full_masked_attention(t, block, window):
    """The training path's attention (keys beyond each query block skipped; its gradient written out,
    in blocks of its own size) against jax.nn.dot_product_attention with the full segment + causal
    (+ sliding window) mask: values and gradients."""
    from codegen_jax.attention import causal_attention

    b, h, g, k = 2, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, h, t, k))
    kv = [jax.random.normal(kk, (b, g, t, k)) for kk in keys[1:]]
    seg = jnp.asarray(np.sort(np.random.RandomState(0).randint(0, 4, (b, t)), axis=1))  # 0 = padding
    # written out here, independently of the kernels: same segment, and causal
    back = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    mask = ((seg[:, :, None] == seg[:, None, :]) & (back >= 0) & ((back < window) | (window == 0)))[:, None]

    def ours(q, k_, v_):
        return causal_attention(q, k_, v_, seg, window=window, block=block)

    def full(q, k_, v_):
        o = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k_.transpose(0, 2, 1, 3),
                                         v_.transpose(0, 2, 1, 3), mask=mask)
        return o.transpose(0, 2, 1, 3)

    np.testing.assert_allclose(ours(q, *kv), full(q, *kv), atol=1e-5)
    weights = jax.random.normal(keys[2], (b, h, t, k))
    g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * weights), argnums=(0, 1, 2))(q, *kv)
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) * weights), argnums=(0, 1, 2))(q, *kv)
    for a, e in zip(g_ours, g_full):
        np.testing.assert_allclose(a, e, atol=1e-5)


def test_splash_attention_equals_the_blockwise_kernel_in_interpret_mode():
    """model.attention=splash (Pallas, interpret mode on CPU): packed segments with padding, grouped
    kv heads and a sliding window, values and gradients, against the XLA kernel."""
    from codegen_jax.attention import causal_attention
    from codegen_jax.splash import splash_attention

    b, h, g, k, t = 2, 4, 2, 32, 256
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(keys[0], (b, h, t, k))
    kv = [jax.random.normal(kk, (b, g, t, k)) for kk in keys[1:3]]
    seg = jnp.asarray(np.sort(np.random.RandomState(2).randint(0, 4, (b, t)), axis=1))  # 0 = padding
    weights = jax.random.normal(keys[3], (b, h, t, k))
    for window in (0, 100):
        ours = splash_attention(q, *kv, seg, window)
        np.testing.assert_allclose(ours, causal_attention(q, *kv, seg, window), atol=1e-5)
        grads = [jax.grad(lambda *a: jnp.sum(fn(*a, seg, window) * weights), argnums=(0, 1, 2))(q, *kv)
                 for fn in (splash_attention, causal_attention)]
        for a, e in zip(*grads):
            np.testing.assert_allclose(a, e, atol=1e-5)


def test_auto_attention_picks_the_platform_kernel_and_no_fp32_cudnn():
    from codegen_jax.attention import resolve

    assert resolve("auto", "tpu") == "splash" and resolve("auto", "cpu", "float32") == "xla"
    assert resolve("auto", "gpu", "bfloat16") == "cudnn" and resolve("auto", "gpu", "float32") == "xla"
    assert resolve("xla", "tpu") == "xla"  # an explicit choice stands
