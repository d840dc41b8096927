"""Checkpoints written by earlier code still load: `tests/fixtures/run_v1` is a 2-step tiny run saved
by codegen-jax before the decoder / sampler redesign (commit e4780d4, Python 3.11's stdlib as data).
Its greedy tokens and the loss of one more training step were recorded by that code; today's code must
reproduce both."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def test_generate_from_a_checkpoint_made_before_the_redesign():
    from codegen_jax.sample import Generator

    gen = Generator.from_checkpoint(FIXTURE)
    assert gen.step == 2
    outs = gen.generate(EXPECTED["prompts"], max_new_tokens=10, stop=[])
    assert [o[0].tokens for o in outs] == EXPECTED["greedy_tokens"]


def test_resume_training_from_a_checkpoint_made_before_the_redesign(tmp_path):
    from codegen_jax.train.loop import train

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    result = train(tiny_config(*EXPECTED["overrides"], "train.steps=3"), workdir=str(run), samples=False)
    assert list(result["losses"]) == [3]
    assert result["losses"][3] == pytest.approx(EXPECTED["step3_loss"], rel=1e-6)
