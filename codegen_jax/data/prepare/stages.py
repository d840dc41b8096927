"""The prepare job as datatrove stages, and the executors that run them (local, Slurm, Ray).

    clean     (N tasks)  read this task's inputs -> clean.py rules -> language -> secrets -> PII
                         -> work/clean + MinHash signatures
    buckets   (1 per band) datatrove MinhashDedupBuckets: candidate duplicate pairs
    clusters  (1 task)   verify candidates, cluster, choose drops (exact and near duplicates)
    filter    (N tasks)  drop duplicates -> decontaminate -> work/final
    tokenizer (1 task)   DIR/tokenizer (data.tokenizer, or a BPE trained on the final train split)
    shards    (N tasks)  mine pairs -> tokenize -> ArrayRecord shards
    manifest  (1 task)   DIR/manifest.json

Each stage is one datatrove executor with its own logging dir (DIR/logs/<stage>: task logs, stats,
completion markers). Finished tasks are skipped on a re-run, so a failed or interrupted run resumes
with the same command. DIR/prepare.json holds the settings the directory was made with; a re-run with
other settings is refused (its finished tasks would not match).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from codegen_jax.config import Config
from codegen_jax.data import sources
from codegen_jax.data.prepare import decontam, languages
from codegen_jax.data.prepare.decontam import Decontaminate
from codegen_jax.data.prepare.filters import CleanFilter, LanguageFilter
from codegen_jax.data.prepare.manifest import WriteManifest
from codegen_jax.data.prepare.neardup import (NUM_PERM, CodeMinhashSignature, DedupClusters, DedupFilter,
                                              minhash_config)
from codegen_jax.data.prepare.read import ReadSources
from codegen_jax.data.prepare.redact import RedactPII, RedactSecrets
from codegen_jax.data.prepare.shards import TrainTokenizer, WriteShards
from codegen_jax.data.prepare.store import DocReader, DocWriter, work_path, write_json
from codegen_jax.errors import UserError
from codegen_jax.progress import Progress

SETTINGS = "prepare.json"
# The data settings the shards depend on (the rest, e.g. pair_ratio, shuffle_seed, pack, apply when training)
PREPARE_FIELDS = ("source", "paths", "extensions", "text_field", "prompt_field", "completion_field", "seq_len",
                  "tokenizer", "val_fraction", "max_file_bytes", "max_line_length", "min_alnum_fraction", "exclude",
                  "languages", "language_weights", "redact", "near_dedup", "near_dup_threshold", "decontaminate",
                  "decontam_ngram", "decontam_files")


@dataclasses.dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


def settings(cfg: Config, tasks: int) -> dict[str, Any]:
    """Everything the outputs depend on (checked against DIR/prepare.json on a re-run)."""
    d = cfg.data
    mh = minhash_config(d.near_dup_threshold)
    data = {k: v for k, v in dataclasses.asdict(d).items() if k in PREPARE_FIELDS}
    return {
        "config": {"data": data, "model.vocab_size": cfg.model.vocab_size},
        "tasks": tasks, "seq_len": d.seq_len,
        "near_dedup": {"enabled": d.near_dedup, "threshold": d.near_dup_threshold, "shingle_words": mh.n_grams,
                       "num_perm": NUM_PERM, "bands": mh.num_buckets, "rows": mh.hashes_per_bucket},
        "decontamination": {"enabled": d.decontaminate, "ngram": d.decontam_ngram,
                            "sources": decontam.sources_of(d.decontam_files) if d.decontaminate else []},
    }


def plan(cfg: Config, root: str, tasks: int, info: dict[str, Any]) -> list[Stage]:
    """The stages for `cfg`, writing under `root`, the per-document ones in `tasks` tasks."""
    d = cfg.data
    data = dataclasses.asdict(d)
    mh = minhash_config(d.near_dup_threshold)
    keep = languages.check_names(d.languages, "data.languages")
    weights = languages.parse_weights(d.language_weights)
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    clean = [ReadSources(data, root), CleanFilter(data, root), LanguageFilter(keep, root)]
    clean += [RedactSecrets(root), RedactPII(root)] if d.redact else []
    clean += [DocWriter(root, "clean"), CodeMinhashSignature(root, mh)]
    filtered = [DocReader(root, "clean"), DedupFilter(root)]
    filtered += [Decontaminate(root, d.decontam_files, d.decontam_ngram)] if d.decontaminate else []
    sigs, dups = (str(work_path(root, "minhash", k)) for k in ("sigs", "dups"))
    return [
        Stage("clean", clean, tasks),
        Stage("buckets", [MinhashDedupBuckets(input_folder=sigs, output_folder=dups, config=mh)], mh.num_buckets),
        Stage("clusters", [DedupClusters(root, mh, d.near_dup_threshold, d.near_dedup)], 1),
        Stage("filter", filtered + [DocWriter(root, "final")], tasks),
        Stage("tokenizer", [TrainTokenizer(root, tasks, d.tokenizer, cfg.model.vocab_size)], 1),
        Stage("shards", [DocReader(root, "final"), WriteShards(root, d.seq_len, weights)], tasks),
        Stage("manifest", [WriteManifest(root, info)], 1),
    ]


def check_inputs(cfg: Config) -> None:
    """Fail before any task starts on what can be checked here: paths, names, settings."""
    d = cfg.data
    if d.source == "prepared":
        raise UserError("data prepare reads raw data: set data.source to stdlib, files or datasets")
    if d.max_docs > 0:
        raise UserError("data prepare does not subsample (data.max_docs): set data.max_docs=0")
    if d.source != "stdlib":
        sources._existing(d.paths, "data.paths")
    if d.source == "datasets":
        _refuse_chat_rows(d)
    if d.source == "files":
        languages.selected_extensions(d.extensions)
    languages.check_names(d.languages, "data.languages")
    languages.parse_weights(d.language_weights)
    if d.tokenizer:
        from codegen_jax.data.tokenizer import load_tokenizer

        load_tokenizer(d.tokenizer)


def _refuse_chat_rows(d: Any) -> None:
    """Chat rows (`messages`) need per-turn loss masks, which prepared shards do not carry. (The first
    input decides: its columns are known without reading the corpus.)"""
    for item in [i for p in sources._existing(d.paths, "data.paths") for i in sources._data_inputs(p)][:1]:
        cols = sources._load_dataset(item).column_names
        if d.messages_field in cols and d.text_field not in cols and not {d.prompt_field, d.completion_field} <= set(cols):
            raise UserError(f"{item} holds chat rows ('{d.messages_field}'), which data prepare does not support "
                            "(their per-turn loss masks); train on them directly with data.source=datasets")


def claim_dir(out: Path, info: dict[str, Any]) -> None:
    """Record the settings in a new or empty DIR; in one made before, they must be the same."""
    marker = out / SETTINGS
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old != json.loads(json.dumps(info)):
            diffs = _differences(old, json.loads(json.dumps(info)))
            raise UserError(f"{out} was prepared with other settings ({'; '.join(diffs[:3])}); use another --out, "
                            f"or delete {out} to start over")
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no {SETTINGS}: not a prepare directory; "
                        "use a new or empty directory")
    write_json(marker, info)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} there, {new!r} now"]


@contextlib.contextmanager
def _task_output_to(log: Path, enabled: bool):
    """datatrove logs every task at INFO on stderr: send fd 2 (ours and the workers') to `log`."""
    if not enabled:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _failed(stage: str, logs: Path, e: BaseException | None, ranks: list[int]) -> UserError:
    if isinstance(e, UserError):
        return e
    cause = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}" if e else f"tasks {ranks[:5]} unfinished"
    return UserError(f"data prepare stage '{stage}' failed ({cause}); task logs in {logs}/logs; finished tasks are "
                     "kept: fix the cause and run the same command again")


# Imported once by the forkserver that starts the local workers, so that each worker does not pay
# for datatrove, our steps and the tokenizer stack (torch, through transformers) again.
_WORKER_PRELOAD = ("codegen_jax.data.prepare.stages", "codegen_jax.data.tokenizer", "transformers.tokenization_utils_fast",
                   "transformers.models.auto.tokenization_auto")


def run_local(stages: list[Stage], out: Path, workers: int, progress: Progress, quiet: bool = True) -> None:
    import multiprocess
    from datatrove.executor import LocalPipelineExecutor

    if workers > 1:
        multiprocess.get_context("forkserver").set_forkserver_preload(list(_WORKER_PRELOAD))
    for st in stages:
        logs = out / "logs" / st.name
        ex = LocalPipelineExecutor(st.pipeline, tasks=st.tasks, workers=max(1, min(workers, st.tasks)),
                                   logging_dir=str(logs), skip_completed=True)
        todo = ex.get_incomplete_ranks()
        progress.message(f"stage {st.name}: {len(todo)} of {st.tasks} tasks to run")
        try:
            with _task_output_to(out / "logs" / "console.log", quiet):
                ex.run()
        except Exception as e:  # noqa: BLE001 - a task's error, reported in one line with where its log is
            raise _failed(st.name, logs, e, todo) from None
        if left := ex.get_incomplete_ranks():
            raise _failed(st.name, logs, None, left)


def run_ray(stages: list[Stage], out: Path, workers: int, progress: Progress, quiet: bool = True) -> None:
    """Each stage as a RayPipelineExecutor on the cluster at RAY_ADDRESS, or on a local Ray started (and
    stopped) here with `workers` CPUs. On several nodes DIR must be on a file system they all share."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'codegen-jax[ray]'") from None
    from datatrove.executor.ray import RayPipelineExecutor

    started = not ray.is_initialized()
    with _task_output_to(out / "logs" / "console.log", quiet):
        if started:
            address = os.environ.get("RAY_ADDRESS")
            ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                     log_to_driver=not quiet, logging_level="ERROR")
    try:
        for st in stages:
            logs = out / "logs" / st.name
            with _task_output_to(out / "logs" / "console.log", quiet):
                ex = RayPipelineExecutor(st.pipeline, tasks=st.tasks, workers=max(1, min(workers, st.tasks)),
                                         logging_dir=str(logs), skip_completed=True, mem_per_cpu_gb=0.5)
                progress.message(f"stage {st.name}: {len(ex.get_incomplete_ranks())} of {st.tasks} tasks to run "
                                 "(Ray)")
                ex.run()
            if left := ex.get_incomplete_ranks():
                raise _failed(st.name, logs, None, left)
    finally:
        if started:
            ray.shutdown()


def slurm_executors(stages: list[Stage], out: Path, slurm: dict[str, Any]) -> list:
    """One SlurmPipelineExecutor per stage, each depending on the one before (submitted by `.run()` on
    the last). `slurm`: partition (required), time, cpus_per_task, mem_per_cpu_gb, workers, venv_path."""
    from datatrove.executor.slurm import SlurmPipelineExecutor

    if not slurm.get("partition"):
        raise UserError("--executor slurm needs --partition NAME (the Slurm partition to submit to)")
    venv = slurm.get("venv_path") or (Path(sys.prefix, "bin", "activate") if Path(sys.prefix, "bin", "activate").is_file()
                                      else None)
    executors, prev = [], None
    for st in stages:
        prev = SlurmPipelineExecutor(
            st.pipeline, tasks=st.tasks, time=slurm.get("time") or "24:00:00", partition=slurm["partition"],
            cpus_per_task=slurm.get("cpus_per_task", 1), mem_per_cpu_gb=slurm.get("mem_per_cpu_gb", 2),
            workers=slurm.get("workers", -1), job_name=f"cj-prepare-{st.name}", logging_dir=str(out / "logs" / st.name),
            depends=prev, venv_path=str(venv) if venv else None, skip_completed=True)
        executors.append(prev)
    return executors


def run_slurm(stages: list[Stage], out: Path, slurm: dict[str, Any], progress: Progress) -> list:
    if shutil.which("sbatch") is None:
        raise UserError("--executor slurm needs Slurm's sbatch on PATH: run data prepare on a Slurm login node")
    executors = slurm_executors(stages, out, slurm)
    executors[-1].run()
    ids = [str(ex.job_id) for ex in executors]
    progress.message(f"submitted {len(ids)} Slurm jobs ({', '.join(ids)}); {out}/manifest.json appears when the "
                     f"last one finishes")
    return executors
