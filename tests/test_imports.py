"""Imports go one way: no module of mubench_probe imports, even inside a function, one that imports it back.

A lazy import hides a cycle from Python (it works as long as the first import is the right one)
but not from the design: layers that import each other cannot be read, tested or moved apart.
Every import of every module is parsed (`import x`, `from . import x`, `from ..x import y`, at
module level or in a function); `from pkg import name` counts as importing `pkg.name` when that
is a module. A module's implicit import of its own package's `__init__` is not counted (a
package's `__init__` importing its submodules is not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import mubench_probe

ROOT = Path(mubench_probe.__file__).resolve().parent


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in its code (the closest enclosing module of each name)."""
    me = _name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names += [base, *(f"{base}.{a.name}" for a in node.names)]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != me and not me.startswith(name + "."):
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {_name(f) for f in files}
    return {_name(f): _imported(f, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_cycles_and_only_them():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set(), "f": {"f"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_function_level_imports_are_edges():
    graph = import_graph()
    assert "mubench_probe.heads.scoring" in graph["mubench_probe.heads.knn"]  # from .scoring import ...
    assert "mubench_probe.config" in graph["mubench_probe.heads.knn"]  # from ..config import ...
    assert "mubench_probe.encoders" in graph["mubench_probe.launch"]  # imported inside run_shard
    assert "mubench_probe.api" in graph["mubench_probe"]  # from . import api


def test_imports_go_one_way():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)
