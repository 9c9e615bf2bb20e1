"""The evaluation protocol end to end: synthetic stores with known answers, and the real sample."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.errors import StoreError
from mubench_probe.protocol import EvalConfig, TaskArrays, evaluate_captions, plan_task
from mubench_probe.store import l2_normalize
from mubench_probe.tasks import derive_tasks

from .conftest import make_store

FAST = EvalConfig(n_boot=200, shots=(1, 4), fewshot_seeds=2)
# The synthetic stores' answers (a probe at 100 %, a gap) hold for any C: a 4-value grid instead of the 13 of
# DEFAULT_CS (the probe's choice of C is tested in test_heads.py and test_probe_selection.py).
SYNTH = EvalConfig(n_boot=200, shots=(1, 4), fewshot_seeds=2, cs=(0.1, 1.0, 10.0, 100.0))


def _get(table, task, head, metric="accuracy", stratum="all"):
    row = table[
        (table.task == task)
        & (table["head"] == head)
        & (table.metric == metric)
        & (table.stratum == stratum)
        & table.seed.isna()
    ]
    assert len(row) == 1, (task, head, metric, len(row))
    return row.iloc[0]


def _separable(n_per=40, classes=4, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(classes, dim)))
    y = np.repeat(np.arange(classes), n_per)
    x = l2_normalize(centres[y] + 0.05 * rng.normal(size=(len(y), dim)))
    return x, y, centres, rng


def test_perfect_images_random_text_give_a_large_gap(tmp_path):
    x, y, _, rng = _separable()
    labels = [f"c{i}" for i in y]
    text = {f"c{i}": rng.normal(size=x.shape[1]) for i in range(4)}
    make_store(tmp_path / "s.zarr", x, labels, text)
    t = api.evaluate(tmp_path / "s.zarr", SYNTH).table
    lp, zs = _get(t, "fine/synth", "lp").value, _get(t, "fine/synth", "zs_prompt").value
    assert lp == 1.0 and _get(t, "fine/synth", "proto").value == 1.0
    assert zs < 0.5  # chance is 0.25; random text may hit a class or two by luck
    gap = _get(t, "fine/synth", "alignment", "lp_minus_zs")
    assert gap.value > 0.5 and gap.ci_low > 0.4
    assert _get(t, "fine/synth", "alignment", "zs_over_lp").value == pytest.approx(zs)


def test_aligned_text_gives_a_small_gap(tmp_path):
    x, y, centres, _ = _separable()
    text = {f"c{i}": centres[i] for i in range(4)}
    make_store(tmp_path / "s.zarr", x, [f"c{i}" for i in y], text)
    t = api.evaluate(tmp_path / "s.zarr", SYNTH).table
    assert _get(t, "fine/synth", "zs_prompt").value == 1.0
    assert abs(_get(t, "fine/synth", "alignment", "lp_minus_zs").value) < 0.05


def test_zero_shot_heads_alone(tmp_path):
    x, y, centres, _ = _separable()
    make_store(tmp_path / "s.zarr", x, [f"c{i}" for i in y], {f"c{i}": centres[i] for i in range(4)})
    t = api.evaluate(tmp_path / "s.zarr", EvalConfig(heads=("zs_prompt",), n_boot=50)).table
    assert set(t["head"]) == {"zs_prompt", "zs_prompt[0]", "alignment"}
    assert _get(t, "fine/synth", "zs_prompt").value == 1.0


def test_image_only_model_reports_text_heads_not_applicable(tmp_path):
    x, y, _, _ = _separable()
    make_store(tmp_path / "s.zarr", x, [f"c{i}" for i in y], None)
    res = api.evaluate(tmp_path / "s.zarr", SYNTH)
    assert "zs_prompt" not in set(res.table["head"]) and _get(res.table, "fine/synth", "lp").value == 1.0
    assert any("not applicable" in n for n in res.notes)


def test_coarse_probe_folds_are_grouped_by_source_dataset():
    rng = np.random.default_rng(0)
    meta = pd.DataFrame(
        {
            "label_name": ["a"] * 60,
            "dataset": np.repeat(["d1", "d2", "d3", "d4", "d5", "d6"], 10),
            "modality": np.repeat(["EM", "LM", "EM", "LM", "EM", "LM"], 10),
        }
    )
    task = next(t for t in derive_tasks(meta) if t.name == "coarse/modality")
    arrays = TaskArrays(task, task.rows, rng.normal(size=(60, 4)), task.y, meta)
    plan = plan_task(arrays, EvalConfig(folds=5))
    assert "grouped by dataset" in plan.how and len(plan.folds) >= 2
    for train, test in plan.folds:
        assert not set(meta["dataset"][train]) & set(meta["dataset"][test])
    one_source = TaskArrays(task, task.rows, arrays.x, task.y, meta.assign(dataset="d1"))
    assert plan_task(one_source, EvalConfig()).folds == []


def test_mubench_caption_protocol_pools_and_skips_nulls():
    text = np.eye(3, dtype=np.float32)
    img = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=np.float32)
    caps = {
        "modality": (np.array([[0, 1], [0, 1], [1, 2], [0, 2]]), np.array([0, 1, 0, 1])),
        "classification_0": (np.array([[0, 1, 2]] * 4), np.array([0, 1, 2, -1])),
    }
    meta = pd.DataFrame({"dataset": ["a", "a", "b", "b"], "image_id": ["x", "x", "x", "y"]})
    out = evaluate_captions(img, text, caps, meta, np.ones(4, bool), EvalConfig(n_boot=0))
    t = pd.DataFrame(out.records)
    acc = t[t.metric == "accuracy"].set_index(["task", "stratum"])["value"]
    assert acc[("mubench/modality", "all")] == 0.5  # rows 0, 1 right; row 2 picks text 2, row 3 text 0: wrong
    assert acc[("mubench/classification_0", "all")] == 1.0 and t[t.task == "mubench/classification_0"].n.iloc[0] == 3
    assert acc[("mubench/coarse", "all")] == 0.5 and acc[("mubench/fine", "all")] == 1.0
    assert acc[("mubench/modality", "dataset=a")] == 1.0 and acc[("mubench/modality", "dataset=b")] == 0.0
    first_only = evaluate_captions(img, text, caps, meta, np.ones(4, bool), EvalConfig(n_boot=0, caption_templates="1"))
    assert not [r for r in first_only.records if r["task"] == "mubench/modality"]
    excluded = evaluate_captions(img, text, caps, meta, np.ones(4, bool), EvalConfig(n_boot=0, exclude_datasets=("b",)))
    ex = pd.DataFrame(excluded.records)
    assert ex[ex.metric == "accuracy"].set_index(["task", "stratum"])["value"][("mubench/coarse", "all")] == 1.0


@pytest.mark.slow
def test_sample_end_to_end_real_encoder_beats_random(tiny_store, effnet_store, tmp_path):
    rand = api.evaluate(tiny_store, FAST, results_dir=tmp_path / "r1").table
    real = api.evaluate(effnet_store, FAST, results_dir=tmp_path / "r2").table
    lp_rand, lp_real = _get(rand, "fine/bccd", "lp").value, _get(real, "fine/bccd", "lp").value
    assert lp_real > 0.9 and lp_real > lp_rand
    assert _get(rand, "mubench/fine", "zs_caption").n == 900  # both classification templates
    assert _get(rand, "mubench/coarse", "zs_caption").n == 450 * 10 - 18  # 18 null stain_1 captions
    few = rand[(rand["head"] == "lp_4shot") & (rand.stratum == "mean_over_seeds")]
    assert len(few) == 1 and 0 <= few.value.iloc[0] <= 1


@pytest.mark.slow
def test_results_files_cache_and_force(tiny_store, tmp_path):
    out = tmp_path / "res"
    first = api.evaluate(tiny_store, FAST, results_dir=out, tasks=["fine/*"])
    assert first.computed == 1 and first.skipped == 0
    for name in ("results.parquet", "results.csv", "predictions.parquet", "run.json"):
        assert (out / name).exists()
    table = pd.read_parquet(out / "results.parquet")
    assert list(table.columns)[:6] == ["model", "dataset", "task", "head", "metric", "stratum"]
    assert len(pd.read_csv(out / "results.csv")) == len(table)
    preds = pd.read_parquet(out / "predictions.parquet")
    lp = preds[preds["head"] == "lp"]
    assert len(lp) == 450 and lp.row.is_unique
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["folds"] == 5 and "timings_s" in record and record["versions"]["zarr"]
    again = api.evaluate(tiny_store, FAST, results_dir=out, tasks=["fine/*"])
    assert again.computed == 0 and again.skipped == 1 and len(again.table) == len(table)
    forced = api.evaluate(tiny_store, FAST, results_dir=out, tasks=["fine/*"], force=True)
    assert forced.computed == 1 and len(forced.table) == len(table)
    pd.testing.assert_frame_equal(forced.table.drop(columns="unit"), table.drop(columns="unit"))


def test_missing_prompts_name_the_extract_command(tiny_store, tmp_path):
    with pytest.raises(StoreError, match="probe extract --model mubench-tiny-vit:random"):
        api.evaluate(tiny_store, FAST, templates=["an unseen template for {}."], tasks=["fine/*"])


def test_cli_evaluate(tiny_store, tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(tiny_store),
            "--out",
            str(tmp_path / "res"),
            "--bootstrap",
            "100",
            "--shots",
            "1,2",
            "--fewshot-seeds",
            "2",
            "--task",
            "fine/*",
            "--task",
            "mubench",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "fine/bccd" in r.output and "mubench/coarse" in r.output and "2 units computed" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(tiny_store), "--head", "bogus"])
    assert r.exit_code == 2 and "unknown head" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(tiny_store), "--shots", "a,b"])
    assert r.exit_code == 2 and "comma-separated" in r.output


@pytest.mark.slow
def test_parallel_jobs_give_the_same_numbers(tmp_path):
    x, y, centres, rng = _separable()
    meta = {"modality": np.where(np.arange(len(y)) % 2, "EM", "LM")}
    text = {f"c{i}": centres[i] for i in range(4)} | {"EM": rng.normal(size=16), "LM": rng.normal(size=16)}
    make_store(tmp_path / "s.zarr", x, [f"c{i}" for i in y], text, meta)
    one = api.evaluate(tmp_path / "s.zarr", FAST, jobs=1).table
    res = api.evaluate(tmp_path / "s.zarr", FAST, jobs=2)
    two = res.table
    assert res.computed == 2 and any("one source dataset only" in n for n in res.notes)
    key = ["task", "head", "metric", "stratum", "seed"]
    pd.testing.assert_frame_equal(
        one.sort_values(key).reset_index(drop=True), two.sort_values(key).reset_index(drop=True)
    )


def test_own_split_protocol_uses_the_split_column(tiny_store, sample):
    cfg = EvalConfig(protocol="split", n_boot=50, shots=(1,), fewshot_seeds=1)
    res = api.evaluate(tiny_store, cfg, tasks=["fine/*"])
    n_test = int((sample.meta["split"] == "test").sum())
    assert _get(res.table, "fine/bccd", "lp").n == n_test
    assert any("own train/test split" in n for n in res.notes)


@pytest.mark.slow
def test_a_run_still_being_extracted_is_skipped_with_a_note(tmp_path):
    from mubench_probe.store import EmbeddingStore
    from mubench_probe.testing import multi_source_store

    store = multi_source_store(tmp_path / "m.zarr", models=("synthetic:a", "synthetic:b"))
    (partial,) = [r for r in EmbeddingStore(store).runs() if r.model_spec == "synthetic:b"]
    partial.clear_done(3)  # as if its extraction were still going on
    res = api.evaluate(store, EvalConfig(heads=("zs_prompt",), n_boot=0), results_dir=tmp_path / "r")
    assert set(res.table.model) == {"synthetic:a"}
    assert any("synthetic:b: skipped, still being extracted" in n and "chunks" in n for n in res.notes)
    partial.clear_done(0)
    (complete,) = [r for r in EmbeddingStore(store).runs() if r.model_spec == "synthetic:a"]
    complete.clear_done(1)
    with pytest.raises(StoreError, match="no complete run"):
        api.evaluate(store, EvalConfig(heads=("zs_prompt",), n_boot=0))


@pytest.mark.slow
def test_run_json_keeps_every_invocation(tiny_store, tmp_path):
    out = tmp_path / "res"
    api.evaluate(tiny_store, FAST, results_dir=out, tasks=["fine/*"])
    api.evaluate(tiny_store, FAST, results_dir=out, tasks=["fine/*"])  # all cached: still recorded
    record = json.loads((out / "run.json").read_text())
    assert [h["computed"] for h in record["history"]] == [1, 0]
    assert record["computed"] == 0 and record["history"][0]["config"]["folds"] == 5
