"""Every protocol on a store with several source datasets, and every head against a plain reference.

The store (`mubench_probe.testing.multi_source_store`) has five sources with their own classes,
coarse attributes shared by some sources and owned by one (electron microscopy, uranyl acetate),
caption options, class prompts and a `split` column.
"""

import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.errors import UsageError
from mubench_probe.heads.linear import serial_optimizer_blas
from mubench_probe.heads.scoring import quantize
from mubench_probe.protocol import (
    EvalConfig,
    Output,
    TaskArrays,
    evaluate_task,
    run_few_shot,
    run_knn,
    run_linear_probe,
)
from mubench_probe.store import EmbeddingStore
from mubench_probe.tasks import derive_tasks, prompt_texts
from mubench_probe.testing import DEFAULT_SOURCES, Source, multi_source_store

FAST = EvalConfig(n_boot=100, shots=(1, 4), fewshot_seeds=2)
TRANSFER = {
    "protocol": "transfer",
    "train_where": ("dataset=histo_a", "dataset=fluo_a"),
    "test_where": ("dataset=histo_b", "dataset=fluo_b"),
}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    return multi_source_store(tmp_path_factory.mktemp("multi") / "m.zarr", models=("synthetic:a", "synthetic:b"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The same sources, metadata and tasks with a quarter of the rows, one model, 16-d: for refusals,
    which read only the metadata (the fast tier builds no two-model store)."""
    sources = tuple(replace(s, rows=s.rows // 4) for s in DEFAULT_SOURCES)
    return multi_source_store(tmp_path_factory.mktemp("small") / "s.zarr", dim=16, sources=sources)


@pytest.fixture(scope="module")
def kfold(multi, tmp_path_factory):
    return api.evaluate(multi, FAST, results_dir=tmp_path_factory.mktemp("res"))


def _accuracy(table, task, head, model="synthetic:a"):
    row = table[
        (table.model == model)
        & (table.task == task)
        & (table["head"] == head)
        & (table.metric == "accuracy")
        & (table.stratum == "all")
        & table.seed.isna()
    ]
    assert len(row) == 1, (task, head, len(row))
    return row.iloc[0]


@pytest.mark.slow
def test_kfold_on_several_sources_scores_every_head_on_the_same_rows(kfold, multi):
    t, notes = kfold.table, kfold.notes
    tasks = sorted({x for x in t.task if x.startswith(("fine/", "coarse/"))})
    assert len(tasks) == 8
    for task in tasks:
        n = {h: _accuracy(t, task, h).n for h in ("zs_prompt", "lp", "proto", "knn@10")}
        assert len(set(n.values())) == 1, (task, n)
    # single-source classes are excluded from grouped coarse tasks, and the notes name them
    meta = EmbeddingStore(multi).runs()[0].meta()
    assert _accuracy(t, "coarse/modality", "lp").n == int((meta.modality != "electron microscopy").sum())
    assert any("electron microscopy (only in em_a, 140 rows)" in n for n in notes)
    assert any("uranyl acetate (only in em_a" in n for n in notes)
    assert _accuracy(t, "coarse/domain", "lp").n == len(meta)  # both domains span several sources
    # the probe is no longer stuck at chance: it decodes what kNN decodes
    for task in ("fine/histo_a", "fine/fluo_a"):
        assert _accuracy(t, task, "lp").value >= _accuracy(t, task, "knn@10").value - 0.05
    # chosen C and the validation curve are in the results, per fold
    chosen = t[(t.metric == "chosen_C") & (t.task == "fine/histo_a") & (t["head"] == "lp") & (t.model == "synthetic:a")]
    assert sorted(chosen.stratum) == [f"fold={i}" for i in range(5)]
    curve = t[(t.metric == "val_log_loss") & (t.task == "fine/histo_a") & t.stratum.str.startswith("fold=0;")]
    assert len(curve) >= 3 and curve.stratum.iloc[0] == "fold=0;C=0.01"


def test_a_class_missing_from_a_training_fold_counts_as_errors_and_never_crashes(monkeypatch):
    from mubench_probe import protocol
    from mubench_probe.protocol import task as task_module  # evaluate_task's module: its plan_task is replaced

    rng = np.random.default_rng(0)
    meta = pd.DataFrame({"label_name": ["a", "b", "c"] * 30, "dataset": "d"})
    task = derive_tasks(meta)[0]
    x = rng.normal(size=(90, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    arrays = TaskArrays(task, task.rows, x, task.y, meta)
    test0 = np.flatnonzero((task.y == 2) | (np.arange(90) < 30))  # every "c" row is tested in fold 0
    folds = [(np.setdiff1d(np.arange(90), test0), test0), (test0, np.setdiff1d(np.arange(90), test0))]
    plan = protocol.TaskPlan(arrays, np.arange(90), folds, "hand-made folds")
    monkeypatch.setattr(task_module, "plan_task", lambda t, cfg: plan)
    cfg = EvalConfig(n_boot=0, shots=(2,), fewshot_seeds=2)
    out = evaluate_task(arrays, cfg)
    assert any("fold 0 has no training rows of c" in n and "30 test rows count as errors" in n for n in out.notes)
    preds = pd.concat(out.predictions)
    for head in ("lp", "proto", "knn@10"):
        p = preds[(preds["head"] == head) & preds.row.isin(test0) & (preds.y_true == 2)]
        assert len(p) == 30 and (p.y_pred != 2).all(), head
    assert {"lp_2shot", "proto_2shot"} <= set(pd.DataFrame(out.records)["head"])


def test_a_training_fold_with_one_class_does_not_crash_any_head():
    rng = np.random.default_rng(1)
    meta = pd.DataFrame({"label_name": ["a", "b"] * 20, "dataset": "d"})
    task = derive_tasks(meta)[0]
    x = rng.normal(size=(40, 6))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t = TaskArrays(task, task.rows, x, task.y, meta)
    train = np.flatnonzero(task.y == 0)[:15]  # only class a
    folds = [(train, np.setdiff1d(np.arange(40), train))]
    cfg = EvalConfig(n_boot=0, shots=(1, 2), fewshot_seeds=2)
    out, correct = Output(), {}
    run_linear_probe(out, t, folds, folds[0][1], cfg, correct)
    run_knn(out, t, folds, folds[0][1], cfg)
    run_few_shot(out, t, folds, cfg)
    assert any("one training class" in n for n in out.notes)
    lp = pd.concat(out.predictions).query("head == 'lp'")
    assert (lp.y_pred == 0).all()


@pytest.mark.slow
def test_split_protocol_scores_zero_shot_on_the_test_rows_only(multi, tmp_path):
    res = api.evaluate(
        multi, EvalConfig(protocol="split", n_boot=50, shots=(2,), fewshot_seeds=1), models=["synthetic:a"]
    )
    meta = EmbeddingStore(multi).runs()[0].meta()
    test = meta.split == "test"
    for task, rows in (("fine/histo_a", test & (meta.dataset == "histo_a")), ("coarse/domain", test)):
        n = {h: _accuracy(res.table, task, h).n for h in ("zs_prompt", "lp", "knn@10", "proto")}
        assert set(n.values()) == {int(rows.sum())}, (task, n)
    cap = res.table[(res.table.task == "mubench/classification_0") & (res.table.stratum == "all")]
    assert int(cap.n.iloc[0]) == int(test.sum())


@pytest.mark.slow
def test_transfer_protocol_trains_on_one_side_and_tests_on_the_other(multi):
    res = api.evaluate(multi, EvalConfig(n_boot=50, shots=(2,), fewshot_seeds=1, **TRANSFER), models=["synthetic:a"])
    meta = EmbeddingStore(multi).runs()[0].meta()
    test = meta.dataset.isin(["histo_b", "fluo_b"])
    for task in ("coarse/domain", "coarse/modality", "coarse/stain"):
        n = {h: _accuracy(res.table, task, h).n for h in ("zs_prompt", "lp", "knn@10", "proto")}
        assert set(n.values()) == {int(test.sum())}, (task, n)
    preds = res.predictions[(res.predictions.task == "coarse/domain") & (res.predictions["head"] == "lp")]
    assert set(meta.dataset.iloc[preds.row]) == {"histo_b", "fluo_b"}
    assert "fine/histo_a" not in set(res.table.task)  # its classes are on one side only
    assert any("fine/histo_a: skipped" in n for n in res.notes)
    cap = res.table[(res.table.task == "mubench/domain") & (res.table.stratum == "all")]
    assert int(cap.n.iloc[0]) == int(test.sum())


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"train_where": ("dataset=nope",), "test_where": ("dataset=histo_b",)}, "matches no row"),
        ({"train_where": ("dataset=histo_a",), "test_where": ("dataset=histo_a",)}, "match both"),
        ({"train_where": ("colour=red",), "test_where": ("dataset=histo_b",)}, "no metadata column 'colour'"),
        ({"train_where": ("dataset",), "test_where": ("dataset=histo_b",)}, "COLUMN=VALUE"),
    ],
)
def test_transfer_refuses_conditions_that_cannot_work(small, kw, needle):
    with pytest.raises(UsageError, match=needle):
        api.evaluate(small, EvalConfig(protocol="transfer", **kw), models=["synthetic:a"], tasks=["coarse/*"])


def test_config_is_validated_on_creation():
    for bad in (
        {"heads": ("bogus",)},
        {"protocol": "loo"},
        {"protocol": "transfer"},
        {"fine_templates": "2"},
        {"ci_method": "bca"},
        {"cs": (1.0, 0.1)},
    ):
        with pytest.raises(UsageError):
            EvalConfig(**bad)


def _plain_folds(y):
    return list(StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(y)), y))


@pytest.mark.slow
def test_heads_equal_plain_references_on_the_same_folds(multi, kfold):
    """kNN: float64 brute force; ZS: plain prompt ensembles; LP: scikit-learn at the recorded C."""
    run = EmbeddingStore(multi).runs()[0]
    x, meta, texts, temb = run.image_embeddings(), run.meta(), run.texts(), run.text_embeddings()
    rows = np.flatnonzero(meta.dataset == "histo_a")
    classes = sorted(set(meta.label_name.iloc[rows]))
    y = np.array([classes.index(c) for c in meta.label_name.iloc[rows]])
    xs = x[rows]
    preds = kfold.predictions[(kfold.predictions.model == "synthetic:a") & (kfold.predictions.task == "fine/histo_a")]

    def ours(head):
        p = preds[preds["head"] == head].set_index("row").loc[rows]
        return p.y_pred.to_numpy()

    # zero-shot: per class, normalised prompt embeddings averaged and re-normalised; argmax
    prompts = prompt_texts(classes, run.prompts()["templates"])
    w = np.stack([temb[[texts.index(p) for p in row]].astype(np.float64) for row in prompts])
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    w = w.mean(axis=1)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    assert (ours("zs_prompt") == (xs.astype(np.float64) @ w.T).argmax(1)).all()
    # kNN (k = 10, T = 0.07) by float64 brute force on the same vectors, ties to the lower row
    q = quantize(xs) / 2.0**24  # the 24-bit-rounded vectors: products and sums exact in float64
    knn, lp = np.zeros(len(y), int), np.zeros(len(y), int)
    chosen = kfold.table[
        (kfold.table.model == "synthetic:a")
        & (kfold.table.task == "fine/histo_a")
        & (kfold.table.metric == "chosen_C")
        & (kfold.table["head"] == "lp")
    ].set_index("stratum")["value"]
    for i, (tr, te) in enumerate(_plain_folds(y)):
        sims = q[te] @ q[tr].T
        for j, row in enumerate(sims):
            order = np.lexsort((np.arange(len(row)), -row))[:10]
            votes = np.bincount(
                y[tr][order], weights=np.exp((row[order] - row[order[0]]) / 0.07), minlength=len(classes)
            )
            knn[te[j]] = votes.argmax()
        with warnings.catch_warnings(), serial_optimizer_blas():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = LogisticRegression(C=chosen[f"fold={i}"], tol=1e-10, max_iter=20000)
            lp[te] = model.fit(xs[tr].astype(np.float64), y[tr]).predict(xs[te].astype(np.float64))
    assert (ours("knn@10") == knn).all()
    assert (ours("lp") == lp).all()


@pytest.mark.slow
def test_mubench_table1_preset(tmp_path):
    sources = (
        Source("eulenberg_et_al_2017_darkfield", 3, 80, "light microscopy", "none", "cell biology"),
        Source("eulenberg_et_al_2017_epifluorescence", 3, 80, "fluorescence microscopy", "DAPI", "cell biology"),
        Source("histo", 4, 120, "light microscopy", "H&E", "pathology"),
        Source("fluo", 3, 100, "fluorescence microscopy", "DAPI", "cell biology"),
    )
    store = multi_source_store(tmp_path / "t1.zarr", sources=sources)
    cfg = EvalConfig.preset("mubench-table1")
    assert cfg.heads == ("zs_caption",) and cfg.n_boot == 9999 and cfg.ci_method == "basic"
    res = api.evaluate(store, cfg)
    t = res.table
    assert set(t["head"]) == {"zs_caption"}
    assert {"mubench/classification_1", "mubench/coarse", "mubench/fine"} <= set(t.task)
    assert "mubench/classification_0" not in set(t.task)  # one fine template
    fine = t[(t.task == "mubench/fine") & (t.metric == "accuracy")].iloc[0]
    coarse = t[(t.task == "mubench/coarse") & (t.metric == "accuracy")].iloc[0]
    assert fine.n == 220  # the two Eulenberg sources are left out of fine-grained only
    assert coarse.n == 380 * 6  # all sources, both templates of the store's 3 attributes
    half = t[(t.task == "mubench/fine") & (t.metric == "ci_half_width")].iloc[0]
    assert half.value == pytest.approx(abs(fine.ci_high - fine.value))
    table1 = api.mubench_table1(t)
    assert list(table1.columns)[:3] == ["model", "coarse", "coarse_ci"] and table1.fine_n.iloc[0] == 220


@pytest.mark.slow
def test_cli_evaluate_and_compare_never_print_a_traceback(multi, tmp_path):
    runner = CliRunner()
    args = ["--out", str(tmp_path / "r"), "--bootstrap", "20", "--shots", "2", "--fewshot-seeds", "1"]
    r = runner.invoke(app, ["evaluate", str(multi), *args])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "electron microscopy (only in em_a" in r.output
    r = runner.invoke(
        app,
        [
            "evaluate",
            str(multi),
            *args,
            "--protocol",
            "transfer",
            "--train-where",
            "dataset=histo_a",
            "--test-where",
            "dataset=histo_b",
            "--force",
        ],
    )
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    r = runner.invoke(
        app, ["evaluate", str(multi), "--preset", "mubench-table1", "--bootstrap", "200", "--out", str(tmp_path / "t1")]
    )
    assert r.exit_code == 0 and "μ-Bench zero-shot" in r.output and " ± " in r.output, r.output
    r = runner.invoke(
        app,
        [
            "evaluate",
            str(multi),
            "--protocol",
            "transfer",
            "--train-where",
            "dataset=zz",
            "--test-where",
            "dataset=histo_b",
        ],
    )
    assert r.exit_code == 2 and "matches no row" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        app, ["compare", str(tmp_path / "r"), "--report", str(tmp_path / "rep.html"), "--color-by", "dataset"]
    )
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    from PIL import Image

    figures = tmp_path / "rep_figures"
    with Image.open(figures / "zs_vs_lp.png") as im:  # 8 tasks: two rows of at most 4 panels, not one strip
        assert im.width < 2000 and im.height > 600, im.size
    assert (figures / "map_0_0.png").exists() and (figures / "map_1_0.png").exists()  # by position
    r = runner.invoke(app, ["compare", str(tmp_path / "r"), "--color-by", "colour"])
    assert r.exit_code == 2 and "no such metadata column" in r.output


@pytest.mark.slow
def test_loso_and_confounder_measures_on_several_sources(multi, tmp_path):
    """Leave one source out on every coarse task spanning >= 3 sources; batch measures per task."""
    cfg = FAST.replace(protocol="loso", heads=("proto", "lp", "knn", "batch", "map"), map_permutations=50)
    res = api.evaluate(multi, cfg, models=["synthetic:a"], tasks=["coarse/*"], results_dir=tmp_path / "r")
    t = res.table
    meta = EmbeddingStore(multi).runs()[0].meta()
    for task in ("coarse/domain", "coarse/modality"):
        per = t[(t.task == task) & (t["head"] == "proto") & t.stratum.str.startswith("loso:dataset=")]
        assert len(per) == meta.dataset.nunique(), task  # one held-out accuracy per source
        mean = t[(t.task == task) & (t["head"] == "proto") & (t.metric == "loso_mean_accuracy")]
        assert mean.value.iloc[0] == pytest.approx(per.value.mean())
        ri = t[(t.task == task) & (t["head"] == "batch") & (t.metric == "robustness_index@10")]
        assert len(ri) == 1 and 0 <= ri.value.iloc[0] <= 1
        assert len(t[(t.task == task) & (t["head"] == "map") & (t.metric == "q_value")]) >= 2
    # loso folds hold each source out whole: no knn_nsb (the neighbours are never from the query's source)
    assert not t["head"].str.startswith("knn_nsb").any()
