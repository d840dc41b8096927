"""Sources: source trees, data files through `datasets`, the stdlib corpus, and the hash split."""

from __future__ import annotations

import json
import os

import pytest

from codegen_jax.config import DataConfig
from codegen_jax.data import sources
from codegen_jax.data.corpus import load_corpus
from codegen_jax.errors import UserError


def test_tree_filters_by_extension_with_metadata(code_corpus):
    recs = list(sources.read_files([str(code_corpus)], (".py",)))
    paths = [r.path for r in recs]
    assert len(recs) == 24 and all(p.endswith(".py") for p in paths)
    top = sorted(p.name for p in code_corpus.glob("*.py"))
    nested = sorted(p.name for p in (code_corpus / "pkg").glob("*.py"))
    assert paths == [f"corpus/{n}" for n in top] + [f"corpus/pkg/{n}" for n in nested]  # walk order, sorted
    assert {r.language for r in recs} == {"python"} and {r.source for r in recs} == {"files"}
    assert "corpus/pkg/mod_0.py" in paths and isinstance(recs[0].content, bytes)


def test_languages_and_extensions_resolve():
    assert sources.resolve_extensions(["python", "md"]) == (".py", ".pyi", ".md")
    assert sources.language_of("a/b.rs") == "rust" and sources.language_of("x.unknownext") == "unknown"
    with pytest.raises(UserError):
        sources.resolve_extensions([])


def test_tree_order_is_deterministic_and_language_filter_works(code_corpus):
    a = [r.path for r in sources.read_files([str(code_corpus)], sources.resolve_extensions(["markdown"]))]
    b = [r.path for r in sources.read_files([str(code_corpus)], sources.resolve_extensions(["markdown"]))]
    assert a == b == ["corpus/README.md"]


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        list(sources.read_files([str(tmp_path / "nope")], (".py",)))
    with pytest.raises(UserError, match="empty"):
        list(sources.read_files([], (".py",)))


def test_unreadable_file_is_a_counted_skip(tmp_path):
    (tmp_path / "ok.py").write_text("x = 1\n")
    os.symlink(tmp_path / "missing_target.py", tmp_path / "broken.py")
    skipped: dict[str, list[str]] = {}
    recs = list(sources.read_tree(tmp_path, (".py",), skipped=skipped))
    assert [r.path for r in recs] == ["ok.py"] and skipped == {"unreadable": ["broken.py"]}


def test_stdlib_corpus_is_the_running_interpreters_library():
    recs = list(sources.read_stdlib())
    paths = {r.path for r in recs}
    assert len(recs) > 500 and "textwrap.py" in paths and "json/decoder.py" in paths
    assert not any("site-packages" in p for p in paths)
    assert sum(len(r.content) for r in recs) > 5_000_000


def test_split_is_a_stable_hash_split():
    keys = [f"pkg/mod_{i}.py" for i in range(4000)]
    splits = [sources.split_of(k, 0.1) for k in keys]
    assert splits == [sources.split_of(k, 0.1) for k in reversed(keys)][::-1]
    share = splits.count("validation") / len(keys)
    assert 0.08 < share < 0.12
    assert all(sources.split_of(k, 0.0) == "train" for k in keys[:100])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_text_rows_and_missing_field_skip(tmp_path):
    f = tmp_path / "code.jsonl"
    _write_jsonl(f, [{"text": "a = 1\n", "language": "python"}, {"other": 3}, {"text": "b = 2\n"}])
    skipped: dict[str, list[str]] = {}
    recs = list(sources.read_datasets([str(f)], sources.Fields(), skipped))
    assert [r.content for r in recs] == ["a = 1\n", "b = 2\n"]
    assert recs[0].language == "python" and recs[0].source == "datasets"
    assert skipped == {"missing_field": [f"{f}:2"]}


def test_prompt_completion_fields_are_configurable(tmp_path):
    f = tmp_path / "pairs.jsonl"
    _write_jsonl(f, [{"q": "# add\n", "a": "def add(a, b):\n    return a + b\n"}])
    recs = list(sources.read_datasets([str(f)], sources.Fields(text="t", prompt="q", completion="a")))
    assert recs[0].prompt == "# add\n" and recs[0].content.startswith("def add")


def test_no_configured_field_is_a_user_error_naming_fields(tmp_path):
    f = tmp_path / "bad.jsonl"
    _write_jsonl(f, [{"body": "x"}])
    with pytest.raises(UserError, match="no 'text' field.*body"):
        list(sources.read_datasets([str(f)], sources.Fields()))


def test_malformed_jsonl_is_a_user_error(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(UserError, match="broken.jsonl"):
        list(sources.read_datasets([str(f)], sources.Fields()))


def test_parquet_arrow_and_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["p = 1\n", "q = 2\n"]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved", arrow):
        recs = list(sources.read_datasets([str(path)], sources.Fields()))
        assert [r.content for r in recs] == ["p = 1\n", "q = 2\n"], path


def test_corpus_split_partitions_documents_and_is_cached(code_corpus):
    cfg = DataConfig(source="files", paths=[str(code_corpus)], val_fraction=0.2)
    corpus = load_corpus(cfg)
    train, val = corpus.split("train"), corpus.split("validation")
    assert len(train) + len(val) == 24 and val and train
    assert not {d.path for d in train} & {d.path for d in val}
    assert load_corpus(DataConfig(source="files", paths=[str(code_corpus)], val_fraction=0.2)) is corpus
    assert all(d.language == "python" and d.path.startswith("corpus/") for d in train)


def test_tiny_corpus_still_gets_a_validation_document(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}.py").write_text(f"value_{i} = {i}\n")
    corpus = load_corpus(DataConfig(source="files", paths=[str(tmp_path)], val_fraction=0.01))
    assert len(corpus.split("validation")) == 1 and len(corpus.split("train")) == 2
