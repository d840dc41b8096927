"""Programming languages of documents: names, and detection from file name, extension and shebang.

`LANGUAGES` is the one table (name -> extensions, exact file names, shebang interpreters); it is a
superset of `sources.LANGUAGES` under the same names. `detect` picks, in order: an exact file name
(`Makefile`, `Dockerfile`, ...), the extension, then the `#!` line; a row that states its language
(a `language`/`lang` column, e.g. The Stack's "C++") keeps it when the name or an alias is known.
`data.languages` filters documents; `data.language_weights` ("name:weight") resamples them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import re

from codegen_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Language:
    extensions: tuple[str, ...] = ()
    filenames: tuple[str, ...] = ()
    interpreters: tuple[str, ...] = ()  # shebang program names


LANGUAGES: dict[str, Language] = {
    "python": Language((".py", ".pyi", ".pyw"), ("SConstruct", "SConscript"), ("python", "python2", "python3")),
    "javascript": Language((".js", ".mjs", ".cjs", ".jsx"), (), ("node", "nodejs")),
    "typescript": Language((".ts", ".tsx", ".mts", ".cts"), (), ("deno", "ts-node", "bun")),
    "java": Language((".java",)),
    "c": Language((".c", ".h")),
    "cpp": Language((".cc", ".cpp", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp")),
    "csharp": Language((".cs", ".csx")),
    "go": Language((".go",)),
    "rust": Language((".rs",)),
    "ruby": Language((".rb", ".rake", ".gemspec"), ("Rakefile", "Gemfile", "Guardfile", "Vagrantfile"), ("ruby",)),
    "php": Language((".php", ".phtml"), (), ("php",)),
    "kotlin": Language((".kt", ".kts")),
    "swift": Language((".swift",)),
    "scala": Language((".scala", ".sc"), (), ("scala",)),
    "shell": Language((".sh", ".bash", ".zsh", ".ksh"), (".bashrc", ".zshrc", ".profile", ".bash_profile"),
                      ("sh", "bash", "zsh", "ksh", "dash")),
    "powershell": Language((".ps1", ".psm1", ".psd1"), (), ("pwsh",)),
    "sql": Language((".sql",)),
    "html": Language((".html", ".htm", ".xhtml")),
    "css": Language((".css", ".scss", ".sass", ".less")),
    "markdown": Language((".md", ".markdown", ".mdx")),
    "yaml": Language((".yaml", ".yml")),
    "json": Language((".json", ".jsonc", ".json5")),
    "toml": Language((".toml",), ("Cargo.lock", "Pipfile")),
    "xml": Language((".xml", ".xsd", ".xsl", ".svg", ".plist")),
    "lua": Language((".lua",), (), ("lua", "luajit")),
    "r": Language((".r", ".R", ".Rmd"), (), ("Rscript",)),
    "julia": Language((".jl",), (), ("julia",)),
    "haskell": Language((".hs", ".lhs"), (), ("runhaskell", "stack")),
    "ocaml": Language((".ml", ".mli"), (), ("ocaml",)),
    "perl": Language((".pl", ".pm", ".t"), (), ("perl",)),
    "dart": Language((".dart",)),
    "zig": Language((".zig",)),
    "elixir": Language((".ex", ".exs"), (), ("elixir",)),
    "erlang": Language((".erl", ".hrl")),
    "clojure": Language((".clj", ".cljs", ".cljc", ".edn")),
    "fortran": Language((".f", ".f90", ".f95", ".f03", ".for")),
    "objective-c": Language((".m", ".mm")),
    "groovy": Language((".groovy", ".gradle"), ("Jenkinsfile",), ("groovy",)),
    "dockerfile": Language((".dockerfile",), ("Dockerfile", "Containerfile")),
    "makefile": Language((".mk", ".mak"), ("Makefile", "GNUmakefile", "makefile")),
    "cmake": Language((".cmake",), ("CMakeLists.txt",)),
    "vue": Language((".vue",)),
    "text": Language((".txt", ".rst")),
}
# Names other datasets use for the same languages (lower-cased), e.g. The Stack's "C++" and "Shell".
ALIASES = {"c++": "cpp", "c#": "csharp", "cs": "csharp", "js": "javascript", "ts": "typescript",
           "py": "python", "bash": "shell", "sh": "shell", "golang": "go", "rs": "rust", "rb": "ruby",
           "objc": "objective-c", "objective-c++": "objective-c", "yml": "yaml", "md": "markdown",
           "restructuredtext": "text", "plaintext": "text", "docker": "dockerfile", "make": "makefile",
           "tex": "text", "jsx": "javascript", "tsx": "typescript"}
UNKNOWN = "unknown"

_BY_EXT = {e: name for name, lang in LANGUAGES.items() for e in lang.extensions}
_BY_EXT_LOWER = {e.lower(): name for e, name in reversed(list(_BY_EXT.items()))}
_BY_FILENAME = {f: name for name, lang in LANGUAGES.items() for f in lang.filenames}
_BY_INTERPRETER = {i: name for name, lang in LANGUAGES.items() for i in lang.interpreters}
_SHEBANG = re.compile(r"#![ \t]*(\S+)(?:[ \t]+(\S+))?")
_VERSION_SUFFIX = re.compile(r"[\d.]+$")


def canonical(name: str) -> str | None:
    """Our name for a language name or alias (any case), or None when unknown."""
    key = name.strip().lower()
    if key in LANGUAGES:
        return key
    return ALIASES.get(key)


def from_shebang(first_line: str) -> str | None:
    """Language of a `#!` line (`#!/usr/bin/env python3`, `#!/bin/bash -e`), or None."""
    m = _SHEBANG.match(first_line)
    if not m:
        return None
    prog = os.path.basename(m.group(1))
    if prog == "env" and m.group(2):
        prog = m.group(2)
    return _BY_INTERPRETER.get(prog) or _BY_INTERPRETER.get(_VERSION_SUFFIX.sub("", prog))


def detect(path: str, text: str = "", declared: str | None = None) -> str:
    """Language of a document: a known declared name, else file name, extension, then shebang."""
    if declared and (name := canonical(declared)):
        return name
    base = os.path.basename(path)
    if base in _BY_FILENAME:
        return _BY_FILENAME[base]
    ext = os.path.splitext(base)[1]
    if ext:
        found = _BY_EXT.get(ext) or _BY_EXT_LOWER.get(ext.lower())
        if found:
            return found
    if text.startswith("#!"):
        return from_shebang(text.split("\n", 1)[0]) or UNKNOWN
    return UNKNOWN


def check_names(names: list[str], key: str) -> list[str]:
    """Canonical names of `names` (config key `key`); an unknown name fails with the nearest ones."""
    out = []
    for raw in names:
        name = canonical(raw)
        if name is None:
            near = difflib.get_close_matches(raw.lower(), list(LANGUAGES) + list(ALIASES), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(sorted(LANGUAGES))}"
            raise UserError(f"{key}: unknown language '{raw}'{hint}")
        out.append(name)
    return list(dict.fromkeys(out))


def selected_extensions(entries: list[str]) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(extensions, exact file names, whether to sniff shebangs) that `data.extensions` selects.

    Entries are extensions ('.rs', 'rs'), language names ('rust') or 'all' (every language here);
    a language also brings its exact file names (Makefile) and, if it has interpreters, shebang
    detection of extension-less files.
    """
    exts: list[str] = []
    names: list[str] = []
    shebang = False
    for entry in entries:
        e = entry.strip()
        if e.lower() == "all":
            langs = list(LANGUAGES)
        else:
            name = None if e.startswith(".") else canonical(e)
            langs = [name] if name else []
        for lang in langs:
            exts += LANGUAGES[lang].extensions
            names += LANGUAGES[lang].filenames
            shebang |= bool(LANGUAGES[lang].interpreters)
        if not langs and e:
            exts.append(e if e.startswith(".") else "." + e)
    if not exts and not names:
        raise UserError("data.extensions is empty; list extensions like .py, languages like python, or all")
    return tuple(dict.fromkeys(exts)), tuple(dict.fromkeys(names)), shebang


def parse_weights(entries: list[str]) -> dict[str, float]:
    """`data.language_weights` entries ("python:1", "go:2.5") as {language: weight}."""
    out: dict[str, float] = {}
    for entry in entries:
        name, sep, value = entry.rpartition(":")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or weight < 0 or weight != weight:
            raise UserError(f"data.language_weights entry '{entry}' must be language:weight with weight >= 0, "
                            "e.g. python:1 or go:2.5")
        out[check_names([name], "data.language_weights")[0]] = weight
    return out


def copies(weight: float, key: str) -> int:
    """How many times a document is written under `weight`: floor(weight), plus one more for a stable
    hash-chosen `frac(weight)` share of keys (weight 0.5 keeps half the documents, 2.5 writes 2 or 3)."""
    whole = int(weight)
    frac = weight - whole
    if frac <= 0:
        return whole
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8,
                                       person=b"langweight").digest(), "big")
    return whole + (h < frac * 2.0**64)
