"""Every `from codegen_jax... import name` in the package, the benchmarks and the tests names something
that exists. The benchmarks run outside the suite, so a name moved between modules (as
`flops_per_token` once was) would otherwise break them unnoticed."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted([*ROOT.glob("codegen_jax/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")])


def _missing(path: Path) -> list[str]:
    """'module.name' for each imported codegen_jax name that is neither an attribute nor a submodule."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.split(".")[0] == "codegen_jax"):
            continue
        module = importlib.import_module(node.module)
        for alias in node.names:
            if hasattr(module, alias.name):
                continue
            try:
                importlib.import_module(f"{node.module}.{alias.name}")
            except ModuleNotFoundError:
                out.append(f"{node.module}.{alias.name} (line {node.lineno})")
    return out


def test_codegen_jax_imports_resolve():
    assert [f"{p.relative_to(ROOT)}: {m}" for p in FILES for m in _missing(p)] == []


def test_the_check_sees_a_missing_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from codegen_jax.model import create_model, flops_per_token\n")
    assert _missing(bad) == ["codegen_jax.model.flops_per_token (line 1)"]
