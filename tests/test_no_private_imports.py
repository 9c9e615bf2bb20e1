"""No test reaches into a private name of `mubench_probe` (issue 20).

Tests go through the public API, so renaming or restructuring a private helper never breaks a
test that still describes the same behaviour; a legitimate extension point (a fault-injection
hook, the guard of zarr internals) gets a public name instead. Caught, by parsing every test
file with `ast`: `from mubench_probe.x import _y`, `import mubench_probe.x._y`,
`mubench_probe.x._y`, `alias._y` where `alias` came from mubench_probe (a module, class or
function), `getattr`/`setattr`/`monkeypatch.setattr(alias, "_y", ...)`, dotted strings such as
`"mubench_probe.x._y"`, and `obj._y` on any object where `_y` is a private name the package
defines (a function, method or attribute), so `run._read(...)` on a `Run` is caught too.
Dunder names (`__version__`) are public.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mubench_probe"
_DOTTED = re.compile(rf"^{PACKAGE}(\.[A-Za-z0-9_]+)*$")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_private_names() -> set[str]:
    """Every private name the package defines: functions, methods, classes, class and instance attributes."""
    names: set[str] = set()
    for path in (ROOT / PACKAGE).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)  # self._x = ...
    return {n for n in names if _private(n)}


def _from_package(module: str | None) -> bool:
    return module is not None and (module == PACKAGE or module.startswith(PACKAGE + "."))


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` as a string, or None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def violations(source: str, defined: set[str]) -> list[str]:
    """Every use of a private mubench_probe name in one test file's source: 'line: what'."""
    tree = ast.parse(source)
    aliases: set[str] = set()  # local names bound to mubench_probe modules or objects
    foreign: set[str] = set()  # local names bound to other libraries' modules (their privates are theirs)
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _from_package(a.name):
                    if any(_private(p) for p in a.name.split(".")):
                        out.append(f"{node.lineno}: import {a.name}")
                    aliases.add(a.asname or a.name.split(".")[0])
                else:
                    foreign.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            package = node.level == 0 and _from_package(node.module)
            for a in node.names:
                if not package:
                    foreign.add(a.asname or a.name)
                    continue
                if _private(a.name) or any(_private(p) for p in (node.module or "").split(".")):
                    out.append(f"{node.lineno}: from {node.module} import {a.name}")
                aliases.add(a.asname or a.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = _dotted(node.value)
            root = owner.split(".")[0] if owner else None
            if root in aliases or (node.attr in defined and root not in foreign):
                out.append(f"{node.lineno}: {owner or '<expression>'}.{node.attr}")
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            func = _dotted(node.func) or ""
            target, name = node.args[0], node.args[1]
            if (
                func.split(".")[-1] in ("getattr", "setattr", "delattr", "hasattr")
                and isinstance(name, ast.Constant)
                and isinstance(name.value, str)
                and _private(name.value)
                and (_dotted(target) or "").split(".")[0] in aliases
            ):
                out.append(f"{node.lineno}: {func}({_dotted(target)}, {name.value!r})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.match(node.value):
            if any(_private(p) for p in node.value.split(".")):
                out.append(f"{node.lineno}: {node.value!r}")
    return sorted(set(out), key=lambda s: int(s.split(":")[0]))


def test_no_test_uses_a_private_name_of_the_package():
    defined = _package_private_names()
    found = [
        f"{path.relative_to(ROOT)}:{v}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for v in violations(path.read_text(encoding="utf-8"), defined)
    ]
    assert not found, "tests use private names of mubench_probe (test the public behaviour):\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from mubench_probe.store.arrays import _on_zarr_loop",
        "from mubench_probe.store.arrays import (\n    texts_digest,\n    _stored_keys as keys,\n)",
        "import mubench_probe.store.arrays\nmubench_probe.store.arrays._delete(g, 'a')",
        "import mubench_probe.store.commit as store_module\nbuild = store_module._build_run",
        "from mubench_probe import cli\ncli._notify('x')",
        "from mubench_probe.store import Run\nRun._read",
        "def f(run):\n    return run._read('image_emb')",
        "from mubench_probe.store import commit\ndef f(mp):\n    mp.setattr(commit, '_build_run', None)",
        "def f(monkeypatch):\n    monkeypatch.setattr('mubench_probe.store.commit._build_run', None)",
        "from mubench_probe import _private_module",
    ],
)
def test_each_kind_of_private_use_is_caught(source):
    assert violations(source, {"_read", "_build_run", "_notify"}), source


@pytest.mark.parametrize(
    "source",
    [
        "from mubench_probe.store.arrays import on_zarr_loop\non_zarr_loop(None)",
        "import mubench_probe\nmubench_probe.__version__",
        "import zarr.storage._local as local\nlocal._atomic_write",
        "from zarr.core.sync import sync",
        "def f(pytest_obj):\n    return pytest_obj._other_library_thing",
        "def f(monkeypatch):\n    monkeypatch.setattr('os.getpid', lambda: 1)",
    ],
)
def test_public_names_and_other_libraries_privates_pass(source):
    assert not violations(source, {"_read", "_build_run", "_notify"}), source
