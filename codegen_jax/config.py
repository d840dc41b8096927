"""Typed run configuration: dataclasses with the defaults, YAML loading, `key.sub=value` overrides.

Defaults live here; `configs/*.yaml` hold only differences. A config is validated once, at load time
(`config_checks.validate`), and every problem is raised as a `ConfigError` (a `UserError`: one line,
exit code 2 in the CLI).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from codegen_jax.errors import UserError


class ConfigError(UserError):
    """A config file or override that cannot be used as given."""


@dataclasses.dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 704
    max_seq_len: int = 2048  # context length: the KV cache and generation limit
    rope_theta: float = 10000.0
    # RoPE scaling, as HF's rope_parameters: none | linear | llama3 | yarn (rope.rope_inv_freq turns
    # these into the inverse frequencies with transformers' formulas)
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # linear, llama3, yarn: context extension factor
    rope_original_max_seq_len: int = 0  # llama3, yarn: the pretraining context (HF original_max_position_embeddings)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies
    rope_beta_slow: float = 1.0  # yarn
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole dimensions (HF's default)
    rope_attention_factor: float = 0.0  # yarn: cos/sin scale; 0: 0.1 * ln(rope_factor) + 1, as HF
    norm_eps: float = 1e-5
    norm: str = "rms"  # rms (RMSNorm, Llama) | layer (LayerNorm with a bias, StarCoder2)
    mlp: str = "swiglu"  # swiglu (Llama) | gelu_tanh (c_fc -> GELU, tanh approximation -> c_proj; StarCoder2)
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2, StarCoder2)
    attention_out_bias: bool = False  # o_proj bias (StarCoder2, Llama's attention_bias)
    mlp_bias: bool = False  # c_fc / c_proj biases (mlp=gelu_tanh only)
    sliding_window: int = 0  # attend to at most this many positions back (0: unlimited)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots_saveable
    scan_layers: bool = True
    # xla (blockwise causal) | cudnn (GPU) | splash (TPU Pallas kernel) | auto (splash on TPU, cudnn
    # on GPU, xla elsewhere)
    attention: str = "xla"


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: the rest of the devices
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | files (source trees) | datasets (jsonl/parquet/arrow/save_to_disk)
    # | prepared (directories written by `codegen-jax data prepare`)
    paths: list[str] = dataclasses.field(default_factory=list)
    extensions: list[str] = dataclasses.field(default_factory=lambda: [".py"])
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"  # chat rows: OpenAI-style [{"role", "content"}, ...], loss on assistant
    seq_len: int = 256
    tokenizer: str = ""  # a tokenizer directory; empty: train one on the corpus into WORKDIR/tokenizer
    pair_ratio: float = 0.3  # share of examples that are docstring -> code instruction pairs
    fim_rate: float = 0.5  # share of training documents rewritten fill-in-the-middle (0: none)
    fim_spm_rate: float = 0.5  # share of those in suffix-prefix-middle order (else prefix-suffix-middle)
    val_fraction: float = 0.02
    max_file_bytes: int = 1_000_000
    max_line_length: int = 1000
    min_alnum_fraction: float = 0.25
    max_docs: int = 0  # 0: all documents
    # documents whose path matches one of these shell patterns are left out (drop reason "excluded"),
    # e.g. the standard library's own test suite: ["test/*", "*/test/*", "*/tests/*", "*/idle_test/*"]
    exclude: list[str] = dataclasses.field(default_factory=list)
    pack: str = "first_fit"  # first_fit | best_fit
    shuffle_seed: int = 0
    num_workers: int = 0  # grain worker processes; 0: in the main process
    # corpus preparation (data prepare) and prepared data
    languages: list[str] = dataclasses.field(default_factory=list)  # keep only these languages; empty: all
    language_weights: list[str] = dataclasses.field(default_factory=list)  # "name:weight" train resampling
    redact: bool = True  # e-mails, IPs and secrets -> <EMAIL>, <IP_ADDRESS>, <KEY>, <PASSWORD>
    near_dedup: bool = True  # MinHash over 5-gram shingles; one document kept per cluster
    near_dup_threshold: float = 0.7  # estimated Jaccard similarity at which two documents are duplicates
    decontaminate: bool = True  # drop documents sharing n-grams or docstrings with HumanEval + decontam_files
    decontam_ngram: int = 10  # words per n-gram
    decontam_files: list[str] = dataclasses.field(default_factory=list)  # more problems (HumanEval-style JSONL)


@dataclasses.dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon (Muon on the blocks' weight matrices, AdamW on the rest)
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | linear | wsd | constant
    warmup_steps: int = 20
    schedule_steps: int = 0  # steps the schedule spans; 0: train.steps (set it to extend a run later)
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    clip_norm: float = 1.0  # 0: no clipping
    grad_accum: int = 1  # microbatches per step
    z_loss: float = 0.0
    muon_momentum: float = 0.95  # muon: the momentum the orthogonalized update is taken of


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # global, in sequences
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    nan_policy: str = "stop"  # stop | skip
    peak_flops: float = 0.0  # per device; 0: measured once by a matmul probe
    # wall-clock budget of the run in seconds (0: none): after timing the first steps the run is
    # shortened to fit it (never lengthened past train.steps); see codegen_jax/train/budget.py
    time_budget_s: float = 0.0
    parse_eval: bool = False  # at the end, the share of greedy function completions that parse
    # LM head + cross entropy on this many positions at a time, each chunk rematerialized (0: the whole
    # row): bounds the [batch, seq_len, vocab] fp32 logits and their gradient on accelerators
    loss_chunk: int = 0
    sample_prompts: list[str] = dataclasses.field(
        # no trailing newline: the tokenizer merges "\n" with the next line's indentation, so the model
        # should write that token itself
        default_factory=lambda: ['def fibonacci(n):\n    """Return the n-th Fibonacci number."""',
                                 "import os\n\n\ndef list_files(path):"]
    )
    wandb: bool = False


@dataclasses.dataclass
class SampleConfig:
    batch_size: int = 16  # decode slots (the rows generated at once) in serving and `plan`
    max_new_tokens: int = 96
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: list[str] = dataclasses.field(default_factory=lambda: ["\ndef", "\nclass", "\nif __name__"])
    # for the samples a run prints and its parse-rate check (`generate` takes its own flags, off by
    # default so that greedy output equals HF's): HF's repetition penalty (1: off), n-gram blocking
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0


# LoRA targets by model.mlp: attention's projections, then the MLP's
LORA_TARGETS = {"swiglu": ("q", "k", "v", "o", "gate", "up", "down"), "gelu_tanh": ("q", "k", "v", "o", "fc", "proj")}


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters on the projections (codegen_jax/lora.py); the base weights are then frozen."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0  # the adapter's update is scaled by alpha / rank, as in PEFT
    dropout: float = 0.0  # on the adapter's input, in training
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q", "v"])  # q k v o gate up down (fc proj)


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 100
    keep: int = 3
    resume: str = "auto"  # auto | never
    async_save: bool = True


@dataclasses.dataclass
class Config:
    name: str = "tiny"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _all_keys(f.default_factory, name + ".")
        else:
            keys.append(name)
    return keys


def _unknown_key(key: str) -> ConfigError:
    keys = _all_keys()
    section = key.split(".", 1)[0] + "."
    same_section = [k for k in keys if k.startswith(section)]
    near = difflib.get_close_matches(key, same_section or keys, n=3, cutoff=0.0)
    return ConfigError(f"unknown config key '{key}'; nearest valid keys: {', '.join(near)}")


def _list_override(key: str, text: str) -> list:
    """`[a, b]` (YAML flow list) or `a,b`. Items YAML cannot read unquoted (globs like `*/tests/*`: `*`
    starts an alias) are taken as plain strings, as a shell leaves them."""
    text = text.strip()
    if not text.startswith("["):
        return [v for v in text.split(",") if v]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        if not text.endswith("]"):
            raise ConfigError(f"config key '{key}': cannot read the list {text!r}; write [a, b]") from None
        return [v.strip().strip("'\"") for v in text[1:-1].split(",") if v.strip()]


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML value or override string to the field's declared type, or fail naming the key."""
    origin = typing.get_origin(typ)
    if origin is list:
        (item_t,) = typing.get_args(typ)
        if isinstance(value, str):
            value = _list_override(key, value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(key, v, item_t) for v in value]
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if typ is int:
            if isinstance(value, bool) or not float(value).is_integer():
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            return value if isinstance(value, str) else str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {value!r}")


def _apply(obj: Any, key: str, value: Any) -> None:
    """Set dotted `key` on the nested dataclass `obj`, typed by the field."""
    *path, leaf = key.split(".")
    target = obj
    for part in path:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise _unknown_key(key)
        target = getattr(target, part)
    fields = {f.name: f for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else {}
    if leaf not in fields:
        raise _unknown_key(key)
    hints = typing.get_type_hints(type(target))
    typ = hints[leaf]
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; give its keys, e.g. {key}.<name>=...")
        for k, v in value.items():
            _apply(obj, f"{key}.{k}", v)
        return
    setattr(target, leaf, _coerce(key, value, typ))


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and prefix + str(k) != "":
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.steps=100)")
        k, v = item.split("=", 1)
        pairs.append((k.strip(), v))
    return pairs


def from_dict(d: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Build a Config from nested dict values plus `key=value` overrides (overrides win)."""
    cfg = Config()
    for key, value in _flatten(d):
        _apply(cfg, key, value)
    for key, value in parse_overrides(list(overrides)):
        _apply(cfg, key, value)
    _resolve_defaults(cfg)
    # imported here: config_checks imports the dataclasses above
    from codegen_jax.config_checks import validate

    validate(cfg)
    return cfg


def _resolve_defaults(cfg: Config) -> None:
    """Fill the values whose default depends on other fields (head_dim 0 = d_model // n_heads), so the
    saved config states them."""
    m = cfg.model
    if m.head_dim == 0 and m.n_heads > 0 and m.d_model % m.n_heads == 0:
        m.head_dim = m.d_model // m.n_heads
    # corpus preparation: prepared data is read with the tokenizer its shards were encoded with
    if cfg.data.source == "prepared" and not cfg.data.tokenizer and cfg.data.paths:
        cfg.data.tokenizer = cfg.data.paths[0].rstrip("/") + "/tokenizer"


def load_config(path: str | Path | None, overrides: list[str] = (), num_devices: int | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None), apply overrides, validate.

    With `num_devices`, the mesh is also checked against the device count.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (pass an existing YAML, e.g. configs/tiny.yaml)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}; fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model:, train:, ...)")
        raw.setdefault("name", p.stem)
    cfg = from_dict(raw, overrides)
    if num_devices is not None:
        from codegen_jax.config_checks import check_batch

        check_batch(cfg, num_devices)
    return cfg
