"""`data prepare` end to end on a planted mixed corpus (tests/prepare_corpus.py): counts, redaction, dedup,
decontamination, languages, pairs, re-runs, executors, bad input; and training from the prepared dir."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import grain
import numpy as np
import pytest

from codegen_jax.cli import main
from codegen_jax.config import load_config
from codegen_jax.data import pipeline
from codegen_jax.data.prepare import languages, prepare
from codegen_jax.data.prepare.record import decode_record
from codegen_jax.data.tokenizer import load_tokenizer
from codegen_jax.errors import UserError

from conftest import TINY_OVERRIDES
from prepare_corpus import KEPT, REDACTIONS, SECRETS, write_mixed_corpus

KEEP = ",".join(sorted(set(languages.LANGUAGES) - {"markdown"}))
WEIGHTS = {"go": 3.0, "yaml": 0.0}


class Messages:
    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)

    def start(self, *a, **k): ...
    def update(self, *a, **k): ...
    def close(self): ...


def _overrides(root: Path) -> list[str]:
    return ["data.source=files", f"data.paths=[{root}]", "data.extensions=[all]", f"data.languages=[{KEEP}]",
            "data.language_weights=[go:3,yaml:0]", "model.vocab_size=512", "data.seq_len=256",
            "data.val_fraction=0.2"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_mixed_corpus(tmp_path_factory.mktemp("prepare"))


@pytest.fixture(scope="module")
def prepared(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "out"
    msgs = Messages()
    manifest = prepare(load_config(None, _overrides(planted.root)), out, workers=1, tasks=2, progress=msgs)
    return out, manifest, msgs.lines


def _records(out: Path, split: str | None = None, kind: str | None = None):
    for f in sorted(out.glob("*/*.arrayrecord")):
        if (split is None or f.parent.name == split) and (kind is None or f.name.startswith(kind)):
            src = grain.sources.ArrayRecordDataSource([str(f)])
            for i in range(len(src)):
                yield f.parent.name, f.name.split("-")[0], decode_record(src[i])


def _tree_hashes(root: Path, skip: tuple[str, ...] = ("logs",)) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in skip}


def test_manifest_counts_equal_what_was_planted(prepared, planted):
    out, m, _ = prepared
    assert m["drops"] == planted.drops
    assert {k: v["documents"] for k, v in m["languages"].items()} == planted.languages
    assert all(v["tokens"] > 0 for v in m["languages"].values())
    assert m["redactions"] == REDACTIONS
    assert m["documents"] == {"seen": sum(planted.languages.values()) + sum(planted.drops.values()),
                              "kept": sum(planted.languages.values())}
    assert m["near_dedup"]["clusters"] == 1 and (m["near_dedup"]["bands"], m["near_dedup"]["rows"]) == (14, 9)
    assert m["decontamination"]["contaminated"] == {"humaneval": 1}
    assert json.loads((out / "manifest.json").read_text()) == m
    for split in ("train", "validation"):  # the per-shard counts add up to the split totals and the shards
        s = m["splits"][split]
        assert sum(x["records"] for x in s["shards"] if x["kind"] == "docs") == s["docs"]["records"]
        for x in s["shards"]:
            assert hashlib.sha256((out / x["path"]).read_bytes()).hexdigest() == x["sha256"]


def test_no_secret_survives_dedup_and_decontamination_hold(prepared, planted):
    out, _, _ = prepared
    tok = load_tokenizer(out / "tokenizer")
    texts = [tok.decode(tokens) for _, _, (tokens, _) in _records(out)]
    everything = "\n".join(texts)
    assert not [name for name, value in SECRETS.items() if value in everything]
    assert all(kept in everything for kept in KEPT)  # documentation addresses stay
    assert all(p in everything for p in ("<KEY>", "<PASSWORD>", "<EMAIL>", "<IP_ADDRESS>"))
    docs = [tok.decode(t) for _, kind, (t, _) in _records(out, kind="docs")]
    title = (planted.root / "py/billing.py").read_text().split("\n")[0]  # in all five copies of the module
    assert sum(title in d for d in docs) == 1
    assert "truncate_number" not in everything  # the HumanEval file is gone, and no pair came from it


def test_pairs_in_five_more_languages_with_masked_prompts(prepared):
    out, m, _ = prepared
    tok = load_tokenizer(out / "tokenizer")
    for lang in ("javascript", "typescript", "java", "go", "rust", "python"):
        assert m["pairs"]["mining"][f"{lang}/pairs"] >= 1
    prompts = []
    for _, _, (tokens, mask) in _records(out, kind="pairs"):
        n = int(mask.argmax())
        assert list(tokens[:2]) == [tok.bos_id, tok.inst_id] and tokens[n - 1] == tok.sep_id
        assert not mask[:n].any() and mask[n:].all() and tokens[-1] == tok.eos_id
        prompts.append(tok.decode(tokens[:n]))
    for signature in ("// export function withTax(price, rate)", "// export function greet(", "// public static int gcd(",
                      "// func Area(width, height float64) float64", "// pub fn clamp("):
        assert any(p.startswith(signature) for p in prompts), signature


def test_language_weights_resample_train_documents(prepared):
    out, m, _ = prepared
    tok = load_tokenizer(out / "tokenizer")
    langs = collections.Counter()
    for split, _, (tokens, _) in _records(out, kind="docs"):
        text = tok.decode(tokens)
        lang = "go" if "func Area" in text else "yaml" if "replicas: 3" in text else "other"
        langs[split, lang] += 1
    go_train = 1 - langs["validation", "go"]
    assert langs["train", "go"] == 3 * go_train and langs["train", "yaml"] == 0
    assert m["languages"]["go"]["documents"] == 1  # the manifest counts documents, not copies


def test_rerun_skips_finished_tasks_and_a_fresh_run_is_byte_identical(prepared, planted, tmp_path):
    out, manifest, first = prepared
    assert [line.split(":")[1].split(" of")[0].strip() for line in first] == ["2", "14", "1", "2", "1", "2", "1"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.arrayrecord")}
    msgs = Messages()
    cfg = load_config(None, _overrides(planted.root))
    assert prepare(cfg, out, workers=1, progress=msgs) == manifest  # --tasks comes from DIR
    assert all(" 0 of " in line for line in msgs.lines)  # every task skipped
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.arrayrecord")} == before
    fresh = tmp_path / "fresh"
    prepare(cfg, fresh, workers=2, tasks=2)  # worker processes: the same bytes
    assert _tree_hashes(fresh, skip=("logs", "work")) == _tree_hashes(out, skip=("logs", "work"))
    (fresh / "logs/shards/completions/00001").unlink()  # one unfinished task: only it runs again
    (fresh / "train/docs-00001.arrayrecord").unlink()
    msgs = Messages()
    prepare(cfg, fresh, workers=1, progress=msgs)
    assert [line for line in msgs.lines if " 0 of " not in line] == ["stage shards: 1 of 2 tasks to run"]
    assert _tree_hashes(fresh, skip=("logs", "work")) == _tree_hashes(out, skip=("logs", "work"))


def _train_cfg(out: Path, *extra: str):
    return load_config(None, TINY_OVERRIDES + [
        "model.vocab_size=512", "model.max_seq_len=256", "data.seq_len=256", "train.batch_size=4",
        "data.source=prepared", f"data.paths=[{out}]", "data.pair_ratio=0.3", "train.sample_prompts=[]",
        "train.log_every=1", "checkpoint.async_save=false", *extra])


def test_training_from_prepared_data_resumes_bit_identically(prepared, tmp_path):
    from codegen_jax.train.loop import train

    out = prepared[0]
    ref = train(_train_cfg(out, "train.steps=6", "checkpoint.every=3"), workdir=str(tmp_path / "ref"), samples=False)
    assert sorted(ref["losses"]) == [1, 2, 3, 4, 5, 6] and ref["eval"]["eval_loss"] > 0  # validation shards read
    shutil.copytree(tmp_path / "ref/checkpoints/3", tmp_path / "run/checkpoints/3")  # as if stopped after step 3
    resumed = train(_train_cfg(out, "train.steps=6", "checkpoint.every=3"), workdir=str(tmp_path / "run"),
                    samples=False)
    assert resumed["losses"] == {s: ref["losses"][s] for s in (4, 5, 6)}  # bit-identical floats


def _segments(batches) -> collections.Counter:
    out = collections.Counter()
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                out[tuple(b["tokens"][r][seg == s])] += 1
    return out


def test_two_processes_read_disjoint_rows_that_cover_the_global_batches(prepared):
    out = prepared[0]
    cfg = _train_cfg(out, "data.pair_ratio=0", "data.fim_rate=0")  # FIM's cuts depend on the row's index
    tok = load_tokenizer(out / "tokenizer")
    single = list(pipeline.make_iterator(cfg, tok, num_epochs=1))
    parts = [list(pipeline.make_iterator(cfg, tok, num_epochs=1, process_index=i, process_count=2)) for i in range(2)]
    assert all(b["tokens"].shape == (2, 256) for p in parts for b in p)  # global batch 4 = 2 + 2
    seg0, seg1, whole = _segments(parts[0]), _segments(parts[1]), _segments(single)
    assert seg0 + seg1 == whole  # one epoch: every record once, in one of the two processes
    # rows the processes share hold the same content only where a record is repeated (data.language_weights)
    assert all(whole[k] > 1 for k in set(seg0) & set(seg1)) and len(seg0) > 1 and len(seg1) > 1
    cfg = _train_cfg(out)
    val = list(pipeline.make_iterator(cfg, tok, split="validation", num_epochs=1))
    halves = [list(pipeline.make_iterator(cfg, tok, split="validation", num_epochs=1, process_index=i,
                                          process_count=2)) for i in range(2)]
    assert val and len(halves[0]) == len(halves[1]) == len(val)  # validation: the global stream, sliced
    for whole, a, b in zip(val, *halves):
        for k in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k])


def test_fim_rewrites_prepared_documents_at_token_positions(prepared):
    out = prepared[0]
    tok = load_tokenizer(out / "tokenizer")
    plain = list(pipeline.make_iterator(_train_cfg(out, "data.fim_rate=0"), tok, num_epochs=1))
    fim = list(pipeline.make_iterator(_train_cfg(out, "data.fim_rate=1"), tok, num_epochs=1))
    n_fim = sum(int((b["tokens"] == tok.fim.prefix).sum()) for b in fim)
    assert n_fim > 0 and sum(int((b["tokens"] == tok.fim.prefix).sum()) for b in plain) == 0
    count = lambda batches: sum(int(b["segment_ids"].astype(bool).sum()) for b in batches)  # noqa: E731
    # each FIM document gains exactly its 3 FIM tokens; pairs are left alone
    assert count(fim) - count(plain) == 3 * n_fim
    val = list(pipeline.make_iterator(_train_cfg(out, "data.fim_rate=1"), tok, split="validation", num_epochs=1))
    assert sum(int((b["tokens"] == tok.fim.prefix).sum()) for b in val) == 0


def test_iterator_state_round_trips(prepared):
    out = prepared[0]
    cfg = _train_cfg(out)
    tok = load_tokenizer(out / "tokenizer")
    grain.experimental.assert_equal_output_after_checkpoint(pipeline.make_dataset(cfg, tok, num_epochs=2))


def test_a_checkpoint_of_per_process_rows_needs_the_same_process_count(tmp_path):
    from codegen_jax import checkpoint

    (tmp_path / "process_0-of-2.json").write_text("{}")
    (tmp_path / "process_1-of-2.json").write_text("{}")
    assert checkpoint._read_data_state(tmp_path) == b"{}"  # other sources: any process count
    with pytest.raises(UserError, match="saved by 2 processes.*resume it with 2 processes"):
        checkpoint._read_data_state(tmp_path, per_process=True)


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_exit_2(planted, prepared, tmp_path, capsys, monkeypatch):
    base = ["data", "prepare", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "o")]
    ok = ["data.source=files", f"data.paths=[{planted.root}]"]
    assert "path not found" in _one_error_line(capsys, base + ["data.source=files", "data.paths=[/no/such/dir]"])
    assert "did you mean python" in _one_error_line(capsys, base + ok + ["data.languages=[pyhton]"])
    assert "--executor must be one of local, slurm, ray" in _one_error_line(capsys, base + ok + ["--executor", "k8s"])
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert "chat rows" in _one_error_line(capsys, base + ["data.source=datasets", f"data.paths=[{chats}]"])
    if shutil.which("sbatch") is None:
        assert "sbatch" in _one_error_line(capsys, base + ok + ["--executor", "slurm", "--partition", "cpu"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("ray", "datatrove") else real(n, *a))
    assert "codegen-jax[prepare]" in _one_error_line(capsys, base + ok)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ray" else real(n, *a))
    assert "codegen-jax[ray]" in _one_error_line(capsys, base + ok + ["--executor", "ray"])
    assert not (tmp_path / "o").exists()  # nothing written by any of them
    train = ["train", "--config", "configs/tiny.yaml", "--workdir", str(tmp_path / "w"), "data.source=prepared"]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(prepared[0] / "tokenizer", unfinished / "tokenizer")  # a run that never wrote its manifest
    assert "no manifest.json" in _one_error_line(capsys, train + [f"data.paths=[{unfinished}]", "model.vocab_size=512"])
    from codegen_jax.data.tokenizer import train_tokenizer

    train_tokenizer(["def other(x):\n    return x\n"] * 50, 300, tmp_path / "other_tok")
    err = _one_error_line(capsys, train + [f"data.paths=[{prepared[0]}]", f"data.tokenizer={tmp_path / 'other_tok'}",
                                           "model.vocab_size=512", "data.seq_len=256", "model.max_seq_len=256"])
    assert "prepared with another tokenizer" in err
    err = _one_error_line(capsys, train + [f"data.paths=[{prepared[0]}]", "model.vocab_size=512", "data.seq_len=128"])
    assert "data.seq_len=128 is shorter than the data.seq_len=256" in err


def test_a_failed_run_deletes_nothing(prepared, planted, tmp_path, capsys):
    out = prepared[0]
    before = _tree_hashes(out, skip=())
    err = _one_error_line(capsys, ["data", "prepare", "--config", "configs/tiny.yaml", "--out", str(out),
                                   *_overrides(planted.root), "data.near_dup_threshold=0.8"])
    assert "prepared with other settings" in err and "near_dup_threshold" in err
    assert _tree_hashes(out, skip=()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not empty" in _one_error_line(capsys, ["data", "prepare", "--config", "configs/tiny.yaml", "--out",
                                                   str(other), *_overrides(planted.root)])
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_data_inspect_and_eval_notes_read_the_manifest(prepared, capsys, tmp_path):
    from codegen_jax.data.prepare.report import decontamination_notes

    out = prepared[0]
    assert main(["data", "inspect", "--config", "configs/tiny.yaml", "data.source=prepared", f"data.paths=[{out}]"]) == 0
    report = capsys.readouterr().out
    assert "languages:" in report and "drops: " in report and "near_duplicate 3" in report
    assert any(line.split()[:2] == ["python", "5"] for line in report.splitlines())  # documents per language
    cfg = _train_cfg(out)
    assert decontamination_notes(cfg, None) == []
    other = tmp_path / "problems.jsonl"
    other.write_text(json.dumps({"task_id": "x/0", "prompt": "def f():\n", "canonical_solution": "  pass\n"}) + "\n")
    assert "not decontaminated against" in decontamination_notes(cfg, str(other))[0]
    off = tmp_path / "off"
    shutil.copytree(out, off, ignore=shutil.ignore_patterns("work", "logs"))
    m = json.loads((off / "manifest.json").read_text())
    m["decontamination"]["enabled"] = False
    (off / "manifest.json").write_text(json.dumps(m))
    notes = decontamination_notes(_train_cfg(off), None)
    assert len(notes) == 1 and "decontamination off" in notes[0]


def test_slurm_executor_builds_the_dependent_job_chain(planted, tmp_path, monkeypatch):
    import dill
    from datatrove.executor import slurm as dt_slurm

    from codegen_jax.data.prepare import stages

    scripts = []

    def fake_launch(contents, retriever, *args):
        scripts.append((contents, args))
        return str(len(scripts))

    monkeypatch.setattr(dt_slurm, "launch_slurm_job", fake_launch)
    cfg = load_config(None, _overrides(planted.root))
    out = tmp_path / "slurm"
    info = stages.settings(cfg, 4)
    executors = stages.slurm_executors(stages.plan(cfg, str(out), 4, info), out,
                                       {"partition": "cpu", "time": "01:00:00"})
    executors[-1].run()  # submits every stage, each after the one before
    jobs = [(c, a) for c, a in scripts if "launch_pickled_pipeline" in c]
    assert len(jobs) == len(executors) == 7
    assert all("#SBATCH --partition=cpu" in c for c, _ in jobs) and "#SBATCH --array=0-3" in jobs[0][0]
    assert not any(x.startswith("--dependency") for x in jobs[0][1])
    assert all(any(x.startswith("--dependency=afterok:") for x in a) for _, a in jobs[1:])
    with open(out / "logs/clean/executor.pik", "rb") as f:
        pipeline_steps = [type(s).__name__ for s in dill.load(f).pipeline]
    assert pipeline_steps[:3] == ["ReadSources", "CleanFilter", "LanguageFilter"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:os.fork:RuntimeWarning")  # Ray's, datatrove's
def test_ray_executor_gives_the_local_run_bytes(planted, prepared, tmp_path):
    out = tmp_path / "ray"
    prepare(load_config(None, _overrides(planted.root)), out, executor="ray", workers=2, tasks=2)
    assert _tree_hashes(out, skip=("logs", "work")) == _tree_hashes(prepared[0], skip=("logs", "work"))


def test_training_side_needs_no_prepare_extra(prepared, tmp_path):
    import subprocess
    import sys

    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):  # as if `codegen-jax[prepare]` were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datatrove", "detect_secrets", "tree_sitter_language_pack", "datasketch", "ray"):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
from codegen_jax.cli import main
from codegen_jax.config import load_config
from codegen_jax.data import pipeline
from codegen_jax.data.tokenizer import load_tokenizer
import codegen_jax.checkpoint, codegen_jax.eval.humaneval
cfg = load_config(None, ["data.source=prepared", "data.paths=[{prepared[0]}]", "model.vocab_size=512",
                         "data.seq_len=256", "model.max_seq_len=256", "train.batch_size=2"])
batch = next(pipeline.make_iterator(cfg, load_tokenizer(cfg.data.tokenizer)))
assert batch["tokens"].shape == (2, 256)
sys.exit(main(["data", "prepare", "--config", "configs/tiny.yaml", "--out", "{tmp_path / 'o'}"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["codegen-jax data: error: data prepare needs datatrove, detect_secrets, "
                                                "tree_sitter_language_pack: pip install 'codegen-jax[prepare]'"]
