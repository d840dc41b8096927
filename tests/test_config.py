"""Config loading, typed overrides and the one-line validation errors (exit 2 through the CLI)."""

import subprocess
import sys

import pytest

from codegen_jax.cli import main
from codegen_jax.config import ConfigError, load_config
from codegen_jax.config_checks import mesh_shape


def test_yaml_and_typed_overrides():
    cfg = load_config("configs/tiny.yaml", ["train.steps=7", "optim.lr=1e-3", "model.scan_layers=false",
                                            "data.extensions=.py,.pyi"])
    assert cfg.name == "tiny"
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3 and cfg.model.scan_layers is False
    assert cfg.data.extensions == [".py", ".pyi"]
    assert cfg.model.head_dim == cfg.model.d_model // cfg.model.n_heads


def test_config_round_trips_through_dict():
    from codegen_jax.config import from_dict

    cfg = load_config("configs/small.yaml", ["train.seed=3"])
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,expected", [
    ("model.bogus=1", "unknown config key 'model.bogus'; nearest valid keys:"),
    ("model.n_layer=3", "nearest valid keys: model.n_layers"),
    ("train.steps=abc", "config key 'train.steps' expects int, got 'abc'"),
    ("model.scan_layers=maybe", "expects bool"),
    ("model.n_kv_heads=2", "model.n_heads (3) must be divisible by model.n_kv_heads (2)"),
    ("model.d_model=250", "model.d_model (250) must equal n_heads*head_dim"),
    ("model.remat=some", "config key 'model.remat' must be one of none, full, dots_saveable"),
    ("train.batch_size=10", "train.batch_size (10) must be divisible by mesh.data*mesh.fsdp"),
    ("notakeyvalue", "is not key=value"),
    ("data.exclude=[a,*b", "config key 'data.exclude': cannot read the list"),
])
def test_validation_errors(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override, "mesh.data=4"] if "batch" in override else [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_mesh_product_must_match_devices():
    assert mesh_shape(load_config(None).mesh, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_shape(load_config(None, ["mesh.data=2", "mesh.fsdp=-1", "mesh.tensor=2"]).mesh, 8) == {
        "data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="data\\*fsdp\\*tensor = 4 but there are 8 devices"):
        mesh_shape(load_config(None, ["mesh.data=2", "mesh.fsdp=2"]).mesh, 8)
    with pytest.raises(ConfigError, match="not divisible by 3"):
        mesh_shape(load_config(None, ["mesh.tensor=3", "model.n_kv_heads=4", "model.n_heads=12",
                                      "model.d_model=768", "train.batch_size=12"]).mesh, 8)
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["mesh.data=-1", "train.batch_size=12"], num_devices=8)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_unknown_key_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "codegen_jax.cli", "train", "--config", "configs/tiny.yaml",
                           "model.bogus=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus" in lines[0] and "nearest valid keys" in lines[0]


def test_cli_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ["train", "generate", "export-hf", "import-hf", "eval", "tokenizer", "data", "plan"]:
        assert verb in out


@pytest.mark.parametrize("verb", ["data", "plan"])
def test_cli_config_errors_exit_2(verb, capsys):
    args = [verb, "inspect"] if verb == "data" else [verb]
    assert main(args + ["--config", "configs/tiny.yaml", "model.n_kv_heads=2"]) == 2  # tiny has 3 heads
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n_kv_heads" in err[0]


def test_unquoted_glob_lists_are_read_as_strings():
    cfg = load_config("configs/tiny.yaml", ["data.exclude=[test/*, */tests/*]"])  # YAML reads * as an alias
    assert cfg.data.exclude == ["test/*", "*/tests/*"]
