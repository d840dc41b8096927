"""Orbax checkpoints: params, optimizer state, step, the grain iterator state, config and tokenizer.

Layout: `WORKDIR/checkpoints/<step>/{params,opt_state,data,meta}`. `meta` (JSON) holds the step, the
resolved config and the tokenizer's files, so a step directory alone is enough to reload a model.
Orbax writes each step into a temporary directory and renames it when complete (on an object store:
writes a commit marker last), so a crash mid-save never touches the previous step; a finalized step
that fails to restore is skipped with a warning. WORKDIR may be a local path or a gs:// / s3:// URL.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from codegen_jax import storage
from codegen_jax.config import Config, ConfigError, from_dict
from codegen_jax.errors import UserError

log = logging.getLogger(__name__)


class _IteratorSnapshot:
    """The iterator state frozen at save time. Orbax may run grain's handler after the training loop
    has already pulled the next batch (async saves), so the live iterator must not be read then."""

    def __init__(self, state: bytes):
        self.state = state

    def get_state(self) -> bytes:
        return self.state


def iterator_state(iterator: Any) -> bytes:
    state = iterator.get_state()
    return state if isinstance(state, bytes) else json.dumps(state).encode()


def set_iterator_state(iterator: Any, state: bytes) -> None:
    try:
        iterator.set_state(json.loads(state.decode()))
    except (ValueError, UnicodeDecodeError):
        iterator.set_state(state)


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's saved files as {name: text}, for the checkpoint's meta item."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}


def materialize_tokenizer(files: dict[str, str], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return out


def manager(workdir: str | Path, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(storage.path(workdir) / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, step: int, *, params: Any, cfg: Config, tokenizer: Any,
         opt_state: Any = None, data_iterator: Any = None) -> None:
    """Start saving one step (asynchronously when the manager is async); `mngr.wait_until_finished()`
    blocks until it is on disk."""
    meta = {"step": int(step), "config": cfg.to_dict(), "tokenizer": tokenizer_files(tokenizer)}
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator_state(data_iterator)))
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def resolve(path: str | Path) -> tuple[Path, int | None]:
    """A run's workdir, its `checkpoints/` dir or one step dir (local or a URL) -> (checkpoints root,
    step or None=latest)."""
    p = storage.path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint not found: {path} (pass a run's workdir or one step directory)")
    if (p / "checkpoints").is_dir():
        return p / "checkpoints", None
    if p.name.isdigit() and (p / "meta").exists():
        return p.parent, int(p.name)
    if any(c.name.isdigit() for c in p.iterdir()):
        return p, None
    raise UserError(f"{path} holds no checkpoint (expected WORKDIR/checkpoints/<step>/ with a meta item)")


def _read_data_state(directory: Any, per_process: bool = False) -> bytes:
    """This process's iterator state, in the per-process files grain's CheckpointHandler writes.

    Every process iterates the same global stream and slices its rows at the end (data/pipeline.py),
    so the states are equal and a checkpoint written by K processes restores in any other number.
    `per_process` (data.source=prepared: each process reads its own rows) needs this process's own."""
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
        return own.read_text().encode()
    if per_process:
        written = sorted(p.name for p in directory.glob("process_*-of-*.json"))
        count = written[0].rsplit("-of-", 1)[1].removesuffix(".json") if written else "?"
        raise UserError(f"this checkpoint's data position was saved by {count} processes reading their own rows "
                        f"of prepared data; resume it with {count} processes (this run has {jax.process_count()})")
    others = sorted(directory.glob("process_0-of-*.json"))
    if not others:
        raise FileNotFoundError(f"no data iterator state in {directory}")
    return others[0].read_text().encode()


def abstract_params(cfg: Config, mesh: jax.sharding.Mesh) -> Any:
    """Shape/dtype/sharding of the params as a pure dict: the restore target on `mesh`."""
    from codegen_jax.model import abstract_model
    from codegen_jax.sharding import abstract, state_shardings

    _, abs_state = abstract_model(cfg.model, lora=cfg.lora)
    return abstract(nnx.to_pure_dict(abs_state), nnx.to_pure_dict(state_shardings(abs_state, mesh)))


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr: ocp.CheckpointManager, *, abstract: dict[str, Any], data_iterator: Any = None,
            step: int | None = None, validate: Callable[[dict], None] | None = None
            ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """Restore the latest complete step (or `step`): returns (step, restored items, meta), or None when
    there is nothing to restore. A latest step that fails to load is skipped with a warning and the one
    before it used. `abstract` maps item names ('params', 'opt_state') to their abstract targets;
    `validate(meta)` may refuse a step (raising UserError) before any array is read."""
    steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
    for s in steps:
        try:
            meta = read_meta(mngr, s)
            if validate is not None:
                validate(meta)
            items = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
            out = mngr.restore(s, args=ocp.args.Composite(**items))
            per_process = meta["config"].get("data", {}).get("source") == "prepared"
            data_state = _read_data_state(mngr.directory / str(s) / "data", per_process) if data_iterator else None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable step is skipped, never fatal
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if step is not None:
                raise UserError(f"checkpoint step {s} in {mngr.directory} cannot be restored: {reason}") from None
            log.warning("checkpoint step %s is unreadable (%s); trying the previous one", s, reason)
            continue
        if data_iterator is not None:
            set_iterator_state(data_iterator, data_state)
        return s, {k: out[k] for k in abstract}, meta
    return None


def quarantine_newer(mngr: ocp.CheckpointManager, step: int) -> list[Any]:
    """Move unreadable steps newer than the restored `step` to `checkpoints_unreadable/`: training
    will write those step numbers again, and the broken files stay for inspection, never deleted."""
    moved = []
    root = mngr.directory
    for s in sorted(x for x in mngr.all_steps() if x > step):
        if jax.process_index() == 0:
            dest = root.parent / "checkpoints_unreadable" / f"{s}-{int(time.time())}"
            storage.move_tree(root / str(s), dest)
            log.warning("moved unreadable checkpoint step %s to %s", s, dest)
            moved.append(dest)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("codegen_jax_quarantine")
    mngr.reload()
    return moved


def config_from_meta(meta: dict[str, Any]) -> Config:
    try:
        return from_dict(meta["config"])
    except (ConfigError, KeyError) as e:
        raise UserError(f"checkpoint config cannot be read: {e}") from None


def load_params(path: str | Path, mesh: jax.sharding.Mesh | None = None
                ) -> tuple[Config, Any, dict[str, Any], int]:
    """(config, params pure dict sharded on `mesh`, meta, step) from a run dir or step dir, without
    building a model. Default mesh: all devices on the data axis; any mesh works, whatever mesh the
    checkpoint was written on (Orbax reshards on restore)."""
    from codegen_jax.sharding import make_mesh

    root, step = resolve(path)
    mngr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(create=False))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise UserError(f"no complete checkpoint under {root}")
    meta = read_meta(mngr, step)
    cfg = config_from_meta(meta)
    mesh = mesh or make_mesh({"data": jax.device_count(), "fsdp": 1, "tensor": 1})
    _, items, _ = restore(mngr, abstract={"params": abstract_params(cfg, mesh)}, step=step)
    mngr.close()
    return cfg, items["params"], meta, step


def load_inference(path: str | Path, mesh: jax.sharding.Mesh | None = None
                   ) -> tuple[Config, Any, Any, int]:
    """(config, model, tokenizer, step) from a run dir or step dir, params sharded on `mesh`."""
    from codegen_jax.data.tokenizer import load_tokenizer
    from codegen_jax.model import abstract_model

    cfg, params, meta, step = load_params(path, mesh)
    graphdef, _ = abstract_model(cfg.model, lora=cfg.lora)
    model = nnx.merge(graphdef, params)
    with tempfile.TemporaryDirectory(prefix="codegen_jax_tok_") as tmp:  # loaded into memory: not kept
        tokenizer = load_tokenizer(materialize_tokenizer(meta["tokenizer"], tmp))
    return cfg, model, tokenizer, step


def write_params_checkpoint(workdir: str | Path, cfg: Config, params: Any, tokenizer: Any,
                            step: int = 0) -> Any:
    """A checkpoint holding params only (import-hf's output): generate, export-hf and
    `train --init-from` accept it."""
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(cfg.to_yaml())
    mngr = manager(workdir, keep=1, async_save=False)
    save(mngr, step, params=params, cfg=cfg, tokenizer=tokenizer)
    mngr.wait_until_finished()
    mngr.close()
    return workdir / "checkpoints" / str(step)
