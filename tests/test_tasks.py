"""Tasks as data on a real CSV-of-images store: user tasks, transfer between sources, leave one
batch out, confounder measures, and no traceback when nothing can be evaluated."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app, note_lines
from mubench_probe.config import TaskSpec, read_task_file
from mubench_probe.errors import UsageError
from mubench_probe.heads import PrototypeHead
from mubench_probe.store import EmbeddingStore
from mubench_probe.tasks import builtin_specs, derive_tasks, resolve_task

from .conftest import TINY

SITES = ("wbc_site_a", "wbc_site_b", "wbc_site_c")
FAST = ["--bootstrap", "50", "--shots", "1,2", "--fewshot-seeds", "2"]


@pytest.fixture(scope="module")
def csv_store(tmp_path_factory, sample) -> Path:
    """Real BCCD crops behind a CSV manifest: three sites sharing the three classes, six plates."""
    root = tmp_path_factory.mktemp("csvtasks")
    (root / "img").mkdir()
    rows = []
    for c in sorted(set(sample.meta["label_name"])):
        picks = np.flatnonzero(sample.meta["label_name"].to_numpy() == c)[:30]
        for j, r in enumerate(picks):
            name = f"img/{c.replace(' ', '_')}_{j}.jpg"
            (root / name).write_bytes(sample.reader.read(int(r)))
            rows.append({"path": name, "label": c, "dataset": SITES[j % 3], "plate": f"p{j % 6}"})
    with open(root / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    store = root / "cells.zarr"
    ds = api.open_dataset(str(root / "cells.csv"))
    api.extract(TINY, ds, store=store, num_workers=0, batch_size=32, chunk_rows=64)
    return store


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


def test_builtin_tasks_are_task_specs(sample):
    meta = sample.meta
    specs = builtin_specs(meta)
    assert [s.name for s in specs] == [
        "fine/bccd",
        "coarse/domain",
        "coarse/subdomain",
        "coarse/modality",
        "coarse/submodality",
        "coarse/stain",
    ]
    assert all(s.group == "dataset" for s in specs if s.kind == "coarse")
    fine = resolve_task(specs[0], meta)
    assert (fine.rows == np.flatnonzero(meta["dataset"] == "bccd")).all()
    assert list(fine.classes) == sorted(set(meta["label_name"]))
    # a user task over the same column and rows is the same task under another name
    mine = resolve_task(TaskSpec("custom/cells", "label_name", ("dataset=bccd",)), meta)
    assert (mine.rows == fine.rows).all() and (mine.y == fine.y).all()
    # where: values of one column are alternatives, != excludes
    two = resolve_task(TaskSpec("custom/x", "label_name", ("label_name=platelet", "label_name=red blood cell")), meta)
    assert two.n_classes == 2
    not_platelet = resolve_task(TaskSpec("custom/y", "label_name", ("label_name!=platelet",)), meta)
    assert "platelet" not in not_platelet.classes and len(not_platelet.rows) == 300
    with pytest.raises(UsageError, match="no metadata column 'plate'"):
        resolve_task(TaskSpec("custom/z", "label_name", group="plate"), meta)
    assert [t.name for t in derive_tasks(meta)] == [s.name for s in specs if s.kind == "fine"]  # coarse: one class


def test_transfer_between_two_sources_that_share_classes(csv_store, tmp_path):
    out = tmp_path / "res"
    r = _run(
        "evaluate", csv_store, "--out", out, *FAST,
        "--label", "label_name", "--where", "dataset=wbc_site_a", "--where", "dataset=wbc_site_b",
        "--protocol", "transfer", "--train-where", "dataset=wbc_site_a", "--test-where", "dataset=wbc_site_b",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "custom/label_name" in r.output and "Traceback" not in r.output
    t = _table(out)
    meta = EmbeddingStore(csv_store).runs()[0].meta()
    site_b = set(np.flatnonzero(meta["dataset"] == "wbc_site_b"))
    for head in ("lp", "proto", "knn@10", "zs_prompt"):
        row = t[(t.task == "custom/label_name") & (t["head"] == head) & (t.metric == "accuracy") & (t.stratum == "all")]
        assert len(row) == 1 and row.n.iloc[0] == len(site_b), head
    preds = pd.read_parquet(out / "predictions.parquet")
    assert set(preds[preds["head"] == "lp"].row) == site_b
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["tasks"][0]["label"] == "label_name"
    assert record["config"]["tasks"][0]["where"] == ["dataset=wbc_site_a", "dataset=wbc_site_b"]


def test_nothing_to_evaluate_is_one_line_and_exit_3(csv_store, tmp_path):
    # the built-in fine tasks live within one source each: no class is on both sides
    r = _run(
        "evaluate", csv_store, "--out", tmp_path / "res", *FAST,
        "--protocol", "transfer", "--train-where", "dataset=wbc_site_a", "--test-where", "dataset=wbc_site_b",
    )  # fmt: skip
    assert r.exit_code == 3, r.output
    assert "nothing to evaluate" in r.output and "Traceback" not in r.output
    assert "fewer than two of its classes are on both" in r.output
    # a user task that selects a single class says so, and nothing is evaluated either
    r = _run("evaluate", csv_store, "--out", tmp_path / "r2", "--label", "label_name", "--where", "label_name=platelet")
    assert r.exit_code == 3 and "1 class(es) in 30 matching rows" in r.output, r.output
    assert "Traceback" not in r.output


def test_tasks_file_and_probe_tasks(csv_store, tmp_path):
    spec = tmp_path / "tasks.yaml"
    spec.write_text(
        "tasks:\n"
        "  - name: by_plate\n    label: label_name\n    group: plate\n    heads: [lp, proto, knn]\n"
        "  - name: no_p0\n    label: label_name\n    where: ['plate!=p0']\n    heads: [proto]\n"
    )
    specs = read_task_file(spec)
    assert [s.name for s in specs] == ["custom/by_plate", "custom/no_p0"]
    r = _run("tasks", csv_store, "--tasks", spec, "--format", "csv")
    assert r.exit_code == 0, r.output
    listed = pd.read_csv(__import__("io").StringIO(r.stdout))
    assert list(listed.task) == ["custom/by_plate", "custom/no_p0"]
    assert list(listed.rows) == [90, 75] and list(listed.classes) == [3, 3]
    assert list(listed.group_by.fillna("")) == ["plate", ""]
    out = tmp_path / "res"
    r = _run("evaluate", csv_store, "--out", out, "--tasks", spec, *FAST)
    assert r.exit_code == 0, r.output
    t = _table(out)
    assert set(t.task) == {"custom/by_plate", "custom/no_p0"}
    assert set(t[t.task == "custom/no_p0"]["head"]) <= {"proto", "batch", "map"} | {"alignment"}
    assert "lp" in set(t[t.task == "custom/by_plate"]["head"])
    record = json.loads((out / "run.json").read_text())
    assert [x["name"] for x in record["config"]["tasks"]] == ["custom/by_plate", "custom/no_p0"]
    # the built-in tasks of the store
    r = _run("tasks", csv_store, "--format", "json")
    assert r.exit_code == 0, r.output
    names = [x["task"] for x in json.loads(r.stdout)]
    assert names == [f"fine/{s}" for s in SITES]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- label: label_name\n  colour: red\n")
    r = _run("tasks", csv_store, "--tasks", bad)
    assert r.exit_code == 2 and "unknown key" in r.output and "Traceback" not in r.output
    r = _run("evaluate", csv_store, "--where", "dataset=x")
    assert r.exit_code == 2 and "--label" in r.output


def test_leave_one_batch_out_matches_a_plain_loop(csv_store, tmp_path):
    out = tmp_path / "res"
    r = _run(
        "evaluate", csv_store, "--out", out, *FAST, "--label", "label_name", "--protocol", "loso",
        "--batch", "dataset", "--head", "proto", "--head", "lp",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    t = _table(out)
    run = EmbeddingStore(csv_store).runs()[0]
    meta = run.meta()
    x = np.asarray(run.group["image_emb"][:], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    classes = sorted(set(meta.label_name))
    y = np.array([classes.index(v) for v in meta.label_name])
    accs = []
    for site in SITES:
        te = (meta.dataset == site).to_numpy()
        pred = PrototypeHead(3).fit(x[~te], y[~te]).predict(x[te])
        acc = float((pred == y[te]).mean())
        accs.append(acc)
        row = t[(t["head"] == "proto") & (t.stratum == f"loso:dataset={site}")]
        assert len(row) == 1 and row.value.iloc[0] == pytest.approx(acc)
    mean = t[(t["head"] == "proto") & (t.metric == "loso_mean_accuracy")]
    assert mean.value.iloc[0] == pytest.approx(np.mean(accs))
    assert len(t[(t["head"] == "lp") & t.stratum.str.startswith("loso:")]) == 3
    # fewer than three batches: the probes are skipped with a note, not a crash
    r = _run(
        "evaluate", csv_store, "--out", tmp_path / "r2", *FAST, "--label", "label_name",
        "--where", "dataset=wbc_site_a", "--where", "dataset=wbc_site_b", "--protocol", "loso", "--head", "proto",
    )  # fmt: skip
    assert r.exit_code == 3 and "needs at least 3 values" in r.output, r.output


def test_confounder_measures_on_a_plate_batch(csv_store, tmp_path):
    out = tmp_path / "res"
    r = _run(
        "evaluate", csv_store, "--out", out, *FAST, "--label", "label_name", "--batch", "plate",
        "--head", "knn", "--head", "batch", "--head", "map", "--head", "lp", "--knn-k", "1,5",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    t = _table(out)
    heads = set(t["head"])
    assert {"knn@5", "knn_nsb@5", "batch", "map", "lp"} <= heads
    batch = t[t["head"] == "batch"]
    assert {"same_class@10", "same_batch@10", "robustness_index@10", "knn_minus_nsb@5"} <= set(batch.metric)
    maps = t[(t["head"] == "map") & (t.metric == "mAP")]
    assert {f"class={c}" for c in ("platelet", "red blood cell", "white blood cell")} <= set(maps.stratum)
    assert ((maps.value >= 0) & (maps.value <= 1)).all()
    ece = t[(t["head"] == "lp") & (t.metric == "ece")]
    assert len(ece) == 1 and 0 <= ece.value.iloc[0] <= 1
    bins = t[(t["head"] == "lp") & (t.metric == "calibration_accuracy")]
    assert bins.n.sum() == 90
    # the same through the Python API, with the batch given in the config
    cfg = api.EvalConfig(
        heads=("knn",), ks=(5,), n_boot=0, batch="plate", tasks=(TaskSpec("custom/cells", "label_name"),)
    )
    res = api.evaluate(csv_store, cfg)
    got = res.table[(res.table["head"] == "knn_nsb@5") & (res.table.metric == "accuracy")]
    assert len(got) == 1 and res.scored > 0


class _Res:
    def __init__(self, notes, kinds, table):
        self.notes, self.note_kinds, self.table = notes, kinds, table


def test_notes_are_grouped_by_kind_unless_verbose():
    notes = [f"m: fine/t{i}: lp chose C=0.01, the smallest value of the grid, in fold 0" for i in range(6)]
    notes += ["m: a single other note"]
    kinds = ["probe_c_edge"] * 6 + ["other"]
    table = pd.DataFrame({"metric": ["C_at_edge"] * 10, "value": [1.0] * 6 + [0.0] * 4})
    lines = note_lines(_Res(notes, kinds, table), verbose=False)
    edge = "a probe chose an edge of the C grid in 6 of 10 fits (widen --probe-cs): see run.json"
    assert sorted(lines) == sorted(["m: a single other note", edge])
    assert len(note_lines(_Res(notes, kinds, table), verbose=True)) == 7
