"""A wall-clock budget for a run (`train.time_budget_s`), known to the learning-rate schedule.

The run is timed, then its length is fixed: as many steps as the rest of the budget holds at the
measured pace, evaluations and checkpoint saves included, at most `train.steps`. When that happens
depends on the schedule:
- `wsd` and `constant` keep the learning rate flat until the decay near the end, so the length can be
  fixed late, after `LATE_FRACTION` of the budget (the pace measured on many steps, the input pipeline
  past its start-up bursts): the decay then starts where the budget puts it ("decay triggered by the
  budget");
- the others (cosine, linear) shape every post-warmup step by the total, so the length is fixed inside
  the warmup, after `probe_steps` steps.
Either way the steps before the fix follow the schedule of the final length, and the number is written
to WORKDIR/budget.json before training goes on: a restarted run reads it back instead of measuring
again, so a resumed run follows the same schedule as one never stopped (exact resume holds). Until then each
checkpoint records the budget spent so far, and a restart counts it.
"""

from __future__ import annotations

import json
from typing import Any

from codegen_jax import storage
from codegen_jax.config import Config
from codegen_jax.errors import UserError
from codegen_jax.train.optim import wsd_decay_start

BUDGET_FILE = "budget.json"
MAX_PROBE = 8
LATE_FRACTION = 0.35
PACE_WINDOW = 20  # the most recent steps the pace is measured on


def late(cfg: Config) -> bool:
    """Whether the length may be fixed late (the schedule is flat until its decay)."""
    return cfg.optim.schedule in ("wsd", "constant")


def probe_steps(cfg: Config) -> int:
    """Steps timed before the length is fixed early: they must fall inside the warmup."""
    if cfg.optim.warmup_steps < 3:
        raise UserError("train.time_budget_s with this optim.schedule needs optim.warmup_steps >= 3 (the "
                        "learning rate of the timed first steps must not depend on the run's length); or "
                        "use optim.schedule=wsd")
    return min(MAX_PROBE, cfg.optim.warmup_steps - 1, cfg.train.steps)


def due(cfg: Config, step: int, elapsed_s: float, probe: int) -> bool:
    """Fix the length now? Late schedules: once LATE_FRACTION of the budget is spent (and past the
    warmup), while the provisional length's decay is still ahead; the others: at the probe step."""
    if not late(cfg):
        return step == probe
    decay_start = wsd_decay_start(cfg.optim, cfg.train.steps)
    past_warmup = step > cfg.optim.warmup_steps
    return (past_warmup and elapsed_s >= LATE_FRACTION * cfg.train.time_budget_s) or step + 1 >= decay_start


def recorded(workdir: Any, cfg: Config) -> dict | None:
    """The length an earlier start of this run fixed, if any, for the same `train.steps` and
    `train.time_budget_s` (a restart that asks for other ones, e.g. to train on, is measured again)."""
    path = storage.path(workdir) / BUDGET_FILE
    found = json.loads(path.read_text()) if path.exists() else {}
    same = found.get("for_steps") == cfg.train.steps and found.get("budget_s") == cfg.train.time_budget_s
    return found if "steps" in found and same else None


def fit(cfg: Config, elapsed_s: float, step_s: float, eval_s: float, done: int, realized_s: float = 0.0) -> int:
    """Steps the budget holds: `done` so far, then the rest of the budget at `step_s` per step plus an
    evaluation (`eval_s`) every `train.eval_every` steps and one at the end, or at `realized_s` per
    step if slower: the wall time per step so far, which also counts what happens between steps
    (checkpoint saves, the steps an asynchronous save slows down; a step median alone overran a
    budget by ~5%). Never fewer than the warmup and one step (a shorter run would have a shorter
    warmup than the timed steps had), never more than `train.steps`."""
    left = cfg.train.time_budget_s - elapsed_s - eval_s
    per_step = max(step_s + eval_s / cfg.train.eval_every, realized_s)
    more = int(left // per_step) if left > 0 else 0
    return min(cfg.train.steps, max(done + more, cfg.optim.warmup_steps + 1, _decay_after(cfg, done)))


def _decay_after(cfg: Config, done: int) -> int:
    """The shortest length whose schedule is still flat through step `done` (late schedules: the
    steps run so far were flat, so the decay must start after them)."""
    if cfg.optim.schedule != "wsd":
        return 0
    n = done + 1
    while wsd_decay_start(cfg.optim, n) < done:
        n += 1
    return n


def record(workdir: Any, steps: int, cfg: Config, **measured: float) -> None:
    """Fix the length of the run `cfg` asks for: `recorded` returns it from now on."""
    fixed = {"steps": steps, "for_steps": cfg.train.steps, "budget_s": cfg.train.time_budget_s, **measured}
    (storage.path(workdir) / BUDGET_FILE).write_text(json.dumps(fixed, indent=2) + "\n")


def record_spent(workdir: Any, spent_s: float) -> None:
    """Before the length is fixed: the budget spent up to the checkpoint just saved (a restart from
    it has only the rest)."""
    (storage.path(workdir) / BUDGET_FILE).write_text(json.dumps({"spent_s": spent_s}) + "\n")


def spent(workdir: Any) -> float:
    """The budget an earlier start spent before its last checkpoint (0 for a new run)."""
    path = storage.path(workdir) / BUDGET_FILE
    return float(json.loads(path.read_text()).get("spent_s", 0.0)) if path.exists() else 0.0


def with_steps(cfg: Config, steps: int) -> Config:
    """`cfg` running `steps` steps, its schedule spanning them."""
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps),
                               optim=dataclasses.replace(cfg.optim, schedule_steps=steps))
