"""The head registry: both halves agree, and nothing else chooses heads by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mubench_probe.config import HEADS, EvalConfig
from mubench_probe.head_specs import HEAD_SPECS, PROBE_HEADS, HeadSpec, heads_of
from mubench_probe.protocol import CAPTION_RUNNERS, RUNNERS
from mubench_probe.protocol.heads import runs

PACKAGE = Path(__file__).resolve().parents[1] / "mubench_probe"


def test_every_declared_head_has_exactly_one_runner():
    assert set(HEADS) == set(HEAD_SPECS)
    assert set(RUNNERS) == {s.name for s in heads_of("task")}
    assert set(CAPTION_RUNNERS) == {s.name for s in heads_of("captions")}
    assert PROBE_HEADS == {"lp", "knn", "proto", "fewshot"}


def test_a_runner_for_an_undeclared_head_is_refused():
    with pytest.raises(ValueError, match="not a task head"):
        runs("no_such_head")
    with pytest.raises(ValueError, match="not a task head"):
        runs("zs_caption")  # declared, but a caption head: it has no per-task runner
    with pytest.raises(ValueError, match="scope"):
        HeadSpec("x", "pixels", "x", ())


def test_task_heads_run_in_the_order_alignment_needs():
    order = [s.name for s in heads_of("task")]
    # zero-shot before the probes (alignment compares them), confounder heads before the folds check
    assert order.index("zs_prompt") < order.index("lp")
    assert max(order.index("batch"), order.index("map")) < min(order.index(h) for h in PROBE_HEADS)


def test_head_choice_is_validated_against_the_registry():
    assert EvalConfig(heads=("lp", "zs_caption")).heads == ("lp", "zs_caption")
    with pytest.raises(Exception, match="unknown head"):
        EvalConfig(heads=("lp", "svm"))


def _membership_tests_on_head_names(tree: ast.AST) -> list[int]:
    """Lines of `"lp" in cfg.heads` or `{"lp", ...} & set(cfg.heads)`: a head chosen by its name literal."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant):
            chooses = node.left.value in HEAD_SPECS and any(isinstance(op, ast.In | ast.NotIn) for op in node.ops)
            if chooses and any("heads" in ast.unparse(c) for c in node.comparators):
                found.append(node.lineno)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd):
            sides = (node.left, node.right)
            literal = any(isinstance(n, ast.Set) and any(isinstance(e, ast.Constant) for e in n.elts) for n in sides)
            if literal and any("heads" in ast.unparse(n) for n in sides):
                found.append(node.lineno)
    return found


def test_no_module_chooses_heads_by_name_literals():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _membership_tests_on_head_names(ast.parse(path.read_text(), str(path)))
        if lines:
            offenders[str(path.relative_to(PACKAGE))] = lines
    assert offenders == {}
