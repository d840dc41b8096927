"""Corpus preparation at scale (`codegen-jax data prepare`): a datatrove job from a config's data section
to ArrayRecord shards that training reads (`data.source=prepared`, see `codegen_jax.data.prepared`).

    read -> clean (clean.py rules) -> language -> secrets/PII redaction -> exact + near dedup (MinHash)
      -> decontamination -> pair mining -> tokenization -> DIR/{train,validation}/*.arrayrecord
      + DIR/tokenizer + DIR/manifest.json

Modules: `stages` (the stages and executors), `read`, `filters`, `languages`, `redact`, `neardup`,
`decontam`, `ts_pairs`, `shards`, `manifest`, `store` (intermediate files), `record` (the shard
format, shared with the reader) and `report` (text for the commands). All but `languages`, `record`
and `report` need the `prepare` extra (datatrove, detect-secrets, tree-sitter); this module imports
them only when `prepare` runs, so training never needs them.

Decisions: the shards hold tokenized examples, so DIR/tokenizer is part of the data (data.tokenizer
copied in, else a BPE trained on the final train split); documents and mined pairs go to separate
shards, so data.pair_ratio and data.shuffle_seed stay training-time settings; data.language_weights
resample when the shards are written. Outputs depend only on the inputs, the settings and --tasks
(recorded in DIR/prepare.json), never on --workers or the executor.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from codegen_jax.config import Config
from codegen_jax.errors import UserError
from codegen_jax.progress import SILENT, Progress

EXTRA_HINT = "pip install 'codegen-jax[prepare]'"
EXECUTORS = ("local", "slurm", "ray")
_NEEDED = ("datatrove", "detect_secrets", "tree_sitter_language_pack", "array_record", "xxhash")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent package
        return False


def require_extra() -> None:
    """Fail in one line, naming the extra, when a package of `codegen-jax[prepare]` is missing."""
    missing = [m for m in _NEEDED if not _installed(m)]
    if missing:
        raise UserError(f"data prepare needs {', '.join(missing)}: {EXTRA_HINT}")


def _recorded_tasks(out: Path) -> int | None:
    from codegen_jax.data.prepare.stages import SETTINGS

    marker = out / SETTINGS
    return json.loads(marker.read_text()).get("tasks") if marker.is_file() else None


def prepare(cfg: Config, out: str | os.PathLike, *, executor: str = "local", tasks: int | None = None,
            workers: int | None = None, slurm: dict[str, Any] | None = None, progress: Progress = SILENT,
            quiet: bool = True) -> dict[str, Any]:
    """Prepare `cfg.data` into `out`; returns the manifest (local and Ray), or {"submitted": job ids}
    (Slurm: the jobs run later). `tasks` (default: the number `out` was made with, else `workers`)
    fixes the shards; `workers` (default: all cores) runs them in parallel. `quiet` sends datatrove's
    task logs to out/logs/console.log. Bad input raises UserError before anything is written."""
    if executor not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    require_extra()
    from codegen_jax.data.prepare import stages

    if executor == "ray" and not _installed("ray"):
        raise UserError("--executor ray needs Ray: pip install 'codegen-jax[ray]'")
    if executor == "slurm":
        import shutil

        if shutil.which("sbatch") is None:
            raise UserError("--executor slurm needs Slurm's sbatch on PATH: run data prepare on a Slurm login node")
        if not (slurm or {}).get("partition"):
            raise UserError("--executor slurm needs --partition NAME (the Slurm partition to submit to)")
    for name, value in (("--tasks", tasks), ("--workers", workers)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be positive; got {value}")
    out = Path(out).expanduser().absolute()
    stages.check_inputs(cfg)
    slurm = {**(slurm or {}), **({"workers": workers} if workers else {})}  # Slurm: array tasks at once
    workers = workers or os.cpu_count() or 1
    tasks = tasks or _recorded_tasks(out) or workers
    info = stages.settings(cfg, tasks)
    plan = stages.plan(cfg, str(out), tasks, info)
    stages.claim_dir(out, info)
    if executor == "slurm":
        return {"submitted": [ex.job_id for ex in stages.run_slurm(plan, out, slurm, progress)]}
    if executor == "ray":
        stages.run_ray(plan, out, workers, progress, quiet)
    else:
        stages.run_local(plan, out, workers, progress, quiet)
    from codegen_jax.data.prepared import read_manifest

    return read_manifest(str(out))[1]
