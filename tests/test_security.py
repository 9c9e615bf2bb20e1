"""Security of output: user data never drives the terminal, the file system or the HTML report.

A label, column name, model name or path is data: on a terminal it is printed as it is (no rich
markup, no emoji codes) with control characters made visible; it never becomes a file name; the
report escapes it; log files are created fresh (never through a planted link); `probe compare`
writes nothing outside its output. Rerun alone: `python -m pytest -q tests/test_security.py`.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mubench_probe import api, cli, engines, launch
from mubench_probe.cli import app

from .conftest import TINY, make_store

MARKUP = "[red]evil[/red]"
ESCAPES = "esc\x1b[2J\x1b]0;pwned\x07\x9b31m\x7f\u202eend"  # ESC CSI, OSC title, BEL, C1 CSI, DEL, bidi override
EMOJI = "ok:warning:"
MATH = "$\\frac{$"  # mathtext that does not parse: a figure must still be drawn
LABELS = (MARKUP, ESCAPES, EMOJI, MATH)
COLUMN = "<b onclick=alert(1)>stain</b>/type"  # a legal CSV column name: HTML and a slash
MODELS = ("synth:<i onclick=x>a[bold]", "synth:b\x1b[31mred")
CONTROLS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # all but \n


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _no_controls(text: str) -> None:
    """Nothing in `text` can move the cursor, retitle the window or reorder what is shown."""
    found = sorted({repr(c) for c in CONTROLS.findall(text)})
    assert not found, f"control characters reached the terminal: {found}\n{text}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """A store of two models whose names, labels and a metadata column are hostile; evaluated."""
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    labels = [LABELS[i % len(LABELS)] for i in range(64)]
    for model in MODELS:
        x = rng.normal(size=(64, 8)).astype("float32") + 3 * np.eye(8)[[i % 4 for i in range(64)]]
        make_store(root / "s.zarr", x, labels, None, meta_extra={COLUMN: ["a", "b"] * 32}, model=model)
    cfg = api.EvalConfig(n_boot=20, shots=(1,), fewshot_seeds=1, heads=("proto",))
    api.evaluate(root / "s.zarr", cfg, results_dir=root / "res")
    for model in ("plain:a", "plain:b"):  # the same, benignly named
        make_store(root / "plain.zarr", rng.normal(size=(64, 8)).astype("float32"), ["x", "y"] * 32, None, model=model)
    api.evaluate(root / "plain.zarr", cfg, results_dir=root / "plain-res")
    return {"store": root / "s.zarr", "results": root / "res", "plain": root / "plain-res"}


# ---- terminal ------------------------------------------------------------------------------------


def test_search_prints_labels_verbatim_with_controls_made_visible(hostile):
    r = _run("search", hostile["store"], "--model", MODELS[0], "--row", "0", "-k", "64")
    assert r.exit_code == 0, r.output
    _no_controls(r.output)
    assert MARKUP in r.output, "rich markup in a label was interpreted"
    assert EMOJI in r.output, "an emoji code in a label was replaced"
    assert "esc\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\x7f\\u202eend" in r.output, r.output
    assert "<i onclick=x>a[bold]" in r.output, "the title (query with the model name) lost its brackets"


def test_info_status_compare_print_names_verbatim(hostile):
    for args in (("info", hostile["store"]), ("status", hostile["store"]), ("compare", hostile["results"])):
        r = _run(*args)
        assert r.exit_code == 0, (args, r.output)
        _no_controls(r.output)
        assert "a[bold]" in r.output and "b\\x1b[31mred" in r.output, (args, r.output)


def test_errors_print_user_text_verbatim_on_one_line(tmp_path):
    r = _run("info", f"/no/such/{MARKUP}\x1b[2J\nstore")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    _no_controls(r.output)
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert f"/no/such/{MARKUP}\\x1b[2J\\nstore" in r.output, r.output
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = _run("extract", "--dataset", "sample", "--model", TINY, "--limit", "4", "--store", blocker / f"{MARKUP}\x1b")
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output, r.output
    _no_controls(r.output)
    assert MARKUP in r.output, r.output


def test_notes_and_progress_lines_are_escaped(capsys):
    cli.notify(f"[shard 0/2] {MARKUP} {ESCAPES}")
    cli.notify("C:\\data\\")  # a trailing backslash is shown once
    with cli.LineProgress(every=0.0) as bar:
        t = bar.add_task(f"{MARKUP}\x1b[2J", total=4)
        bar.advance(t, 2)
    column = cli.DescriptionColumn()

    class Task:
        description = f"{MARKUP}\x1b[2J"

    text = capsys.readouterr().err + column.render(Task()).plain
    _no_controls(text)
    assert f"note: [shard 0/2] {MARKUP} esc\\x1b[2J" in text and f"{MARKUP}\\x1b[2J: 2/4" in text, text
    assert text.endswith(f"{MARKUP}\\x1b[2J"), text
    assert "note: C:\\data\\\n" in text, text


def test_every_terminal_print_goes_through_the_escaping_helpers():
    """Every module of the cli package prints only through `_say` (text), `_print_wide` (SafeTable)
    and `_data` (CSV, JSON), all three defined in cli/common.py alone: nowhere else can user data
    reach rich's markup parser or the terminal unescaped."""
    helpers = {"_say": ".print", "_print_wide": ".print", "_data": "echo", "SafeTable": "Table"}
    modules = sorted(Path(cli.__file__).parent.glob("*.py"))
    assert len(modules) >= 8, modules  # the package's modules were all found (not just __init__.py)
    offenders = []
    for path in modules:
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.ClassDef):
                continue
            exempt = helpers.get(fn.name) if path.name == "common.py" else None
            where = f"{path.name} line {fn.lineno}: {fn.name}"
            if fn.name in helpers and path.name != "common.py":
                offenders.append(f"{where} redefines an escaping helper (it lives in common.py)")
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute | ast.Name):
                    continue
                callee = node.func
                line = f"{path.name} line {node.lineno}"
                if isinstance(callee, ast.Attribute) and callee.attr == "print" and exempt != ".print":
                    offenders.append(f"{line}: .print in {fn.name}")
                if isinstance(callee, ast.Name) and callee.id == "print":
                    offenders.append(f"{line}: builtin print in {fn.name} (use _say)")
                if isinstance(callee, ast.Name) and callee.id == "Table" and exempt != "Table":
                    offenders.append(f"{line}: rich Table in {fn.name} (use SafeTable)")
                if isinstance(callee, ast.Attribute) and callee.attr == "echo" and exempt != "echo":
                    offenders.append(f"{line}: echo in {fn.name} (use _data)")
    assert not offenders, offenders


def test_csv_and_json_keep_values_exact(hostile, monkeypatch):
    """--format csv|json are data for programs: every value as stored, controls included, when
    written to a pipe or file; on a terminal, where a person reads it, controls are made visible."""
    csv = ("search", hostile["store"], "--model", MODELS[0], "--row", "0", "-k", "64", "--format", "csv")
    r = _run(*csv)
    assert r.exit_code == 0, r.output
    assert set(pd.read_csv(io.StringIO(r.output))["label_name"]) == set(LABELS), "a value was altered"
    monkeypatch.setattr(cli.common, "out", Console(force_terminal=True, emoji=False))
    r = _run(*csv)
    assert r.exit_code == 0, r.output
    _no_controls(r.output)
    assert "esc\\x1b[2J\\x1b]0;pwned" in r.output and MARKUP in r.output, r.output
    monkeypatch.undo()
    r = _run("search", hostile["store"], "--model", MODELS[0], "--row", "0", "-k", "64", "--format", "json")
    assert r.exit_code == 0 and "\x1b" not in r.output, "JSON escapes control characters itself"
    payload = json.loads(r.output)
    assert {h["label_name"] for h in payload["hits"]} == set(LABELS) and payload["query"]["model"] == MODELS[0]


# ---- report --------------------------------------------------------------------------------------


def test_compare_figure_names_are_derived_and_the_report_is_escaped(hostile, tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.write_text("precious")
    (out / "report_figures").mkdir(parents=True)
    (out / "report_figures" / "cka.png").symlink_to(victim)  # links planted where figures go
    (out / "report.html").symlink_to(victim)
    r = _run(
        "compare", hostile["results"], "--report", out / "report.html", "--color-by", COLUMN, "--color-by", "label_name"
    )
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert victim.read_text() == "precious", "the report wrote through a planted link"
    files = sorted(p.relative_to(tmp_path).as_posix() for p in out.rglob("*") if p.is_file())
    assert (
        "out/report.html" in files
        and "out/report_figures/cka.png" in files
        and all(re.fullmatch(r"out/(report\.html|report_figures/\w+\.png)", f) for f in files)
    ), files
    maps = [f for f in files if "/map_" in f]
    assert len(maps) == 4, files  # 2 models x 2 columns, named by index
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(files) - 1
    assert "&lt;b onclick=alert(1)&gt;stain&lt;/b&gt;/type" in page
    for raw in ("<b onclick", "<i onclick", "\x1b"):
        assert raw not in page, f"unescaped {raw!r} in the report"


@pytest.mark.slow
def test_compare_writes_nothing_outside_its_output(hostile, tmp_path):
    """HOME, TMPDIR and the working folder stay empty: matplotlib's config and font cache live in
    a temporary folder of the process, removed when it ends."""
    home, tmp, cwd, out = (tmp_path / d for d in ("home", "tmp", "cwd", "out"))
    for d in (home, tmp, cwd):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MPL"))}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    before = sorted(p.as_posix() for p in hostile["plain"].rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "mubench_probe.cli", "compare", hostile["plain"], "--report", out / "r.html"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert [*home.rglob("*")] == [] and [*tmp.rglob("*")] == [] and [*cwd.rglob("*")] == [], (
        [*home.rglob("*")],
        [*tmp.rglob("*")],
        [*cwd.rglob("*")],
    )
    assert sorted(p.name for p in out.iterdir()) == ["r.html", "r_figures"]
    assert sorted(p.as_posix() for p in hostile["plain"].rglob("*")) == before


# ---- launcher log folder -------------------------------------------------------------------------


class FakeShard:
    """Stands in for `python -m mubench_probe.engines JOBFILE`: reads the job file like the child."""

    seen: ClassVar[list[Path]] = []

    def __init__(self, argv, **_):
        jobfile = Path(argv[-1])
        assert not jobfile.is_symlink() and jobfile.stat().st_nlink == 1
        assert (jobfile.stat().st_mode & 0o077) == 0, "job files are private to their user"
        job = pickle.loads(jobfile.read_bytes())
        FakeShard.seen.append(jobfile)
        self.pid, self.returncode = 1000 + job.shard[0], 0
        self.stdout = io.StringIO(engines.RESULT + json.dumps([{"shard": list(job.shard)}]) + "\n")

    def wait(self):
        return 0


def test_local_launcher_never_writes_through_a_planted_link(tmp_path, monkeypatch):
    logs, victim = tmp_path / "logs", tmp_path / "victim.txt"
    logs.mkdir()
    victim.write_text("precious")
    for i in range(2):
        (logs / f"shard-{i}-of-2.pkl").symlink_to(victim)
    (logs / "shard-0-of-2.pkl.tmp").write_text("a file left by a killed run")
    monkeypatch.setattr(engines.subprocess, "Popen", FakeShard)
    FakeShard.seen = []
    jobs = launch.shard_jobs([TINY], "sample", tmp_path / "s.zarr", api.ExtractConfig(), 2)
    done = launch.launch_extract(jobs, "local", log_dir=logs)
    assert done.results == [[{"shard": [0, 2]}], [{"shard": [1, 2]}]]
    assert victim.read_text() == "precious", "a planted link's target was overwritten"
    assert all((logs / f"shard-{i}-of-2.pkl").is_symlink() for i in range(2)), "planted links are left alone"
    assert len(FakeShard.seen) == 2 and not any(p.exists() for p in FakeShard.seen), "job files are removed"
    assert sorted(p.name for p in logs.iterdir()) == ["shard-0-of-2.pkl", "shard-0-of-2.pkl.tmp", "shard-1-of-2.pkl"]


def test_compare_table_without_confidence_intervals(hostile, tmp_path):
    """Results evaluated with `--bootstrap 0` have no CIs: the table shows values, no traceback."""
    cfg = api.EvalConfig(n_boot=0, shots=(1,), fewshot_seeds=1, heads=("proto",))
    api.evaluate(hostile["store"], cfg, results_dir=tmp_path / "res")
    r = _run("compare", tmp_path / "res")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "accuracy (value [95% CI])" in r.output
