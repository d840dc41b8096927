"""TPU programs compiled on this CPU host by libtpu's real compiler (`codegen-jax plan --topology`):
topology names, per-chip memory against HBM, the shipped configs on the hardware they name, splash
attention through Mosaic, and bad input."""

import json

import pytest

from codegen_jax import cli, tpu
from codegen_jax.config import load_config
from codegen_jax.errors import UserError
from codegen_jax.plan import plan_topology

from conftest import tiny_config

GIB = 1024**3
pytestmark = pytest.mark.usefixtures("no_compilation_cache")


@pytest.mark.parametrize("name, family, chips, topology_name", [
    ("v5e-8", "v5e", 8, "v5e:2x4"), ("v5litepod-16", "v5e", 16, "v5e:4x4"), ("v6e-16", "v6e", 16, "v6e:4x4"),
    ("v5p-128", "v5p", 64, "v5p:4x4x4"), ("v5p-64", "v5p", 32, "v5p:2x4x4"), ("v4-32", "v4", 16, "v4:2x2x4"),
    ("v5e:2x4", "v5e", 8, "v5e:2x4"), ("V5P:4x4x8", "v5p", 128, "v5p:4x4x8"),
])
def test_cloud_names_count_chips_or_tensorcores_as_cloud_does(name, family, chips, topology_name):
    topo = tpu.parse_topology(name)
    assert (topo.chip.family, topo.chips, topo.topology_name) == (family, chips, topology_name)


@pytest.mark.parametrize("name, message", [("v9-8", "unknown TPU topology"), ("v5p-7", "no TPU slice"),
                                           ("v5e-12", "no TPU slice"), ("v5e:2x2x2", "2-D")])
def test_unknown_topologies_are_refused_with_the_valid_names(name, message):
    with pytest.raises(UserError, match=message):
        tpu.parse_topology(name)


def test_devices_are_chips_and_hbm_is_what_the_compiler_reports():
    assert len(tpu.devices(tpu.parse_topology("v4-32"))) == 16  # megacore: one device per chip
    devices = tpu.devices(tpu.parse_topology("v5e-8"))
    assert tpu.hbm_bytes(devices[0]) == int(15.75 * GIB)


def test_tiny_plan_on_v5e_8_through_the_cli(tmp_path, capsys):
    """The issue's done-when, on tiny: a compiled per-chip HBM figure, fits, JSON with the keys."""
    out = tmp_path / "plan.json"
    # tiny trains with Muon: the FLOPs check's program uses AdamW (the model's FLOPs are what it checks)
    assert cli.main(["plan", "--config", "configs/tiny.yaml", "--topology", "v5e-8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "v5e:2x4: 8 v5e chips" in printed and "estimated train step (roofline" in printed
    report = json.loads(out.read_text())
    assert report["fits"] and report["chips"] == 8 and report["hbm_bytes"] == int(15.75 * GIB)
    for name in ("train_step", "prefill", "decode"):
        p = report["programs"][name]
        assert p["fits"] and 0 < p["per_device_bytes"] < 0.1 * GIB and p["argument_bytes"] > 0
    e = report["estimate"]
    assert 0.95 < e["check_ratio"] < 1.10  # the compiler's FLOPs agree with flops_per_token
    assert 0 < e["mfu_no_overlap"] <= e["mfu"] <= 1 and e["step_s"] > 0
    assert report["decode_estimate"]["tokens_per_s"] > 0


def test_the_flops_check_counts_what_fsdp_collective_matmul_loops_hide():
    """At 2048 tokens per chip and width 512 the partitioner turns fsdp's matmul + reduce-scatter (and
    all-gather + matmul) into loops over the shards (windowed einsum, 27 of them here) whose bodies
    cost analysis counts once (0.85x our FLOPs as compiled; small on v5e-8: 0.83x). The check compiles
    without them and agrees with `flops_per_token` within a few percent."""
    from codegen_jax.plan import _flops_check, _topology_config, mesh_shape
    from codegen_jax.sharding import make_mesh

    cfg = _topology_config(load_config("configs/small.yaml", ["model.vocab_size=256", "model.d_model=512",
                                                              "model.n_heads=8", "model.n_kv_heads=8",
                                                              "model.d_ff=1408"]))
    topo = tpu.parse_topology("v5e-8")
    mesh = make_mesh(mesh_shape(cfg.mesh, topo.chips), tpu.devices(topo))
    assert 0.98 < _flops_check(cfg, mesh)["check_ratio"] < 1.05


@pytest.mark.parametrize("topology", ["v5e-8", "v6e-8"])
def test_a_splash_attention_model_compiles_through_mosaic(topology):
    cfg = tiny_config("model.attention=splash", "data.seq_len=128", "model.max_seq_len=256",
                      "model.head_dim=128", "train.batch_size=16")
    report = plan_topology(cfg, topology, programs=("train_step",), estimate=False)
    step = report["programs"]["train_step"]
    assert step["fits"] and "tpu_custom_call" in step["custom_calls"]


@pytest.mark.slow
def test_small_fits_one_v5e_8_at_its_own_batch_with_room_to_spare():
    cfg = load_config("configs/small.yaml")
    report = plan_topology(cfg, "v5e-8", programs=("train_step", "decode"), estimate=False)
    for name, p in report["programs"].items():
        assert p["fits"] and p["per_device_bytes"] <= 0.9 * report["hbm_bytes"], name
    assert "tpu_custom_call" in report["programs"]["train_step"]["custom_calls"]  # attention: auto -> splash


def test_7b_on_v5e_8_is_reported_as_not_fitting_with_its_excess():
    cfg = load_config("configs/7b.yaml", ["mesh.fsdp=8"])  # its own batch, 256 x 4096
    report = plan_topology(cfg, "v5e-8", programs=("train_step",), estimate=False)
    step = report["programs"]["train_step"]
    assert not report["fits"] and not step["fits"] and step["excess_gib"] > 1


@pytest.mark.parametrize("args, message", [
    (["--topology", "v9-8"], "unknown TPU topology"),
    (["--topology", "v5e-8", "mesh.fsdp=3", "train.batch_size=48"], "cannot fill 8 devices"),
    (["--topology", "v5e-8", "train.batch_size=12"], "must be divisible"),
    (["--search"], "--search needs --topology"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert cli.main(["plan", "--config", "configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_libtpu_names_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert cli.main(["plan", "--config", "configs/tiny.yaml", "--topology", "v5e-8"]) == 2
    assert "pip install 'codegen-jax[tpu]'" in capsys.readouterr().err
