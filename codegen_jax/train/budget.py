"""A wall-clock budget for a run (`train.time_budget_s`), known to the learning-rate schedule.

The first `probe_steps(cfg)` steps are timed (inside the warmup, where the learning rate does not depend
on the total), then the run's length is fixed: as many steps as the rest of the budget holds at the
measured pace, evaluations included, at most `train.steps`. The number is written to WORKDIR/budget.json
before training goes on, and a restarted run reads it back instead of measuring again, so a resumed
run follows the same schedule as one never stopped (exact resume holds).
"""

from __future__ import annotations

import json
from typing import Any

from codegen_jax import storage
from codegen_jax.config import Config
from codegen_jax.errors import UserError

BUDGET_FILE = "budget.json"
MAX_PROBE = 8


def probe_steps(cfg: Config) -> int:
    """Steps timed before the length is fixed: they must fall inside the warmup."""
    if cfg.optim.warmup_steps < 3:
        raise UserError("train.time_budget_s needs optim.warmup_steps >= 3 (the learning rate of the "
                        "timed first steps must not depend on the run's length)")
    return min(MAX_PROBE, cfg.optim.warmup_steps - 1, cfg.train.steps)


def recorded(workdir: Any) -> dict | None:
    """The length an earlier start of this run fixed, if any."""
    path = storage.path(workdir) / BUDGET_FILE
    return json.loads(path.read_text()) if path.exists() else None


def fit(cfg: Config, elapsed_s: float, step_s: float, eval_s: float, done: int) -> int:
    """Steps the budget holds: `done` so far, then the rest of the budget at `step_s` per step plus an
    evaluation (`eval_s`) every `train.eval_every` steps and one at the end; never fewer than the warmup
    and one step (a shorter run would have a shorter warmup than the timed steps had), never more
    than `train.steps`."""
    left = cfg.train.time_budget_s - elapsed_s - eval_s
    per_step = step_s + eval_s / cfg.train.eval_every
    more = int(left // per_step) if left > 0 else 0
    return min(cfg.train.steps, max(done + more, cfg.optim.warmup_steps + 1))


def record(workdir: Any, steps: int, **measured: float) -> None:
    (storage.path(workdir) / BUDGET_FILE).write_text(json.dumps({"steps": steps, **measured}, indent=2) + "\n")


def with_steps(cfg: Config, steps: int) -> Config:
    """`cfg` running `steps` steps, its schedule spanning them."""
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps),
                               optim=dataclasses.replace(cfg.optim, schedule_steps=steps))
