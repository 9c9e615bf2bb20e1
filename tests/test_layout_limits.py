"""The renovation's limits, kept: no module over 600 lines, no CLI function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mubench_probe"
MAX_MODULE_LINES = 600
MAX_CLI_FUNCTION_LINES = 80


def test_no_module_is_over_600_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_cli_function_is_over_80_lines():
    long = {}
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_CLI_FUNCTION_LINES:
                    long[f"{path.name}:{node.name}"] = n
    assert long == {}
