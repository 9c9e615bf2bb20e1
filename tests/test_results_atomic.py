"""The results folder (`probe evaluate --out`) has one commit point, manifest.json.

Kills at any point of a save, concurrent writers, damaged or deleted files and folders written by
the previous version: the rerun keeps every unit whose results *and* predictions were committed,
recomputes the rest, and ends with results.parquet / predictions.parquet equal to one
uninterrupted run's. A maintainer can rerun this file alone:
`python -m pytest -q tests/test_results_atomic.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.protocol import EvalConfig
from mubench_probe.results import ResultsDir
from mubench_probe.testing import DEFAULT_SOURCES, multi_source_store

CFG = EvalConfig(heads=("proto", "knn"), n_boot=0)
HEADS = ("--head", "proto", "--head", "knn", "--bootstrap", "0")
UNITS = 8  # the multi-source store's tasks, one model
KEY = ["unit", "task", "head", "metric", "stratum", "seed"]
PRED_KEY = ["unit", "task", "head", "row"]


# Its 5 sources and 8 tasks, with a quarter of the rows, in 32 dimensions: these tests are about
# what the results folder keeps, not about scores, so every evaluation here can be cheap.
SOURCES = tuple(replace(s, rows=s.rows // 4) for s in DEFAULT_SOURCES)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return multi_source_store(tmp_path_factory.mktemp("atomic") / "m.zarr", dim=32, sources=SOURCES)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """One uninterrupted run (read-only: copy it to damage it)."""
    out = tmp_path_factory.mktemp("atomic") / "whole"
    assert api.evaluate(store, CFG, results_dir=out).computed == UNITS
    return out


@pytest.fixture
def folder(reference, tmp_path) -> Path:
    dst = tmp_path / "res"
    shutil.copytree(reference, dst)
    return dst


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _evaluate(store: Path, out: Path):
    r = _run("evaluate", store, "--out", out, *HEADS)
    assert r.exit_code == 0 and r.exception is None and "Traceback" not in r.output, r.output
    return r


def _sorted(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    return frame.sort_values(key).reset_index(drop=True)


def _assert_same_as(out: Path, reference: Path) -> None:
    """The user-facing files of `out` hold exactly the reference run's rows, none twice, and every
    unit's predictions."""
    for name, key in (("results.parquet", KEY), ("predictions.parquet", PRED_KEY)):
        got, want = (pd.read_parquet(d / name) for d in (out, reference))
        assert not got.duplicated(key).any(), f"{name}: duplicated rows"
        assert len(got) == len(want), f"{name}: {len(got)} rows, one run has {len(want)}"
        pd.testing.assert_frame_equal(_sorted(got, key), _sorted(want, key), check_dtype=False)
    assert len(pd.read_csv(out / "results.csv")) == len(pd.read_parquet(reference / "results.parquet"))
    preds = pd.read_parquet(out / "predictions.parquet")
    assert set(preds["unit"]) == set(pd.read_parquet(out / "results.parquet")["unit"]), "every unit has predictions"


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _committed_file(out: Path, kind: str) -> Path:
    return out / _manifest(out)["files"][kind]["name"]


def _as_previous_version(folder: Path) -> None:
    """What the previous probe left: results.parquet, results.csv, predictions.parquet, run.json only."""
    (folder / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(folder / "data", ignore_errors=True)
    for p in folder.glob(".*"):
        p.unlink()


# ---- a kill at any point of a save ---------------------------------------------------------------

# A real `probe evaluate` that pauses when it turns the predictions of its second save into Parquet,
# signals it with PROBE_FAULT_MARK and waits to be killed: the previous version had written that
# save's results.parquet by then, not its predictions.parquet (the hostile tester's kill point).
CHILD = textwrap.dedent(
    """
    import os, sys, time
    import pandas as pd

    mark, calls = os.environ["PROBE_FAULT_MARK"], []
    to_parquet = pd.DataFrame.to_parquet

    def paused(self, *args, **kwargs):
        if "y_pred" in self.columns:
            calls.append(1)
            if len(calls) == 2:
                open(mark, "w").close()
                time.sleep(600)
        return to_parquet(self, *args, **kwargs)

    pd.DataFrame.to_parquet = paused
    from mubench_probe.cli import main

    sys.argv = ["probe", *sys.argv[1:]]
    main()
    """
)


def _kill_between_results_and_predictions(tmp_path: Path, args: tuple) -> None:
    mark = tmp_path / "mark"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        env={**os.environ, "PROBE_FAULT_MARK": str(mark)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    while not mark.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"never reached the fault point: {proc.communicate()[0].decode()[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.faults
def test_sigkill_between_results_and_predictions_loses_nothing(store, reference, tmp_path):
    out = tmp_path / "killed"
    _kill_between_results_and_predictions(tmp_path, ("evaluate", store, "--out", out, *HEADS))
    r = _evaluate(store, out)
    assert f"{UNITS - 1} units computed, 1 already in" in r.output, "only the committed unit counts as done"
    _assert_same_as(out, reference)
    # the killed writer's uncommitted data files were removed by the next save
    named = {f["name"] for f in _manifest(out)["files"].values()} | set(_manifest(out)["previous"].values())
    left = {f"data/{p.name}" for p in (out / "data").iterdir()}
    assert left <= named and not list(out.glob(".*.tmp")), left - named


@pytest.mark.slow
def test_a_kill_at_any_file_operation_of_a_save_loses_nothing(store, tmp_path, monkeypatch):
    """The folder as a SIGKILL would leave it just before each write, fsync, rename or delete of the
    results folder (two units, so a first and a second save): each such folder, evaluated again,
    ends equal to one uninterrupted run."""
    tasks, cfg = ["fine/em_a", "fine/fluo_b"], EvalConfig(heads=("proto",), n_boot=0)
    whole = tmp_path / "whole"
    want = api.evaluate(store, cfg, tasks=tasks, results_dir=whole)
    out, snaps, seen = tmp_path / "out", [], set()

    def snapshot() -> None:
        files = tuple((p.relative_to(out).as_posix(), p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file())
        if files and files not in seen:  # a state a kill could leave, not seen before
            seen.add(files)
            dst = tmp_path / f"snap{len(snaps)}"
            shutil.copytree(out, dst)
            snaps.append(dst)

    def before(fn):
        def wrapped(*args, **kwargs):
            snapshot()
            return fn(*args, **kwargs)

        return wrapped

    with monkeypatch.context() as m:
        for name in ("replace", "rename", "unlink", "remove", "fsync"):
            m.setattr(os, name, before(getattr(os, name)))
        for name in ("to_parquet", "to_csv"):
            m.setattr(pd.DataFrame, name, before(getattr(pd.DataFrame, name)))
        api.evaluate(store, cfg, tasks=tasks, results_dir=out)
    snapshot()
    assert len(snaps) >= 8, snaps
    for snap in snaps:
        res = api.evaluate(store, cfg, tasks=tasks, results_dir=snap)
        assert res.computed + res.skipped == 2, snap
        for got, exp, key in ((res.table, want.table, KEY), (res.predictions, want.predictions, PRED_KEY)):
            assert not got.duplicated(key).any(), snap
            pd.testing.assert_frame_equal(_sorted(got, key), _sorted(exp, key), check_dtype=False, obj=str(snap))
        _assert_same_as(snap, whole)


# ---- concurrent writers -------------------------------------------------------------------------


@pytest.mark.slow
def test_four_concurrent_evaluations_equal_one_run(store, reference, tmp_path):
    out = tmp_path / "shared"
    code = "import sys; from mubench_probe.cli import main; sys.argv = ['probe', *sys.argv[1:]]; main()"
    args = [sys.executable, "-c", code, "evaluate", str(store), "--out", str(out), *HEADS]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all("Traceback" not in o for o in outputs), outputs
    _assert_same_as(out, reference)
    record = json.loads((out / "run.json").read_text())
    assert len(record["history"]) == 4, "every invocation is recorded"
    assert set(_manifest(out)["units"]) == set(pd.read_parquet(reference / "results.parquet")["unit"])


# ---- damaged and deleted files ------------------------------------------------------------------


@pytest.mark.slow
def test_garbage_results_parquet_is_rewritten_without_a_traceback(store, reference, folder):
    (folder / "results.parquet").write_bytes(b"this is not a parquet file" * 10)
    r = _evaluate(store, folder)
    assert f"0 units computed, {UNITS} already in" in r.output, "the committed state is intact: nothing is lost"
    assert "results.parquet did not match" in r.output, r.output
    _assert_same_as(folder, reference)


@pytest.mark.slow
def test_garbage_results_in_a_folder_of_the_previous_version_is_one_note(store, reference, folder):
    _as_previous_version(folder)
    (folder / "results.parquet").write_bytes(b"PAR1 garbage")
    r = _evaluate(store, folder)
    notes = [ln for ln in r.output.splitlines() if "results.parquet is unreadable" in ln]
    assert len(notes) == 1 and f"{UNITS} units computed, 0 already" in r.output, r.output
    _assert_same_as(folder, reference)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["results", "predictions"])
def test_damaged_committed_file_is_named_and_restored_from_its_copy(store, reference, folder, kind):
    path = _committed_file(folder, kind)
    _flip(path)
    r = _evaluate(store, folder)
    notes = [ln for ln in r.output.splitlines() if path.name in ln]
    assert len(notes) == 1 and "checksum" in notes[0] and "read from its copy" in notes[0], r.output
    assert f"0 units computed, {UNITS} already" in r.output, "the copy has the same checksum: nothing is lost"
    _assert_same_as(folder, reference)
    assert path.read_bytes() == (reference / path.relative_to(folder)).read_bytes(), "restored"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["results", "predictions"])
def test_damaged_committed_file_and_copy_recompute_their_units(store, reference, folder, kind):
    path = _committed_file(folder, kind)
    _flip(path)
    _flip(folder / f"{kind}.parquet")
    r = _evaluate(store, folder)
    notes = [ln for ln in r.output.splitlines() if path.name in ln]
    assert len(notes) == 1 and "checksum" in notes[0] and f"{UNITS} unit(s) it held" in notes[0], r.output
    assert f"{UNITS} units computed, 0 already" in r.output, r.output
    _assert_same_as(folder, reference)


@pytest.mark.slow
def test_results_of_units_whose_predictions_are_lost_are_kept_until_recomputed(store, reference, folder):
    """Bad files never destroy readable results: with every prediction lost, an evaluation of one
    task recomputes that task only, and the other units' results stay in results.parquet (not done:
    the next full evaluation recomputes exactly them)."""
    _committed_file(folder, "predictions").unlink()
    (folder / "predictions.parquet").unlink()
    r = _run("evaluate", store, "--out", folder, *HEADS, "--task", "fine/em_a")
    assert r.exit_code == 0 and "1 units computed, 0 already" in r.output, r.output
    kept = pd.read_parquet(folder / "results.parquet")
    assert set(kept["unit"]) == set(pd.read_parquet(reference / "results.parquet")["unit"]), "no result deleted"
    assert set(pd.read_parquet(folder / "predictions.parquet")["task"]) == {"fine/em_a"}
    r = _evaluate(store, folder)
    assert f"{UNITS - 1} units computed, 1 already" in r.output and "incomplete" in r.output, r.output
    _assert_same_as(folder, reference)


def test_garbage_manifest_falls_back_to_the_copies(store, reference, folder):
    (folder / "manifest.json").write_text("{not json")
    r = _evaluate(store, folder)
    assert "manifest.json is unreadable" in r.output and f"0 units computed, {UNITS} already" in r.output, r.output
    _assert_same_as(folder, reference)
    assert _manifest(folder)["format"] == 1 and len(_manifest(folder)["units"]) == UNITS, "committed again"


def test_deleted_predictions_parquet_is_restored_from_the_committed_state(store, reference, folder):
    (folder / "predictions.parquet").unlink()
    r = _evaluate(store, folder)
    assert f"0 units computed, {UNITS} already" in r.output, "the committed predictions were not lost"
    assert "predictions.parquet was missing" in r.output, r.output
    _assert_same_as(folder, reference)


def test_deleted_predictions_recompute_the_units_that_had_some(store, reference, folder):
    _committed_file(folder, "predictions").unlink()
    (folder / "predictions.parquet").unlink()
    r = _evaluate(store, folder)
    assert f"{UNITS} units computed, 0 already" in r.output and "is missing" in r.output, r.output
    _assert_same_as(folder, reference)


def test_a_folder_of_a_newer_format_is_refused_in_one_line_and_left_alone(store, folder):
    manifest = _manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    r = _run("evaluate", store, "--out", folder, *HEADS)
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 1 and "Traceback" not in r.output and len(errors) == 1, r.output
    assert "written by a newer probe (results format 2" in errors[0], errors
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# ---- folders written by the previous version ----------------------------------------------------


def test_a_folder_of_the_previous_version_loads_and_is_committed(store, reference, folder):
    _as_previous_version(folder)
    history = json.loads((folder / "run.json").read_text())["history"]
    r = _evaluate(store, folder)
    assert f"0 units computed, {UNITS} already" in r.output, r.output
    _assert_same_as(folder, reference)
    assert (folder / "manifest.json").exists(), "the next invocation commits the folder in the new format"
    assert len(json.loads((folder / "run.json").read_text())["history"]) == len(history) + 1
    table, preds = ResultsDir(folder).load()
    assert table["unit"].nunique() == UNITS and set(preds["unit"]) == set(table["unit"])


def test_previous_version_killed_between_its_two_files_recomputes_that_unit(store, reference, folder):
    """The previous probe wrote results.parquet, then predictions.parquet: a kill between them left a
    unit with results and no predictions. That unit is not done."""
    _as_previous_version(folder)
    preds = pd.read_parquet(folder / "predictions.parquet")
    lost = preds["unit"].iloc[-1]
    preds[preds["unit"] != lost].to_parquet(folder / "predictions.parquet", index=False)
    r = _evaluate(store, folder)
    assert f"1 units computed, {UNITS - 1} already" in r.output, r.output
    assert "without predictions" in r.output, r.output
    _assert_same_as(folder, reference)
