"""The house rules of docs/design.md, checked: small modules, classes and functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dynattn"
LIMITS = {"module": 700, "class": 450, "function": 80}


def _sizes():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(PACKAGE.parent))
        yield "module", name, len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                yield "class", f"{name}::{node.name}", node.end_lineno - node.lineno + 1
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield "function", f"{name}::{node.name}", node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("kind", LIMITS)
def test_sizes_stay_within_the_house_rules(kind):
    over = [(where, lines) for k, where, lines in _sizes() if k == kind and lines > LIMITS[kind]]
    assert not over, f"over {LIMITS[kind]} lines ({kind}): {over}"


def test_the_model_side_imports_no_plotting_library():
    plotting = {"panel", "holoviews", "bokeh", "hvplot", "matplotlib"}
    for path in PACKAGE.rglob("*.py"):
        if "dashboard" in path.parts or path.stem == "dashboard":  # the view, by design
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad = {n.split(".")[0] for n in names} & plotting
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"
