"""Instruction-pair mining on real stdlib files and on edge cases."""

from __future__ import annotations

import ast
import collections
import inspect
import json.decoder
import textwrap
from pathlib import Path

from codegen_jax.data import pairs


def _pairs_of(module):
    return {p.instruction.split("\n", 1)[0]: p for p in pairs.mine_pairs(Path(module.__file__).read_text())}


def test_textwrap_dedent_docstring_becomes_its_code():
    found = _pairs_of(textwrap)
    pair = found["# def dedent(text):"]
    assert "# Remove any common leading whitespace from every line in `text`." in pair.instruction
    assert all(line.startswith("#") for line in pair.instruction.splitlines())
    # The target is the function itself, docstring removed.
    assert pair.code.startswith("def dedent(text):\n")
    assert "margin = None" in pair.code and "return text" in pair.code
    assert "Remove any common leading" not in pair.code
    source = inspect.getsource(textwrap.dedent)
    code_lines = [line for line in pair.code.splitlines() if line.strip()]
    assert all(line in source for line in code_lines)
    assert ast.parse(pair.code).body[0].name == "dedent"


def test_methods_are_dedented_and_parse():
    found = _pairs_of(textwrap)
    wrap = found["# def wrap(self, text):"]
    assert wrap.code.startswith("def wrap(self, text):\n    chunks = self._split_chunks(text)")
    for p in found.values():
        tree = ast.parse(p.code)
        assert isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(tree.body[0]) is None  # docstring moved to the instruction


def test_signature_includes_defaults_and_return_annotation():
    found = _pairs_of(json.decoder)
    assert "# def raw_decode(self, s, idx=0):" in found


def test_skips_are_counted():
    src = '''
def no_doc(x):
    return x

def stub(x):
    """A stub without a body to learn from."""
    raise NotImplementedError

def one_liner(x): "Docstring on the def line: cannot be cut out."; return x

async def fetch(url, *, timeout: float = 1.0) -> bytes:
    """Fetch a URL and return the body."""
    return await get(url, timeout)

class C:
    @property
    def name(self):
        """The name of this object."""
        return self._name
'''
    counts = collections.Counter()
    found = pairs.mine_pairs(src, "m.py", counts)
    assert [p.instruction.split("\n")[0] for p in found] == [
        "# async def fetch(url, *, timeout: float=1.0) -> bytes:", "# def name(self):"]
    assert found[1].code == "@property\ndef name(self):\n    return self._name\n"
    assert counts["functions"] == 5 and counts["no_docstring"] == 1 and counts["trivial_body"] == 1
    assert counts["unextractable"] == 1 and counts["pairs"] == 2
    assert pairs.mine_pairs('def broken(:\n    """Doc."""\n', "b.py", counts) == [] and counts["syntax_error"] == 1
    assert pairs.mine_pairs("x = 1\n", "c.py", counts) == [] and counts["no_docstring_file"] == 1


def test_as_comment_marks_blank_lines():
    assert pairs.as_comment("a\n\nb") == "# a\n#\n# b\n"


def test_mine_corpus_only_reads_python_documents():
    from codegen_jax.data.clean import Document

    src = Path(textwrap.__file__).read_text()
    docs = [Document(src, "textwrap.py", "python", "files"), Document(src, "x.js", "javascript", "files"),
            Document("x", "p", "python", "datasets", prompt="# q\n")]
    counts = collections.Counter()
    mined = pairs.mine_corpus(docs, counts)
    assert counts["files"] == 1 and len(mined) == counts["pairs"] > 5
    assert {p.path for p in mined} == {"textwrap.py"}
