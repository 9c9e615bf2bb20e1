"""Robustness (issue 21, items 2 and 3): measures against plain NumPy/SciPy references on hard data,
identical and permuted twins with known answers, and evaluate + compare on stores with perturbed twins."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mubench_probe import api
from mubench_probe.config import TEMPERATURE
from mubench_probe.errors import StoreError
from mubench_probe.heads import KNNHead, PrototypeHead
from mubench_probe.heads.robustness import (
    clean_trained_predictions,
    invariance,
    quantile_estimate,
    row_cosines,
    shift_scores,
)
from mubench_probe.protocol import EvalConfig, TaskArrays, evaluate_task, plan_task
from mubench_probe.robustness import evaluate_twins, long_table, per_perturbation, summary
from mubench_probe.store import EmbeddingStore
from mubench_probe.tasks import derive_tasks, prompt_texts
from mubench_probe.testing import DEFAULT_SOURCES, hard_embeddings, multi_source_store, write_run

FAST = EvalConfig(n_boot=100, heads=("zs_prompt", "lp", "knn", "proto", "zs_caption"), cs=(0.1, 1.0, 10.0))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hard(n=400, dim=48, classes=12, seed=0):
    """Anisotropic cone vectors, weak imbalanced class signal, many classes."""
    return hard_embeddings(n, dim, classes, signal=0.6, imbalance=0.25, decay=1.0, min_rows=6, seed=seed)


def _shifted(x, strength, seed=1):
    rng = np.random.default_rng(seed)
    return _unit(x + strength * rng.normal(size=x.shape) / np.sqrt(x.shape[1])).astype(np.float32)


# ---- pure measures ---------------------------------------------------------------------------------


def test_row_cosines_match_plain_numpy_on_float16_cone_vectors():
    x, _ = _hard()
    xp = _shifted(x, 0.3)
    a, b = x.astype(np.float16), xp.astype(np.float16)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = (a64 * b64).sum(axis=1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    got = row_cosines(a, b)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert got.min() < 0.999  # the perturbation moved every row a little: not a trivial test
    np.testing.assert_allclose(row_cosines(x, x), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="row-aligned"):
        row_cosines(x, x[:-1])


@pytest.mark.parametrize("n", [7, 20, 57, 400, 1001])
@pytest.mark.parametrize("q", [0.5, 0.05])
def test_quantile_ci_is_scipys_distribution_free_interval(n, q):
    v = np.random.default_rng(n).standard_cauchy(n)  # heavy tails: a bootstrap would struggle
    est = quantile_estimate(v, q)
    ref = stats.quantile_test(v, q=0, p=q).confidence_interval(0.95)
    assert est.value == np.quantile(v, q)
    for got, want in ((est.ci_low, ref.low), (est.ci_high, ref.high)):
        assert (np.isnan(got) and np.isnan(want)) or got == want
    assert est.n == n


def test_invariance_per_class_matches_a_plain_loop_on_imbalanced_classes():
    x, y = _hard(classes=15)
    cos = row_cosines(x, _shifted(x, 0.5))
    overall, per_class = invariance(cos, y, 16)  # class 15 has no rows: left out
    assert overall["cosine_median"].value == np.median(cos)
    assert overall["cosine_p05"].value == np.quantile(cos, 0.05)
    assert overall["cosine_mean"].value == pytest.approx(cos.mean(), abs=1e-15)
    assert sorted(per_class) == list(range(15))
    for c, s in per_class.items():
        assert s["cosine_median"].value == np.median(cos[y == c])
        assert s["cosine_p05"].value == np.percentile(cos[y == c], 5)
        assert s["cosine_median"].n == int((y == c).sum())
        lo, hi = s["cosine_median"].ci_low, s["cosine_median"].ci_high
        assert np.isnan(lo) or lo <= s["cosine_median"].value <= hi


def test_shift_scores_match_a_plain_paired_bootstrap():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, 300)
    pc = np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300))
    pp = np.where(rng.random(300) < 0.8, pc, rng.integers(0, 5, 300))
    got = shift_scores(y, pc, pp, n_boot=500, seed=7)
    assert got["accuracy_clean"].value == np.mean(pc == y)
    assert got["accuracy"].value == np.mean(pp == y)
    assert got["agreement"].value == np.mean(pc == pp)
    assert got["drop"].value == pytest.approx(np.mean(pc == y) - np.mean(pp == y), abs=1e-15)
    assert got["retained"].value == pytest.approx(np.mean(pp == y) / np.mean(pc == y), abs=1e-15)
    idx = np.random.default_rng(7).integers(0, 300, size=(500, 300))  # the same resamples, plainly
    diffs = (pc == y)[idx].mean(axis=1) - (pp == y)[idx].mean(axis=1)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    assert (got["drop"].ci_low, got["drop"].ci_high) == pytest.approx((lo, hi), abs=1e-12)
    assert got["drop"].ci_low > 0  # the perturbed predictions really are worse


def _knn_reference(gallery, labels, queries, k, n_classes, temperature=TEMPERATURE):
    """Exhaustive temperature-weighted kNN: float64 scores, ties to the lower gallery index, vote ties
    to the lower class."""
    s = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(gallery)), s.shape), -s), axis=1)[:, :k]
    top = np.take_along_axis(s, order, axis=1)
    w = np.exp((top - top[:, :1]) / temperature)
    votes = np.zeros((len(queries), n_classes))
    for j in range(k):
        np.add.at(votes, (np.arange(len(queries)), labels[order[:, j]]), w[:, j])
    return votes.argmax(axis=1)


def test_knn_label_agreement_matches_exhaustive_neighbours():
    x, y = _hard(n=360, classes=10, seed=2)
    xp = _shifted(x, 0.6, seed=5)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    folds = [(np.sort(perm[:240]), np.sort(perm[240:])), (np.sort(perm[120:]), np.sort(perm[:120]))]
    ks = (1, 5, 10)

    def fit(train):
        head = KNNHead(ks, TEMPERATURE, 10).fit(x[train], y[train])
        return lambda rows: {f"knn@{k}": p for k, p in head.predict_all(rows).items()}

    clean, (shifted,) = clean_trained_predictions(fit, x, [xp], folds, len(y))
    for k in ks:
        ref_c, ref_p = np.full(len(y), -1), np.full(len(y), -1)
        for train, test in folds:
            ref_c[test] = _knn_reference(x[train], y[train], x[test], k, 10)
            ref_p[test] = _knn_reference(x[train], y[train], xp[test], k, 10)
        np.testing.assert_array_equal(clean[f"knn@{k}"], ref_c)
        np.testing.assert_array_equal(shifted[f"knn@{k}"], ref_p)
        agree = shift_scores(y, clean[f"knn@{k}"], shifted[f"knn@{k}"], n_boot=0)["agreement"].value
        assert agree == np.mean(ref_c == ref_p)
        assert 0.2 < agree < 1.0  # neither trivial nor all lost


def test_identical_twin_keeps_everything_and_a_class_rotation_loses_everything():
    rng = np.random.default_rng(4)
    classes, per = 4, 30
    centres = _unit(rng.normal(size=(classes, 16)))
    y = np.repeat(np.arange(classes), per)
    x = _unit(centres[y] + 0.05 * rng.normal(size=(len(y), 16))).astype(np.float32)
    train = np.concatenate([np.arange(c * per, c * per + 20) for c in range(classes)])
    test = np.setdiff1d(np.arange(len(y)), train)
    # rotate classes on the test rows: row i of class c gets the embedding of a test row of class c + 1
    rotated = x.copy()
    by_class = [test[y[test] == c] for c in range(classes)]
    for c in range(classes):
        rotated[by_class[c]] = x[by_class[(c + 1) % classes]]

    def fit(tr):
        head = PrototypeHead(classes).fit(x[tr], y[tr])
        return lambda rows: {"proto": head.predict(rows)}

    clean, (same, moved) = clean_trained_predictions(fit, x, [x.copy(), rotated], [(train, test)], len(y))
    assert (clean["proto"][test] == y[test]).all()  # separable: a sound baseline
    ident = shift_scores(y[test], clean["proto"][test], same["proto"][test], n_boot=50)
    assert ident["drop"].value == 0 and ident["retained"].value == 1 and ident["agreement"].value == 1
    rot = shift_scores(y[test], clean["proto"][test], moved["proto"][test], n_boot=50)
    assert rot["accuracy"].value == 0 and rot["drop"].value == 1 and rot["agreement"].value == 0
    np.testing.assert_array_equal(moved["proto"][test], (y[test] + 1) % classes)


# ---- one task, as the evaluation plans it ----------------------------------------------------------


def _task_arrays(x, meta, prompt_emb=None, templates=()):
    task = next(t for t in derive_tasks(meta) if t.column == "label_name")
    return TaskArrays(
        task, task.rows, x[task.rows], task.y, meta.iloc[task.rows].reset_index(drop=True), prompt_emb, templates
    )


def _rows(out):
    return pd.DataFrame(out.records)


def _value(t, head, metric, key):
    r = t[(t["head"] == head) & (t["metric"] == metric) & (t["stratum"] == f"perturb={key}")]
    assert len(r) == 1, (head, metric, key, len(r))
    return r.iloc[0]


def test_clean_scores_of_a_twin_are_the_clean_evaluations_and_an_identical_twin_drops_nothing():
    x, y = _hard(n=200, dim=32, classes=6, seed=1)
    meta = pd.DataFrame({"label_name": [f"c{i}" for i in y], "dataset": "synth"})
    t = _task_arrays(x, meta)
    cfg = FAST
    out = evaluate_twins(t, [("blur:1", x.copy()), ("blur:2", _shifted(x, 0.8))], cfg)
    rows = _rows(out)
    assert set(rows["task"]) == {f"robustness/{t.task.name}"}
    clean = pd.DataFrame(evaluate_task(t, cfg).records)
    for head in ("lp", "proto", "knn@1", "knn@10"):
        want = clean[(clean["head"] == head) & (clean["metric"] == "accuracy") & (clean["stratum"] == "all")]
        for key in ("blur:1", "blur:2"):  # the same folds and fits as the clean evaluation
            assert _value(rows, head, "accuracy_clean", key)["value"] == want["value"].iloc[0]
        same = {m: _value(rows, head, m, "blur:1")["value"] for m in ("drop", "retained", "agreement")}
        assert same == {"drop": 0.0, "retained": 1.0, "agreement": 1.0}
        assert _value(rows, head, "drop", "blur:2")["value"] > 0
    assert _value(rows, "invariance", "cosine_median", "blur:1")["value"] == pytest.approx(1.0, abs=1e-12)
    assert _value(rows, "invariance", "cosine_median", "blur:2")["value"] < 0.99
    per_class = rows[rows["stratum"].str.startswith("perturb=blur:2;class=")]
    assert len(per_class) == 2 * t.task.n_classes  # median and 5th percentile per class
    assert len(plan_task(t, cfg).folds) == cfg.folds


# ---- evaluate and compare end to end ---------------------------------------------------------------

SOURCES = {"histo": ["tumour", "stroma", "fat"], "fluo": ["tumour", "stroma", "nuclei"], "em": ["fat", "nuclei"]}
TEMPLATES = ("a microscopy image of {}.",)


def _meta(sources, rows, rng):
    parts = []
    for name, classes in sources.items():
        labels = rng.choice(classes, size=rows)
        labels[: len(classes)] = classes
        parts.append(pd.DataFrame({"label_name": labels, "dataset": name, "modality": f"mod-{name}"}))
    return pd.concat(parts, ignore_index=True)


def _write(path, dataset, meta, model, seed, severities):
    """A clean run and its twins: blur moves rows further with severity, rotate scrambles within class."""
    rng = np.random.default_rng(seed)
    dim = 24
    directions = {c: _unit(rng.normal(size=dim)) for c in sorted(set(meta["label_name"]) | set(meta["modality"]))}
    x = _unit(
        np.stack([directions[c] for c in meta["label_name"]])
        + 0.5 * np.stack([directions[m] for m in meta["modality"]])
        + 0.15 * rng.normal(size=(len(meta), dim))
    ).astype(np.float32)
    texts = {}
    for task in derive_tasks(meta):
        for cls, row in zip(task.classes, prompt_texts(task.classes, TEMPLATES), strict=True):
            for t in row:
                texts.setdefault(t, _unit(directions[cls] + 0.8 * rng.normal(size=dim)))
    write_run(path, x, meta, text_vectors=texts, templates=TEMPLATES, model=model, dataset=dataset)
    for sev in severities:
        xp = _unit(x + 0.4 * sev * rng.normal(size=x.shape) / np.sqrt(dim)).astype(np.float32)
        write_run(
            path,
            xp,
            meta,
            text_vectors=texts,
            templates=TEMPLATES,
            model=model,
            dataset=dataset,
            perturbation=f"blur:{sev}",
        )
    fails = [""] * len(meta)
    fails[3] = "unreadable after rotation"  # a row failed in one twin only: left out of every robustness unit
    rotated = x[rng.permutation(len(x))]
    write_run(
        path,
        rotated,
        meta,
        text_vectors=texts,
        templates=TEMPLATES,
        model=model,
        dataset=dataset,
        perturbation="rotate:90",
        failures=fails,
    )


@pytest.fixture(scope="module")
def robust_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("robust") / "s.zarr"
    rng = np.random.default_rng(0)
    multi = _meta(SOURCES, 45, rng)
    single = _meta({"histo": SOURCES["histo"]}, 90, rng)
    for i, model in enumerate(("synthetic:a", "synthetic:b")):
        _write(path, "multi", multi, model, 10 + i, (1, 2, 4))
        _write(path, "single", single, model, 20 + i, (1, 2) if i else (1, 2, 4))  # b lacks blur:4
    return path


@pytest.mark.slow
def test_evaluate_and_compare_answer_what_survives_each_perturbation(robust_store, tmp_path):
    st = EmbeddingStore(robust_store)
    assert len(st.runs()) == 4 and all(r.perturbation is None for r in st.runs())
    res = api.evaluate(robust_store, FAST, results_dir=tmp_path / "res")
    t = res.table
    rob = t[t["task"].str.startswith("robustness/")]
    assert set(rob["dataset"]) == {"multi", "single"}
    fine = {f"robustness/fine/{s}" for s in SOURCES}
    assert set(rob[rob["dataset"] == "multi"]["task"]) == {"robustness/coarse/modality", *fine}
    assert set(rob[rob["dataset"] == "single"]["task"]) == {"robustness/fine/histo"}
    lt = long_table(t)
    assert set(lt["perturbation"]) == {"blur", "rotate"}
    lp = lt[(lt["head"] == "lp") & (lt["metric"] == "accuracy")]
    a = lp[(lp["model"] == "synthetic:a") & (lp["dataset"] == "multi")]
    by_sev = a[a["perturbation"] == "blur"].groupby("severity")["value"].mean()
    assert by_sev.is_monotonic_decreasing and by_sev.iloc[0] > by_sev.iloc[-1] + 0.05  # more blur, less survives
    rot = lt[(lt["head"] == "invariance") & (lt["metric"] == "cosine_median") & (lt["key"] == "rotate:90")]
    assert (rot["value"] < 0.8).all()  # rows scrambled: far from their clean selves
    n_rot = lt[(lt["key"] == "rotate:90") & (lt["head"] == "lp") & (lt["metric"] == "accuracy")]["n"]
    n_blur = lt[(lt["key"] == "blur:1") & (lt["head"] == "lp") & (lt["metric"] == "accuracy")]["n"]
    assert set(n_rot) == set(n_blur)  # every twin is scored on the rows valid in all of them
    clean_n = t[(t["head"] == "lp") & (t["metric"] == "accuracy") & (t["stratum"] == "all") & (t["dataset"] == "multi")]
    robust_n = lp[(lp["key"] == "blur:1") & (lp["dataset"] == "multi")]
    for task, lost in (("fine/histo", 1), ("fine/fluo", 0)):  # row 3 (histo) failed in the rotate twin
        want = clean_n[(clean_n["task"] == task) & (clean_n["model"] == "synthetic:a")]["n"].iloc[0] - lost
        assert (robust_n[robust_n["task"] == task]["n"] == want).all()
    zs = lt[(lt["head"] == "zs_prompt") & (lt["metric"] == "drop")]
    assert len(zs) and zs["ci_low"].notna().all()  # the alignment drop, with its paired CI
    s = summary(t)
    assert list(s["model"]) == ["synthetic:a", "synthetic:b"]
    assert (s["perturbations"] == 4).all()  # blur:4 is not in both models' single runs, but is in both multi
    pp = per_perturbation(t)
    assert {"perception_drop", "alignment_drop", "cosine_median", "knn_agreement@10"} <= set(pp.columns)
    # a rerun computes nothing: robustness units are cached like every other unit
    again = api.evaluate(robust_store, FAST, results_dir=tmp_path / "res")
    assert again.computed == 0 and again.skipped == res.computed + res.skipped
    cmp = api.compare(tmp_path / "res", report=tmp_path / "report.html")
    names = {p.name for p in cmp.figures}
    assert {"robustness_curves.png", "robustness_heatmap.png"} <= names
    assert "Robustness per model" in (tmp_path / "report.html").read_text()
    assert len(cmp.robustness) == 2


# ---- μ-Bench captions, and twins that cannot be paired -----------------------------------------------


SMALL_SOURCES = [replace(s, rows=s.rows // 2) for s in DEFAULT_SOURCES]


def _twin_of(path, run, x, perturbation, **kw):
    """Write a twin of `run` (its metadata, texts, captions and prompts) with image embeddings `x`."""
    texts = run.texts()
    captions = {k: run.captions(k) for k in run.caption_keys()}
    return write_run(
        path,
        x,
        run.meta(),
        text_vectors=dict(zip(texts, run.text_embeddings(), strict=True)),
        captions=captions,
        templates=run.prompts()["templates"],
        model=run.model_spec,
        dataset="multi",
        perturbation=perturbation,
        **kw,
    )


def test_caption_zero_shot_on_perturbed_images_matches_a_plain_argmax(tmp_path):
    path = multi_source_store(tmp_path / "s.zarr", dim=32, alignment=0.8, sources=SMALL_SOURCES)
    (run,) = EmbeddingStore(path).runs()
    x = run.image_embeddings()
    _twin_of(path, run, x.copy(), "blur:1")
    _twin_of(path, run, _shifted(x, 3.0), "blur:3")
    cfg = EvalConfig(n_boot=50, heads=("zs_caption",))
    t = api.evaluate(path, cfg, tasks=["robustness/mubench"]).table
    assert set(t["task"]) == {"robustness/mubench/coarse", "robustness/mubench/fine"}
    xs, text = _shifted(x, 3.0).astype(np.float64), run.text_embeddings().astype(np.float64)
    for group, keys in (("coarse", [k for k in run.caption_keys() if not k.startswith("class")]), ("fine", None)):
        keys = keys or [k for k in run.caption_keys() if k.startswith("class")]
        right_c, right_p = [], []
        for k in keys:  # the μ-Bench choice, plainly: each row's most similar own option
            options, answer = run.captions(k)
            ok = (answer >= 0) & (options >= 0).any(axis=1)
            for emb, out in ((x.astype(np.float64), right_c), (xs, right_p)):
                s = np.where(options >= 0, np.einsum("nd,nkd->nk", emb, text[np.maximum(options, 0)]), -np.inf)
                out.append((s.argmax(axis=1) == answer)[ok])
        g = t[(t["task"] == f"robustness/mubench/{group}") & (t["head"] == "zs_caption")]
        strong = g[g["stratum"] == "perturb=blur:3"].set_index("metric")["value"]
        same = g[g["stratum"] == "perturb=blur:1"].set_index("metric")["value"]
        assert strong["accuracy_clean"] == pytest.approx(np.concatenate(right_c).mean(), abs=1e-12)
        assert strong["accuracy"] == pytest.approx(np.concatenate(right_p).mean(), abs=1e-12)
        assert strong["drop"] > 0.05 or group == "coarse"  # coarse options differ in strong directions
        assert (same["drop"], same["retained"], same["agreement"]) == (0.0, 1.0, 1.0)


def test_a_twin_with_other_rows_is_refused_in_one_line(tmp_path):
    x, y = _hard(n=60, dim=8, classes=3)
    meta = pd.DataFrame({"label_name": [f"c{i}" for i in y], "dataset": "synth"})
    write_run(tmp_path / "s.zarr", x, meta)
    write_run(tmp_path / "s.zarr", x[:-1], meta.iloc[:-1], perturbation="blur:1")
    with pytest.raises(StoreError, match="rows, its clean run") as err:
        api.evaluate(tmp_path / "s.zarr", EvalConfig(n_boot=0, heads=("proto",)), tasks=["robustness/"])
    assert "\n" not in str(err.value)


# ---- reading results back: matched severities, curves and figures ---------------------------------


def _results(rows):
    """A results table from (model, task, head, metric, key, value) tuples."""
    return pd.DataFrame(
        [
            {
                "model": m,
                "dataset": "d",
                "task": f"robustness/{t}",
                "head": h,
                "metric": me,
                "stratum": f"perturb={k}",
                "value": v,
                "ci_low": np.nan,
                "ci_high": np.nan,
                "n": 10,
                "seed": None,
            }
            for m, t, h, me, k, v in rows
        ]
    )


def test_summary_compares_models_on_matched_perturbations_and_tasks(tmp_path):
    rows = []
    for model, base in (("a", 0.1), ("b", 0.2)):
        for key, sev in (("noise:20", 1), ("noise:5", 2), ("blur:1", 1)):
            for task in ("t1", "t2"):
                rows.append((model, task, "lp", "drop", key, base * sev))
                rows.append((model, task, "lp", "accuracy", key, 0.9 - base * sev))
                rows.append((model, task, "lp", "accuracy_clean", key, 0.9))
                rows.append((model, task, "zs_prompt", "drop", key, base / 2))
                rows.append((model, task, "invariance", "cosine_median", key, 1 - base * sev))
    rows.append(("a", "t1", "lp", "drop", "blur:4", 0.9))  # only model a has blur:4: not matched
    rows.append(("a", "t3", "lp", "drop", "blur:1", 0.9))  # only model a has t3: not matched
    rows.append(("c", "t1", "lp", "drop", "blur:1", 0.3))  # an image-only model, blur:1 only
    table = _results(rows)
    pp = per_perturbation(table)
    a = pp[pp["model"] == "a"].set_index("key")
    assert a.loc["blur:1", "perception_drop"] == pytest.approx(0.1)  # t3 left out: c lacks it
    assert a.loc["blur:4", "perception_drop"] == pytest.approx(0.9)
    assert a.loc["blur:1", "alignment_drop"] == pytest.approx(0.05)  # c has no zero-shot: a and b still compared
    s = summary(table).set_index("model")
    assert list(s.index) == ["a", "b", "c"] and (s["perturbations"] == 1).all()  # blur:1 is the only shared key
    assert s.loc["b", "perception_drop"] == pytest.approx(0.2) and s.loc["c", "perception_drop"] == pytest.approx(0.3)
    assert np.isnan(s.loc["c", "alignment_drop"]) and s.loc["a", "alignment_drop"] == pytest.approx(0.05)


def test_severity_curves_order_by_strength_and_start_clean(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mubench_probe import report_robustness
    from mubench_probe.report import palette

    rows = []
    for model, base in (("a", 0.1), ("b", 0.2)):
        for key, sev in (("noise:20", 1), ("noise:5", 2), ("rotate:90", 3)):
            rows.append((model, "t1", "lp", "accuracy", key, 0.9 - base * sev))
            rows.append((model, "t1", "lp", "accuracy_clean", key, 0.9))
            rows.append((model, "t1", "lp", "drop", key, base * sev))
            rows.append((model, "t1", "invariance", "cosine_median", key, 1 - base * sev))
    table = _results(rows)
    pts = report_robustness.curve_points(table)
    lp = pts[(pts["measure"].str.startswith("perception")) & (pts["model"] == "b") & (pts["perturbation"] == "noise")]
    assert list(lp["key"]) == ["clean", "noise:20", "noise:5"]  # a smaller SNR is a stronger perturbation
    assert list(lp["value"]) == pytest.approx([0.9, 0.7, 0.5])
    cos = pts[pts["measure"].str.startswith("invariance") & (pts["model"] == "a") & (pts["key"] == "clean")]
    assert list(cos["value"]) == [1.0, 1.0]  # the clean end of each perturbation's curve
    drawn = dict(report_robustness.figures(table, tmp_path, lambda: plt, palette))
    assert all(p is not None and p.stat().st_size > 10_000 for p in drawn.values()), drawn
    assert report_robustness.figures(table[table["model"] == "nobody"], tmp_path, lambda: plt, palette) == []


@pytest.mark.slow
def test_probe_evaluate_prints_the_robustness_summary_per_model(robust_store, tmp_path):
    from typer.testing import CliRunner

    from mubench_probe.cli import app
    from mubench_probe.results import ResultsDir

    args = ["evaluate", str(robust_store), "--head", "lp", "--head", "zs_prompt", "--bootstrap", "0"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "res")], terminal_width=250)
    assert r.exit_code == 0, r.output
    title = "robustness (means over the perturbations every model has)"
    assert title in r.output
    table = r.output.split(title, 1)[1]
    summary = api.robustness_summary(ResultsDir(tmp_path / "res").load()[0])
    assert {"perception_drop", "alignment_drop"} <= set(summary.columns) and len(summary) == 2
    for _, row in summary.iterrows():
        line = next(line for line in table.splitlines() if row["model"] in line)
        assert f"{row['perception_drop']:.3f}" in line and f"{row['alignment_drop']:.3f}" in line


def test_clean_runs_keep_their_cache_identity_now_that_perturbation_is_an_identity_key(tmp_path):
    """Results cached before perturbed runs existed are still found: a clean run's hash is the old one."""
    import hashlib
    import json

    from mubench_probe.evaluation import provenance_hash
    from mubench_probe.store import IDENTITY_KEYS

    meta = _meta({"histo": SOURCES["histo"]}, 20, np.random.default_rng(1))
    x = _unit(np.random.default_rng(2).normal(size=(len(meta), 8))).astype(np.float32)
    clean = write_run(tmp_path / "s.zarr", x, meta)
    twin = write_run(tmp_path / "s.zarr", x, meta, perturbation="blur:1")
    before = {k: clean.provenance.get(k) for k in IDENTITY_KEYS if k != "perturbation"}
    old_hash = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert provenance_hash(clean) == old_hash
    assert provenance_hash(twin) != provenance_hash(clean)
