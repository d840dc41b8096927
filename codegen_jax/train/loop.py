"""The training loop: set up (mesh, tokenizer, data, model, optimizer), restore or init, run steps,
evaluate, checkpoint, handle preemption, and generate samples at the end.

Exact resume: a checkpoint holds params, optimizer state, step and the grain iterator state taken
after the same step, and nothing in a step is random, so a run killed at any point and restarted with
the same command continues with bit-identical losses.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any, Callable

import grain
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from codegen_jax import checkpoint as ckpt
from codegen_jax import distributed, lora, storage
from codegen_jax.train import budget
from codegen_jax.config import Config, LoraConfig, ModelConfig
from codegen_jax.config_checks import check_batch, mesh_shape
from codegen_jax.data.pipeline import held_out_config, make_iterator
from codegen_jax.data.tokenizer import CodeTokenizer, get_tokenizer
from codegen_jax.errors import UserError
from codegen_jax.flops import flops_per_token
from codegen_jax.model import create_model, layer_layout
from codegen_jax.progress import SILENT, Progress
from codegen_jax.sharding import global_batch, make_mesh, on_mesh
from codegen_jax.train.metrics import MetricsWriter, peak_flops
from codegen_jax.train.optim import make_optimizer, schedule
from codegen_jax.train.step import TrainState, make_eval_step, make_train_step, train_state_layout


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _check_model_compatible(saved: dict, cfg: Config, source: str, layout_matters: bool = True) -> None:
    """Resuming or initialising from a checkpoint of another model shape fails with the differences.
    (Params alone convert between scanned and unscanned layers; optimizer state does not.)"""
    shape_keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "tie_embeddings", "attention_bias", "attention_out_bias", "norm", "mlp", "mlp_bias")
    # resuming must also keep what the weights were trained to compute with (--init-from may change it:
    # a longer context through RoPE scaling is a fine-tune)
    if layout_matters:
        shape_keys += ("scan_layers", "sliding_window", "rope_theta", "rope_scaling", "rope_factor")
    default = ModelConfig()  # a checkpoint written before a field existed had its default
    there = {k: saved["model"].get(k, getattr(default, k)) for k in shape_keys}
    diffs = [f"model.{k}: {there[k]} there, {getattr(cfg.model, k)} here"
             for k in shape_keys if there[k] != getattr(cfg.model, k)]
    if layout_matters:  # resuming: the adapters in the checkpoint are this run's
        lora_keys = ("enabled", "rank", "alpha", "targets")
        was = {k: saved.get("lora", {}).get(k, getattr(LoraConfig(), k)) for k in lora_keys}
        diffs += [f"lora.{k}: {was[k]} there, {getattr(cfg.lora, k)} here"
                  for k in lora_keys if was[k] != getattr(cfg.lora, k)]
    if diffs:
        raise UserError(f"{source} holds a different model ({'; '.join(diffs)}); use the same model "
                        "settings, another --workdir, or --init-from to start a new run from it")


def _shared_tokenizer(cfg: Config, workdir: Any) -> CodeTokenizer:
    """Process 0 trains (or loads) the tokenizer; the others wait, then load the one it saved."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return get_tokenizer(cfg, workdir)
    tokenizer = get_tokenizer(cfg, workdir) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("codegen_jax_tokenizer")
    return tokenizer or get_tokenizer(cfg, workdir)


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once by `_setup`."""

    cfg: Config
    workdir: Any  # a Path, or an epath.Path for a gs:// / s3:// workdir
    mesh: jax.sharding.Mesh
    tokenizer: CodeTokenizer
    graphdef: nnx.GraphDef
    state: TrainState
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict], dict]
    data: grain.DatasetIterator
    mngr: ocp.CheckpointManager
    start_step: int


def _setup(cfg: Config, workdir: Any, init_from: str | None, progress: Progress) -> _Run:
    check_batch(cfg, jax.device_count())
    mesh = make_mesh(mesh_shape(cfg.mesh, jax.device_count()))
    tokenizer = _shared_tokenizer(cfg, workdir)
    data = make_iterator(cfg, tokenizer, split="train", process_index=jax.process_index(),
                         process_count=jax.process_count())
    model = create_model(cfg.model, mesh, seed=cfg.train.seed, lora=cfg.lora)
    graphdef, params_state = nnx.split(model)
    optimizer: optax.GradientTransformation = make_optimizer(cfg.optim, cfg.train.steps)
    state_sh, abstract = train_state_layout(params_state, optimizer, mesh, cfg.lora)
    params = nnx.to_pure_dict(params_state)
    trained = lora.trained(params, cfg.lora)  # with LoRA: the adapters
    opt_state = jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(trained)
    state = TrainState(jax.device_put(np.int32(0), state_sh.step), params, opt_state)
    mngr = ckpt.manager(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = 0
    restored = None
    if cfg.checkpoint.resume == "auto" and mngr.all_steps():
        restored = ckpt.restore(mngr, abstract={"params": abstract.params, "opt_state": abstract.opt_state},
                                data_iterator=data, validate=lambda meta:
                                _check_model_compatible(meta["config"], cfg, f"checkpoint in {workdir}"))
        if restored is None:  # starting over would overwrite them: refuse instead
            raise UserError(f"no checkpoint in {workdir}/checkpoints can be restored (see the warnings "
                            "above: a changed optimizer setup?); use another --workdir")
    if restored is not None:
        start, items, _ = restored
        ckpt.quarantine_newer(mngr, start)
        step0 = jax.device_put(np.int32(start), state_sh.step)
        state = TrainState(step0, items["params"], items["opt_state"])
        progress.message(f"resumed from step {start}")
    elif init_from:
        src_cfg, src_params, _, step = ckpt.load_params(init_from, mesh)
        _check_model_compatible(src_cfg.to_dict(), cfg, f"--init-from {init_from}", layout_matters=False)
        # a LoRA source contributes its adapted weights (adapters merged), not its bare base
        src_params = (lora.merge(src_params, src_cfg.model, src_cfg.lora) if src_cfg.lora.enabled
                      else lora.strip(src_params))
        src_params = layer_layout(src_params, src_cfg.model.scan_layers, cfg.model.scan_layers)
        if cfg.lora.enabled:  # the source's weights, this run's fresh adapters (B = 0: the same function)
            src_params = lora.join(lora.trained(params, cfg.lora), src_params)
        state = TrainState(state.step, jax.device_put(src_params, state_sh.params), opt_state)
        progress.message(f"initialised params from {init_from} (step {step}); fresh optimizer"
                         + (f"; LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}" if cfg.lora.enabled else ""))
    token_bytes = jax.device_put(tokenizer.token_byte_lengths().astype(np.float32), state_sh.step)
    train_step = _train_step(cfg, graphdef, optimizer, mesh, state_sh)
    eval_step = on_mesh(make_eval_step(graphdef, mesh, state_sh.params, token_bytes, cfg.train.loss_chunk), mesh)
    return _Run(cfg, workdir, mesh, tokenizer, graphdef, state, train_step, eval_step, data, mngr, start)


def evaluate(run: _Run) -> dict[str, float]:
    """Loss and bits per byte over the first `train.eval_batches` batches of the validation split's
    documents (`pipeline.held_out_config`)."""
    cfg = held_out_config(run.cfg)
    it = make_iterator(cfg, run.tokenizer, split="validation", process_index=jax.process_index(),
                       process_count=jax.process_count(), num_epochs=1)
    totals = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for _, batch in zip(range(cfg.train.eval_batches), it):
        out = run.eval_step(run.state.params, global_batch(batch, run.mesh))
        for k in totals:
            totals[k] += float(out[k])
    if totals["tokens"] == 0:
        return {}
    return {"eval_loss": totals["nll_sum"] / totals["tokens"],
            "eval_bpb": totals["nll_sum"] / math.log(2) / max(totals["bytes"], 1.0)}


def _save_failed(step: int | None, e: Exception) -> UserError:
    what = f"saving checkpoint step {step}" if step is not None else "finishing a checkpoint save"
    reason = str(e).splitlines()[0][:200] if str(e) else ""
    return UserError(f"{what} failed ({type(e).__name__}: {reason}); the earlier checkpoints are intact: "
                     "free disk space and run the same command to resume")


def _save(run: _Run, step: int) -> None:
    try:  # also raises a failure of the previous, asynchronous save
        ckpt.save(run.mngr, step, params=run.state.params, opt_state=run.state.opt_state, cfg=run.cfg,
                  tokenizer=run.tokenizer, data_iterator=run.data)
    except Exception as e:  # noqa: BLE001 - disk full, permissions, quota: all the user's to fix
        raise _save_failed(step, e) from None


def _prepare_workdir(cfg: Config, workdir: str | None) -> Any:
    """The run directory (a local path or a gs:// / s3:// URL), created, with the resolved config."""
    path = storage.path(workdir or f"runs/{cfg.name}")
    if distributed.is_main():
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.yaml").write_text(cfg.to_yaml())
    return path


def _log_record(step: int, m: dict, window_s: float, window_steps: int, cfg: Config, peak: float) -> dict:
    tokens_per_s = window_steps * cfg.train.batch_size * cfg.data.seq_len / max(window_s, 1e-9)
    return {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
            "target_tokens": int(m["tokens"]), "tokens_per_s": tokens_per_s,
            "step_time": window_s / max(window_steps, 1),
            "mfu": tokens_per_s * flops_per_token(cfg.model, cfg.data.seq_len) / peak}


def _generator(run: _Run) -> Any:
    from codegen_jax.sample import Generator

    return Generator(nnx.merge(run.graphdef, run.state.params), run.tokenizer, run.mesh)


def sample_texts(run: _Run, gen: Any = None) -> list[str]:
    """Greedy completions (prompt included) of `train.sample_prompts` with the trained weights, with the
    sample section's decoding settings."""
    gen = gen or _generator(run)
    s = run.cfg.sample
    prompts = run.cfg.train.sample_prompts
    outs = gen.generate(prompts, max_new_tokens=s.max_new_tokens, temperature=0.0, stop=s.stop,
                        repetition_penalty=s.repetition_penalty, no_repeat_ngram=s.no_repeat_ngram)
    return [prompt + out[0].text for prompt, out in zip(prompts, outs)]


def _budget_due(cfg: Config, step: int, started: float, probe: int) -> bool:
    """`budget.due`, the same on every process: the parts that depend on the clock (which differs from
    host to host) are decided by process 0, every `train.log_every` steps, and broadcast."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return budget.due(cfg, step, time.perf_counter() - started, probe)
    if budget.due(cfg, step, 0.0, probe):  # the step-only conditions
        return True
    if not budget.late(cfg) or step % cfg.train.log_every:
        return False
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(budget.due(cfg, step, time.perf_counter() - started,
                                                                         probe))))


def _fix_length(run: _Run, step_times: list[float], started: float, first_done: float,
                progress: Progress) -> Config:
    """After the timed first steps of a budgeted run (the first of them ended at `first_done`): the
    steps the budget holds, recorded in the workdir (process 0 decides, everyone follows), and the
    train step rebuilt for that schedule."""
    from jax.experimental import multihost_utils

    cfg, done = run.cfg, len(step_times) + run.start_step
    realized_s = (time.perf_counter() - first_done) / max(len(step_times) - 1, 1)  # saves included
    t0 = time.perf_counter()
    evaluate(run)  # compiles the eval step too, so the estimate covers both
    eval_s = time.perf_counter() - t0
    recent = step_times[1:][-budget.PACE_WINDOW:] or step_times  # the first step compiles
    step_s = float(np.median(recent))
    steps = budget.fit(cfg, time.perf_counter() - started, step_s, eval_s, done, realized_s)
    steps = int(multihost_utils.broadcast_one_to_all(np.int32(steps)))
    if distributed.is_main():
        budget.record(run.workdir, steps, cfg, step_s=step_s, eval_s=eval_s, realized_s=realized_s)
    progress.message(f"time budget {cfg.train.time_budget_s:.0f} s: {step_s:.3f} s per step here "
                     f"({realized_s:.3f} with evaluations and saves), so {steps} steps (train.steps "
                     f"{cfg.train.steps}); recorded in {budget.BUDGET_FILE}")
    if steps == cfg.train.steps:
        return cfg
    cfg = budget.with_steps(cfg, steps)
    _rebuild_step(run, cfg)
    if distributed.is_main():
        (run.workdir / "config.yaml").write_text(cfg.to_yaml())
    progress.start("train", cfg.train.steps, initial=done)
    return cfg


def _train_step(cfg: Config, graphdef: Any, optimizer: optax.GradientTransformation, mesh: Any,
                state_sh: TrainState) -> Any:
    """The jitted train step of `cfg` (its schedule, accumulation, loss chunk, LoRA), traced under `mesh`."""
    return on_mesh(make_train_step(graphdef, optimizer, schedule(cfg.optim, cfg.train.steps), mesh, state_sh,
                                   cfg.optim.grad_accum, cfg.optim.z_loss,
                                   skip_nonfinite=cfg.train.nan_policy == "skip", loss_chunk=cfg.train.loss_chunk,
                                   lora_cfg=cfg.lora, seed=cfg.train.seed), mesh)


def _rebuild_step(run: _Run, cfg: Config) -> None:
    """The train step for `cfg`'s schedule (the optimizer state's structure does not change)."""
    state_sh = jax.tree.map(lambda x: x.sharding, run.state)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    run.train_step = _train_step(cfg, run.graphdef, optimizer, run.mesh, state_sh)
    run.cfg = cfg


def train(cfg: Config, workdir: str | None = None, init_from: str | None = None,
          samples: bool = True, progress: Progress = SILENT) -> dict[str, Any]:
    """Train per `cfg` in `workdir` (resuming when it holds checkpoints); returns {step: loss} of the
    steps this call ran, the final eval metrics and (with `samples`) greedy completions of
    `train.sample_prompts` and, with `train.parse_eval`, the parse-rate report. With
    `train.time_budget_s` the run's length is fixed after timing its first steps (train/budget.py).
    Progress, resumes and warnings go to `progress`."""
    started = time.perf_counter()
    path = storage.path(workdir or f"runs/{cfg.name}")
    fixed = budget.recorded(path, cfg) if cfg.train.time_budget_s > 0 else None
    if fixed is not None:  # before config.yaml is written: it shows the length the run has
        cfg = budget.with_steps(cfg, fixed["steps"])
    path = _prepare_workdir(cfg, workdir)
    if fixed is None and cfg.train.time_budget_s > 0:
        started -= budget.spent(path)  # a restart before the length was fixed: what was spent counts
    run = _setup(cfg, path, init_from, progress)
    # a budget not fixed yet is fixed when `budget.due` (for early schedules after the probe steps,
    # or, resuming a run that crashed before it recorded one, after this start's first step)
    pending = cfg.train.time_budget_s > 0 and fixed is None
    probe = max(budget.probe_steps(cfg), run.start_step + 1) if pending and not budget.late(cfg) else 0
    writer = MetricsWriter(path, distributed.is_main(), cfg.train.wandb, cfg.to_dict())
    writer.truncate_after(run.start_step)
    peak = peak_flops(cfg.train.peak_flops)
    preempt = _Preemption()
    losses: dict[int, float] = {}
    last_eval: dict[str, float] = {}
    last_saved = run.start_step
    progress.start("train", cfg.train.steps, initial=run.start_step)
    window_start, window_steps = None, 0
    step_times: list[float] = []
    first_done = 0.0
    step = run.start_step
    try:
        while step < run.cfg.train.steps:
            step += 1
            cfg = run.cfg
            t_step = time.perf_counter()
            batch = global_batch(next(run.data), run.mesh)
            run.state, m = run.train_step(run.state, batch)
            m = jax.device_get(m)  # one sync per step: a NaN is caught before it can be checkpointed
            if not m["finite"] and cfg.train.nan_policy == "stop":
                raise UserError(f"loss is not finite at step {step}; the last good checkpoint (step "
                                f"{last_saved}) is intact; lower optim.lr or set train.nan_policy=skip")
            losses[step] = float(m["loss"])
            step_times.append(time.perf_counter() - t_step)
            first_done = time.perf_counter() if len(step_times) == 1 else first_done
            if pending and _budget_due(cfg, step, started, probe):
                cfg, pending = _fix_length(run, step_times, started, first_done, progress), False
            info = {}
            if window_start is None:  # the first step compiles: keep it out of the throughput window
                window_start = time.perf_counter()
            else:
                window_steps += 1
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                record = _log_record(step, m, time.perf_counter() - window_start, window_steps, cfg, peak)
                writer.write(record)
                info = dict(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            mfu=f"{record['mfu']:.1%}")
            progress.update(1, **info)
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                last_eval = evaluate(run)
                writer.write({"step": step, **last_eval})
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or preempt.signal:
                _save(run, step)
                last_saved = step
                if pending and distributed.is_main():
                    budget.record_spent(run.workdir, time.perf_counter() - started)
            if step % cfg.train.log_every == 0 or step % cfg.train.eval_every == 0:
                window_start, window_steps = time.perf_counter(), 0
            if preempt.signal:
                progress.message(f"received signal {preempt.signal}: saved checkpoint at step {step}; "
                                 "exiting")
                break
    finally:
        progress.close()
        try:
            run.mngr.wait_until_finished()
            save_error = None
        except Exception as e:  # noqa: BLE001 - reported below unless another error is on its way out
            save_error = _save_failed(None, e)
        writer.close()
        preempt.restore()
    if save_error is not None:
        raise save_error
    result = {"losses": losses, "eval": last_eval, "workdir": str(path), "preempted": bool(preempt.signal),
              "steps": run.cfg.train.steps, "tokens": run.cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len,
              "train_s": time.perf_counter() - started, "checkpoint": str(run.mngr.directory / str(last_saved))}
    if not preempt.signal and (samples and cfg.train.sample_prompts or cfg.train.parse_eval):
        gen = _generator(run)
        if samples and cfg.train.sample_prompts:
            result["samples"] = sample_texts(run, gen)
        if cfg.train.parse_eval:
            from codegen_jax.eval.parse import run_parse_eval

            s = run.cfg.sample
            result["parse"] = run_parse_eval(gen, repetition_penalty=s.repetition_penalty,
                                             no_repeat_ngram=s.no_repeat_ngram)
    return result
