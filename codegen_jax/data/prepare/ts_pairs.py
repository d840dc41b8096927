"""Doc-comment -> function pairs beyond Python: JavaScript, TypeScript, Java, Go and Rust, with tree-sitter.

The pair format is the Python docstring pairs' (`pairs.Pair`, trained with the same prompt mask):
the instruction is the function's signature and doc comment as `//` comment lines; the code is the
function's source (with its `export`, attributes and annotations, without the doc comment),
dedented when it is a method. Doc comments: `/** ... */` right before the function (JS, TS, Java,
Rust), `///` lines (Rust), consecutive `//` lines (Go); no blank line in between. Functions whose
body is empty, whose doc is shorter than `pairs.MIN_DOCSTRING_CHARS`, and files that do not parse
cleanly are skipped and counted, as for Python. Nested functions stay inside their parent.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import textwrap

from codegen_jax.data import pairs as py_pairs
from codegen_jax.data.pairs import Pair


@dataclasses.dataclass(frozen=True)
class Spec:
    functions: frozenset[str]  # node types that are functions with a `body` field
    containers: frozenset[str]  # node types whose children may hold more functions (classes, impls)
    doc: str  # "block" (/** */), "go" (// lines) or "rust" (/// lines or /** */)
    prefixes: frozenset[str] = frozenset()  # siblings kept with the function (Rust attributes)


_JS_FUNCS = frozenset({"function_declaration", "generator_function_declaration", "method_definition"})
_JS_CONTAINERS = frozenset({"class_declaration", "abstract_class_declaration", "class_body", "class"})
SPECS = {
    "javascript": Spec(_JS_FUNCS, _JS_CONTAINERS, "block"),
    "typescript": Spec(_JS_FUNCS, _JS_CONTAINERS, "block"),
    "java": Spec(frozenset({"method_declaration", "constructor_declaration"}),
                 frozenset({"class_declaration", "class_body", "interface_declaration", "interface_body",
                            "enum_declaration", "enum_body", "enum_body_declarations", "record_declaration"}),
                 "block"),
    "go": Spec(frozenset({"function_declaration", "method_declaration"}), frozenset(), "go"),
    "rust": Spec(frozenset({"function_item"}), frozenset({"impl_item", "trait_item", "mod_item", "declaration_list"}),
                 "rust", frozenset({"attribute_item"})),
}
LANGUAGES = tuple(SPECS)
_COMMENTS = frozenset({"comment", "line_comment", "block_comment"})
_BLOCK_LINE = re.compile(r"^\s*\*? ?")


@functools.lru_cache(maxsize=None)
def _parser(grammar: str):
    from tree_sitter_language_pack import get_parser

    return get_parser(grammar)


def _doc_text(comments: list[str], kind: str) -> str | None:
    """The text of a doc comment (its markers removed), or None when the comments are not one."""
    if len(comments) == 1 and comments[0].startswith("/**") and not comments[0].startswith("/**/"):
        if kind == "go":
            return None
        body = comments[0][3:-2].split("\n")
        lines = [body[0].strip()] + [_BLOCK_LINE.sub("", line, count=1) for line in body[1:]]
        return textwrap.dedent("\n".join(lines)).strip()
    prefix = {"go": "//", "rust": "///"}.get(kind)
    if prefix is None or not all(c.startswith(prefix) and not c.startswith(prefix + "/") for c in comments):
        return None
    lines = [c.rstrip("\n")[len(prefix):] for c in comments]
    return textwrap.dedent("\n".join(line[1:] if line.startswith(" ") else line for line in lines)).strip()


def _adjacent(src: bytes, end: int, start: int) -> bool:
    """Only whitespace with at most one line break between byte offsets `end` and `start`."""
    gap = src[end:start]
    return not gap.strip() and gap.count(b"\n") <= 1


def _leading(anchor, src: bytes, spec: Spec) -> tuple[int, list[str]]:
    """(byte where the code starts: first kept prefix sibling or the anchor, texts of the doc comments)."""
    start, node = anchor.start_byte, anchor.prev_sibling
    while node is not None and node.type in spec.prefixes and _adjacent(src, node.end_byte, start):
        start, node = node.start_byte, node.prev_sibling
    comments, edge = [], start
    while node is not None and node.type in _COMMENTS and _adjacent(src, node.end_byte, edge):
        comments.insert(0, src[node.start_byte:node.end_byte].decode("utf-8", "replace"))
        edge, node = node.start_byte, node.prev_sibling
        if spec.doc == "block" or comments[0].startswith("/*"):
            break  # a block doc comment is a single node
    return start, comments


def _code(src: bytes, start: int, end: int) -> str | None:
    """Source from the line of `start` to `end`, dedented by start's column; None if that would cut code."""
    line_start = src.rfind(b"\n", 0, start) + 1
    col = start - line_start
    text = src[line_start:end].decode("utf-8", "replace")
    lines = text.split("\n")
    if lines[0][:col].strip() or any(line.strip() and len(line) - len(line.lstrip()) < col for line in lines[1:]):
        return None
    return "\n".join(line[col:] for line in lines).rstrip() + "\n"


def _candidates(node, spec: Spec):
    """(anchor, function) for the functions among `node`'s children, recursing into containers."""
    for child in node.named_children:
        if child.type in spec.functions:
            yield child, child
        elif child.type == "export_statement":
            decl = child.child_by_field_name("declaration")
            if decl is not None and decl.type in spec.functions:
                yield child, decl
            elif decl is not None and decl.type in spec.containers:
                yield from _candidates(decl, spec)
        elif child.type in spec.containers:
            yield from _candidates(child, spec)


def _pair(anchor, func, src: bytes, spec: Spec, path: str, counts: collections.Counter) -> Pair | None:
    body = func.child_by_field_name("body")
    if body is None:
        counts["no_body"] += 1
        return None
    start, comments = _leading(anchor, src, spec)
    doc = _doc_text(comments, spec.doc) if comments else None
    if not doc or len(doc) < py_pairs.MIN_DOCSTRING_CHARS:
        counts["no_docstring"] += 1
        return None
    if not any(c.type not in _COMMENTS for c in body.named_children):
        counts["trivial_body"] += 1
        return None
    code = _code(src, start, anchor.end_byte)
    if code is None:
        counts["unextractable"] += 1
        return None
    signature = " ".join(src[anchor.start_byte:body.start_byte].decode("utf-8", "replace").split())
    instruction = "\n".join(f"// {line}".rstrip() for line in f"{signature}\n{doc}".split("\n")) + "\n"
    return Pair(instruction, code, path)


def mine_pairs(text: str, path: str, language: str, counts: collections.Counter | None = None) -> list[Pair]:
    """All doc-comment pairs of one source file in `language` (one of LANGUAGES), in source order."""
    counts = counts if counts is not None else collections.Counter()
    spec = SPECS[language]
    grammar = "tsx" if language == "typescript" and path.endswith(".tsx") else language
    src = text.encode("utf-8", "surrogatepass")
    tree = _parser(grammar).parse(src)
    if tree.root_node.has_error:
        counts["syntax_error"] += 1
        return []
    out = []
    for anchor, func in _candidates(tree.root_node, spec):
        counts["functions"] += 1
        pair = _pair(anchor, func, src, spec, path, counts)
        if pair is not None:
            out.append(pair)
    counts["pairs"] += len(out)
    return out


def mine_document(text: str, path: str, language: str, counts: collections.Counter) -> list[Pair]:
    """Pairs of one document in any language: Python through `pairs.mine_pairs`, the LANGUAGES here
    through tree-sitter, none for the rest."""
    if language == "python":
        return py_pairs.mine_pairs(text, path, counts)
    if language in SPECS:
        return mine_pairs(text, path, language, counts)
    return []
