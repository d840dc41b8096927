"""Instruction pairs: mine (instruction, code) from Python functions with `ast`.

A function with a docstring becomes one pair: the instruction is its signature and docstring written
as `#` comment lines; the code is the function's source (decorators, `def` line, body) with the
docstring statement removed, dedented when it is a method. Functions whose body is only `pass`, `...`
or `raise NotImplementedError` are skipped, and so are files that do not parse.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import gc
import re
from collections.abc import Iterable

MIN_DOCSTRING_CHARS = 10
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
# A docstring is the first statement after a block header's ':' (past blank and comment lines). Files
# with no such string cannot hold a pair, and skipping their parse saves about a fifth of the stdlib's.
_MAYBE_DOCSTRING = re.compile(r':[ \t]*(?:#[^\n]*)?\n(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]+[rRbBuU]{0,2}["\']')


@dataclasses.dataclass(frozen=True)
class Pair:
    """One training pair: `instruction` (the prompt, not trained on) and `code` (the target)."""

    instruction: str
    code: str
    path: str = ""


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """`def name(args) -> ret:` of a function node (`async def` for coroutines)."""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"


def as_comment(text: str) -> str:
    """Every line prefixed with '# ' (blank lines with '#')."""
    return "\n".join(f"# {line}".rstrip() for line in text.split("\n")) + "\n"


def _is_trivial(body: list[ast.stmt]) -> bool:
    if len(body) != 1:
        return False
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _function_code(node, lines: list[str]) -> str | None:
    """Source of `node` without its docstring, dedented; None when it cannot be cut out cleanly."""
    doc, rest = node.body[0], node.body[1:]
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    # The docstring must sit on lines of its own, or removing it would cut into code.
    if doc.lineno <= _header_end(node) or doc.end_lineno >= rest[0].lineno:
        return None
    kept = lines[start - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    col = node.col_offset
    if col:
        if any(line.strip() and len(line) - len(line.lstrip()) < col for line in kept):
            return None  # a multi-line string dedented below the method: stripping would alter it
        kept = [line[col:] for line in kept]
    code = "\n".join(kept).strip("\n") + "\n"
    return code if code.lstrip().startswith(("def ", "async def ", "@")) else None


def _header_end(node) -> int:
    """Last line of the `def ...:` header (where the signature ends)."""
    ends = [a.end_lineno for a in ast.walk(node.args) if hasattr(a, "end_lineno") and a.end_lineno]
    if node.returns is not None:
        ends.append(node.returns.end_lineno)
    return max(ends + [node.lineno])


def _functions(tree: ast.Module):
    """Module-level functions and methods of (nested) classes; nested functions are left in their parent."""
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, _FUNCS):
            yield node
        elif isinstance(node, ast.ClassDef):
            stack[:0] = node.body


def mine_pairs(text: str, path: str = "", counts: collections.Counter | None = None) -> list[Pair]:
    """All pairs of one Python source file, in source order; `counts` tallies what was skipped."""
    counts = counts if counts is not None else collections.Counter()
    if not _MAYBE_DOCSTRING.search(text):
        counts["no_docstring_file"] += 1
        return []
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        counts["syntax_error"] += 1
        return []
    lines = text.split("\n")
    pairs = []
    for node in _functions(tree):
        counts["functions"] += 1
        docstring = ast.get_docstring(node, clean=True)
        if not docstring or len(docstring.strip()) < MIN_DOCSTRING_CHARS:
            counts["no_docstring"] += 1
            continue
        if len(node.body) < 2 or _is_trivial(node.body[1:]):
            counts["trivial_body"] += 1
            continue
        code = _function_code(node, lines)
        if code is None:
            counts["unextractable"] += 1
            continue
        pairs.append(Pair(as_comment(f"{signature(node)}\n{docstring}"), code, path))
    counts["pairs"] += len(pairs)
    return pairs


def mine_corpus(docs: Iterable, counts: collections.Counter | None = None) -> list[Pair]:
    """Pairs from every Python document (objects with .text, .path, .language and .prompt)."""
    counts = counts if counts is not None else collections.Counter()
    out: list[Pair] = []
    # Thousands of live AST nodes make the cyclic GC rescan the heap over and over; ASTs are acyclic.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for doc in docs:
            if doc.prompt is None and doc.language == "python":
                counts["files"] += 1
                out.extend(mine_pairs(doc.text, doc.path, counts))
    finally:
        if was_enabled:
            gc.enable()
    return out
