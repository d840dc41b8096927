"""train.time_budget_s: the first steps are timed, the run's length is fixed to what the budget holds
and recorded, the schedule is the one that length implies, and a restart follows the record."""

from __future__ import annotations

import json
import shutil

import pytest

from codegen_jax.config import ConfigError
from codegen_jax.train.loop import train
from codegen_jax.train.optim import schedule

from conftest import tiny_config

BASE = ["data.max_docs=60", "model.vocab_size=512", "train.steps=30", "optim.warmup_steps=4", "train.time_budget_s=0.001",
        "train.log_every=1", "train.eval_every=5", "train.eval_batches=1", "checkpoint.every=100",
        "checkpoint.async_save=false", "train.sample_prompts=[]"]


def test_a_tiny_budget_ends_at_a_checkpoint_with_its_schedule_and_a_restart_follows_it(tmp_path):
    cfg = tiny_config(*BASE)
    a = train(cfg, workdir=str(tmp_path / "a"), samples=False)
    recorded = json.loads((tmp_path / "a" / "budget.json").read_text())
    # 3 timed steps (inside the warmup of 4); the budget is gone, so the run is as short as it can be
    # with its warmup: 5 steps
    assert recorded["steps"] == 5 and a["steps"] == 5 and list(a["losses"]) == list(range(1, 6))
    assert sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir()) == [5]
    assert "steps: 5" in (tmp_path / "a" / "config.yaml").read_text()
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    implied = schedule(tiny_config(*BASE, "optim.schedule_steps=5").optim, 5)
    assert lrs == pytest.approx({k: float(implied(k - 1)) for k in range(1, 6)}, rel=1e-6)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "budget.json", tmp_path / "b" / "budget.json")
    b = train(cfg, workdir=str(tmp_path / "b"), samples=False)  # a restart that had recorded the budget
    assert b["losses"] == a["losses"]
    again = train(cfg, workdir=str(tmp_path / "a"), samples=False)
    assert again["losses"] == {} and again["steps"] == 5
    assert "steps: 5" in (tmp_path / "a" / "config.yaml").read_text()  # a restart keeps the fixed length


def test_a_budget_needs_a_warmup_it_can_time_inside(tmp_path):
    with pytest.raises(Exception, match="warmup_steps >= 3"):
        train(tiny_config(*BASE, "optim.warmup_steps=1"), workdir=str(tmp_path), samples=False)
    with pytest.raises(ConfigError, match="time_budget_s must be >= 0"):
        tiny_config("train.time_budget_s=-1")


def test_a_wsd_schedule_fixes_its_length_late_and_decays_where_the_budget_ends(tmp_path):
    """optim.schedule=wsd: flat until its decay, so the pace is measured over the first ~35% of the
    budget; the recorded length's schedule is the one every step ran with."""
    cfg = tiny_config(*BASE, "optim.schedule=wsd", "optim.warmup_steps=3", "train.time_budget_s=0.001",
                      "train.steps=400")
    a = train(cfg, workdir=str(tmp_path / "a"), samples=False)
    n = json.loads((tmp_path / "a" / "budget.json").read_text())["steps"]
    assert a["steps"] == n and n < 400 and list(a["losses"]) == list(range(1, n + 1))
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    implied = schedule(tiny_config(*BASE, "optim.schedule=wsd", "optim.warmup_steps=3",
                                   f"optim.schedule_steps={n}").optim, n)
    assert lrs == pytest.approx({k: float(implied(k - 1)) for k in range(1, n + 1)}, rel=1e-6)


def test_due_waits_for_the_late_fraction_or_the_decay_and_fit_counts_evaluations_and_saves():
    from codegen_jax.train import budget

    cfg = tiny_config("optim.schedule=wsd", "optim.warmup_steps=10", "train.steps=1000", "train.time_budget_s=100",
                      "train.eval_every=100")
    assert not budget.due(cfg, 10, 90.0, 0)  # still in the warmup
    assert not budget.due(cfg, 50, 0.34 * 100, 0) and budget.due(cfg, 50, 0.35 * 100, 0)
    decay_start = 1000 - int((1000 - 10) * cfg.optim.decay_fraction)
    assert budget.due(cfg, decay_start - 1, 0.0, 0)  # the provisional decay must not start unfixed
    # 40 s left at 0.5 s per step plus a 2 s evaluation per 100 steps and one at the end: 38 / 0.52
    assert budget.fit(cfg, 60.0, 0.5, 2.0, 50) == 50 + int(38 // 0.52)
    assert budget.fit(cfg, 99.0, 0.5, 2.0, 50) >= 50  # out of time: never shorter than what ran
    # checkpoint saves between the steps made the run so far 0.6 s per step: that pace counts
    assert budget.fit(cfg, 60.0, 0.5, 2.0, 50, realized_s=0.6) == 50 + int(38 // 0.6)
    assert budget.fit(cfg, 60.0, 0.5, 2.0, 50, realized_s=0.3) == 50 + int(38 // 0.52)
    early = tiny_config("optim.schedule=cosine", "optim.warmup_steps=10", "train.time_budget_s=100")
    assert budget.due(early, 7, 0.0, 7) and not budget.due(early, 8, 99.0, 7)


def test_a_restart_counts_the_budget_spent_and_a_new_request_is_measured_again(tmp_path):
    from codegen_jax.train import budget

    cfg = tiny_config("train.time_budget_s=100", "train.steps=1000")
    budget.record_spent(tmp_path, 42.5)
    assert budget.spent(tmp_path) == 42.5 and budget.recorded(tmp_path, cfg) is None
    budget.record(tmp_path, 77, cfg, step_s=0.5)
    assert budget.recorded(tmp_path, cfg)["steps"] == 77 and budget.spent(tmp_path) == 0.0
    assert budget.spent(tmp_path / "new") == 0.0
    # asked for more steps (training on) or another budget: measured again, not held to the old length
    assert budget.recorded(tmp_path, tiny_config("train.time_budget_s=100", "train.steps=2000")) is None
    assert budget.recorded(tmp_path, tiny_config("train.time_budget_s=200", "train.steps=1000")) is None
