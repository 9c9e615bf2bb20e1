"""Not-same-batch kNN, batch-effect index and calibration against exhaustive plain references.

The data are hard on purpose: anisotropic, a strong batch effect (a batch offset added, then
renormalised), imbalanced and many classes, and exact duplicates (on a coarse grid, where float64
products are exact in any order, so the plain reference ranks ties exactly).
"""

import numpy as np
import pandas as pd
import pytest

from mubench_probe.heads import confounders, scoring
from mubench_probe.heads.confounders import (
    batch_effect_index,
    expected_calibration_error,
    knn_nsb_predict,
    neighbours_not_same_batch,
    reliability_curve,
    softmax_scores,
)
from mubench_probe.heads.knn import KNNHead, weighted_votes
from mubench_probe.heads.scoring import RowView

PATHS = {  # which search finds the neighbours: the automatic choice, or each one forced
    "auto": {},
    "restricted": {"OVERFETCH_CELLS": -1},
    "overfetch": {"OVERFETCH_CELLS": 1 << 40},
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    for name, value in PATHS[request.param].items():
        monkeypatch.setattr(confounders, name, value)
    return request.param


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def confounded(n, d, n_classes, n_batches, batch_strength, class_strength=1.0, seed=0, coupling=0.0):
    """Anisotropic embeddings: class centres + batch offsets (renormalised); imbalanced classes and batches.

    `coupling`: probability that a row's batch is its class's "home" batch (batch carries the class)."""
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.sqrt(np.arange(1, d + 1))  # anisotropic: a decaying spectrum
    y = rng.choice(n_classes, size=n, p=rng.dirichlet(np.full(n_classes, 0.7)))
    b = rng.choice(n_batches, size=n, p=rng.dirichlet(np.full(n_batches, 2.0)))
    home = rng.integers(0, n_batches, size=n_classes)
    coupled = rng.random(n) < coupling
    b = np.where(coupled, home[y], b)
    centres = unit(rng.normal(size=(n_classes, d)) * spectrum)
    offsets = unit(rng.normal(size=(n_batches, d)) * spectrum)
    x = class_strength * centres[y] + batch_strength * offsets[b] + 0.35 * rng.normal(size=(n, d)) * spectrum
    return unit(x), y, b


def brute_nsb(g, gb, q, qb, k):
    """Full float64 score matrix, same batch masked to -inf, ranked by (-score, row); padded to k."""
    s = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
    s[np.asarray(qb)[:, None] == np.asarray(gb)[None, :]] = -np.inf
    ids = np.broadcast_to(np.arange(len(g)), s.shape)
    order = np.lexsort((ids, -s), axis=1)[:, :k]
    sc = np.take_along_axis(s, order, axis=1)
    rows = np.where(np.isfinite(sc), order, -1)
    pad = k - sc.shape[1]
    return np.pad(sc, ((0, 0), (0, pad)), constant_values=-np.inf), np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)


def min_gap(g, gb, q, qb, k):
    """Smallest gap between consecutive scores in the reference's top k + 1 (near-ties make a test flaky)."""
    s, _ = brute_nsb(g, gb, q, qb, k + 1)
    d = s[:, :-1] - s[:, 1:]
    return np.nanmin(np.where(np.isfinite(d), d, np.inf))


def check_same(got, ref):
    (gs, gr), (rs, rr) = got, ref
    assert gs.shape == rs.shape and gr.dtype.kind == "i"
    np.testing.assert_array_equal(gr, rr)
    np.testing.assert_array_equal(np.isfinite(gs), np.isfinite(rs))
    np.testing.assert_allclose(gs[np.isfinite(gs)], rs[np.isfinite(rs)], atol=2e-7)


@pytest.mark.parametrize(("n_batches", "k"), [(4, 10), (150, 7)])
def test_nsb_matches_brute_force(path, n_batches, k):
    """Few sources (one holding most rows) and many patients; one query batch absent from the gallery."""
    x, _, b = confounded(1600, 24, 30, n_batches, batch_strength=1.5, seed=1)
    if n_batches == 4:
        b = np.where(np.random.default_rng(1).random(len(b)) < 0.6, 0, b)  # batch 0: > half the gallery
    g, gb, q, qb = x[:1300], b[:1300], x[1300:], b[1300:].copy()
    qb[:20] = 999  # a batch the gallery does not have: every row eligible
    assert min_gap(g, gb, q, qb, k) > 1e-6, "the data must not hinge on rounding"
    check_same(neighbours_not_same_batch(g, gb, q, qb, k), brute_nsb(g, gb, q, qb, k))


def test_nsb_pads_when_too_few_rows_are_eligible(path):
    x, _, _ = confounded(40, 8, 3, 1, batch_strength=0.0, seed=3)
    gb = np.array(["a"] * 20 + ["b"] * 5 + ["c"] * 3)
    g, q = x[:28], x[28:]
    qb = np.array(["a", "b", "c", "d"] * 3)
    got = neighbours_not_same_batch(g, gb, q, qb, 12)
    check_same(got, brute_nsb(g, gb, q, qb, 12))
    assert (got[1][qb == "a"][:, 8:] == -1).all() and (got[1][qb == "d"] >= 0).all()
    only = neighbours_not_same_batch(g[:20], gb[:20], q, np.array(["a"] * len(q)), 3)  # nothing eligible
    assert (only[1] == -1).all() and np.isneginf(only[0]).all()


@pytest.mark.parametrize("n_batches", [3, 60])
def test_nsb_duplicates_tie_by_index(path, n_batches):
    """Many exact duplicates in several batches: ties go to the lower gallery row, exactly."""
    rng = np.random.default_rng(n_batches)
    base = rng.integers(-4, 5, size=(25, 6)) / 8.0  # a coarse grid: every float64 product is exact
    g = base[rng.integers(0, len(base), size=900)].astype(np.float32)  # ~36 copies of each row
    gb = rng.integers(0, n_batches, size=len(g))
    q = base[rng.integers(0, len(base), size=120)].astype(np.float32)
    qb = rng.integers(0, n_batches, size=len(q))
    got = neighbours_not_same_batch(g, gb, q, qb, 15)
    check_same(got, brute_nsb(g, gb, q, qb, 15))
    assert (np.diff(got[1][:, :5], axis=1) > 0).all(), "the top duplicates come in row order"


def test_rowview_gallery_equals_array_gallery(path, monkeypatch):
    monkeypatch.setattr(scoring, "GATHER_ROWS", 97)  # RowView searches gather many small blocks
    x, _, b = confounded(2200, 16, 12, 5, batch_strength=1.2, seed=7)
    rows = np.random.default_rng(0).permutation(2000)[:1500]
    g, gb = RowView(x, rows), b[rows]
    q, qb = x[2000:], b[2000:]
    got = neighbours_not_same_batch(g, gb, q, qb, 9)
    assert min_gap(x[rows], gb, q, qb, 9) > 1e-6
    check_same(got, neighbours_not_same_batch(x[rows], gb, q, qb, 9))
    check_same(got, brute_nsb(x[rows], gb, q, qb, 9))


def test_knn_nsb_predict_votes_and_no_neighbour():
    x, y, b = confounded(1200, 16, 8, 6, batch_strength=1.0, seed=11)
    g, yg, gb, q, qb = x[:1000], y[:1000], b[:1000], x[1000:], b[1000:].copy()
    ks = (1, 5, 20)
    got = knn_nsb_predict(g, yg, gb, q, qb, ks, n_classes=8)
    s, r = brute_nsb(g, gb, q, qb, 20)
    ref = weighted_votes(s, yg[r], 8, ks, 0.07)
    for k in ks:
        np.testing.assert_array_equal(got[k], ref[k])
    # a query whose batch is the whole gallery gets no neighbour: predicted -1
    alone = knn_nsb_predict(g[gb == 0], yg[gb == 0], gb[gb == 0], q[:5], np.zeros(5, int), ks, 8)
    assert all((p == -1).all() for p in alone.values())
    # few eligible neighbours: missing ones get no vote
    few = knn_nsb_predict(g[:3], yg[:3], np.array([1, 2, 3]), q[:4], np.array([1, 1, 2, 9]), (5,), 8)[5]
    assert few.tolist()[0] in {yg[1], yg[2]} and few.tolist()[3] in set(yg[:3])


def test_nsb_knn_is_worse_when_batch_carries_the_class():
    """Each class mostly sits in its own batch: plain kNN matches on the batch, NSB cannot."""
    x, y, b = confounded(3000, 32, 10, 10, batch_strength=1.3, class_strength=0.5, coupling=0.9, seed=5)
    g, yg, gb, q, yq, qb = x[:2400], y[:2400], b[:2400], x[2400:], y[2400:], b[2400:]
    plain = (KNNHead(ks=(10,), n_classes=10).fit(g, yg).predict(q) == yq).mean()
    nsb = (knn_nsb_predict(g, yg, gb, q, qb, (10,), 10)[10] == yq).mean()
    assert plain > nsb + 0.15, (plain, nsb)


def brute_batch_index(x, y, b, k):
    """Per row: all float64 scores to the others, itself excluded, ranked by (-score, row)."""
    x = np.asarray(x, np.float64)
    sc = sb = so = os_ = 0
    for i in range(len(x)):
        s = x @ x[i]
        s[i] = -np.inf
        nb = np.lexsort((np.arange(len(x)), -s))[:k]
        same_y, same_b = y[nb] == y[i], b[nb] == b[i]
        sc, sb = sc + same_y.sum(), sb + same_b.sum()
        so, os_ = so + (same_y & ~same_b).sum(), os_ + (~same_y & same_b).sum()
    return {"same_class": sc / (len(x) * k), "same_batch": sb / (len(x) * k), "robustness_index": so / (so + os_)}


def test_batch_effect_index_equals_brute_force_loop_with_duplicates():
    rng = np.random.default_rng(2)
    base = rng.integers(-3, 4, size=(40, 5)) / 4.0  # exact duplicates and exact ties
    pick = rng.integers(0, len(base), size=500)
    x = base[pick].astype(np.float32)
    y = np.where(rng.random(500) < 0.7, pick % 7, rng.integers(0, 7, size=500))
    b = np.array([f"plate{v}" for v in rng.integers(0, 6, size=500)])
    got = batch_effect_index(x, y, b, k=10, n_boot=200, seed=3)
    ref = brute_batch_index(x, y, b, 10)
    for m, v in ref.items():
        assert got[m].value == pytest.approx(v, abs=1e-12), m
        assert got[m].ci_low <= got[m].value <= got[m].ci_high and got[m].n == 500
    assert got == batch_effect_index(x, y, b, k=10, n_boot=200, seed=3), "deterministic with the seed"
    assert (
        batch_effect_index(RowView(x), y, b, k=10, n_boot=0)["robustness_index"].value == got["robustness_index"].value
    )


def test_batch_effect_index_on_continuous_data():
    x, y, b = confounded(700, 20, 15, 4, batch_strength=1.0, seed=9)
    got = batch_effect_index(x, y, b, k=7, n_boot=0)
    for m, v in brute_batch_index(x, y, b, 7).items():
        assert got[m].value == pytest.approx(v, abs=1e-12)
        assert np.isnan(got[m].ci_low)


def test_robustness_index_high_without_batch_structure_low_when_batch_dominates():
    clean = batch_effect_index(*confounded(1500, 32, 6, 5, batch_strength=0.0, class_strength=1.5, seed=1), n_boot=100)
    assert clean["robustness_index"].value > 0.95 and clean["same_class"].value > 0.9
    assert clean["same_batch"].value < 0.4
    dominated = batch_effect_index(*confounded(1500, 32, 6, 5, batch_strength=2.0, class_strength=0.3, seed=1))
    assert dominated["robustness_index"].value < 0.3 and dominated["same_batch"].value > 0.8
    assert dominated["robustness_index"].ci_high < clean["robustness_index"].ci_low


def loop_ece(proba, y, n_bins):
    edges = np.linspace(0, 1, n_bins + 1)
    conf, pred = proba.max(1), proba.argmax(1)
    total = 0.0
    for b in range(n_bins):
        inb = (conf > edges[b]) & (conf <= edges[b + 1])
        if b == 0:
            inb |= conf == 0
        if inb.any():
            total += inb.sum() / len(y) * abs((pred[inb] == y[inb]).mean() - conf[inb].mean())
    return total


def test_ece_hand_computed():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    y = np.array([0, 1, 1, 1, 0, 1])
    # 5 bins of width 0.2, right-closed: conf 0.9, 0.8 -> (0.6, 0.8] gets 0.8; (0.8, 1] gets 0.9
    # bin (0.4, 0.6]: 0.6 (wrong), 0.5 (pred 0, right): acc 0.5, conf 0.55 -> 2/6 * 0.05
    # bin (0.6, 0.8]: 0.8 (wrong), 0.7 (right), 0.8 (right): acc 2/3, conf 0.7667 -> 3/6 * 0.1
    # bin (0.8, 1.0]: 0.9 (right): 1/6 * 0.1
    want = 2 / 6 * 0.05 + 3 / 6 * 0.1 + 1 / 6 * 0.1
    got = expected_calibration_error(proba, y, n_bins=5, n_boot=0)
    assert got.value == pytest.approx(want, abs=1e-12) and got.n == 6
    curve = reliability_curve(proba, y, n_bins=5)
    assert curve["bin"].tolist() == [2, 3, 4] and curve["count"].tolist() == [2, 3, 1]
    np.testing.assert_allclose(curve["accuracy"], [0.5, 2 / 3, 1.0])
    np.testing.assert_allclose(curve["confidence"], [0.55, 2.3 / 3, 0.9])


def test_ece_equals_loop_reference_and_bootstraps():
    rng = np.random.default_rng(4)
    proba = rng.dirichlet(np.full(40, 0.3), size=3000)
    proba[:30] = np.eye(40)[rng.integers(0, 40, size=30)]  # confidence exactly 1
    proba[30:40] = 0.0  # confidence exactly 0: the first bin
    proba[40:60, :5] = 0.2  # confidence on an edge (0.2 = 3/15)
    proba[40:60, 5:] = 0
    y = rng.integers(0, 40, size=3000)
    y[::3] = proba[::3].argmax(1)
    for n_bins in (1, 10, 15):
        got = expected_calibration_error(proba, y, n_bins=n_bins, n_boot=300, seed=1)
        assert got.value == pytest.approx(loop_ece(proba, y, n_bins), abs=1e-12)
        assert got.ci_low <= got.value <= got.ci_high
        assert got == expected_calibration_error(proba, y, n_bins=n_bins, n_boot=300, seed=1)
    curve = reliability_curve(proba, y, 15)
    assert curve["count"].sum() == 3000 and curve["bin"].iloc[0] == 0
    w = curve["count"] / 3000
    assert (w * (curve["accuracy"] - curve["confidence"]).abs()).sum() == pytest.approx(loop_ece(proba, y, 15))


def test_ece_calibrated_sampler_near_zero_overconfident_large():
    rng = np.random.default_rng(0)
    n = 20000
    p = rng.dirichlet(np.full(12, 0.5), size=n)
    y = (rng.random((n, 1)) > p.cumsum(axis=1)).sum(axis=1)  # y ~ p: calibrated by construction
    assert expected_calibration_error(p, y, n_boot=0).value < 0.02
    sharp = p**4 / (p**4).sum(axis=1, keepdims=True)  # the same labels, claimed with more confidence
    over = expected_calibration_error(sharp, y, n_boot=200)
    assert over.value > 0.1 and over.ci_low > 0.08


def test_softmax_scores_stable_and_sums_to_one():
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, size=(50, 7))
    p = softmax_scores(s)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    e = np.exp(100 * s - (100 * s).max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    big = softmax_scores(s, scale=1e5)
    assert np.isfinite(big).all() and (big.argmax(1) == s.argmax(1)).all()


def calibration_table():
    rows = []
    for model in ("clip:a", "siglip:b"):
        for head in ("lp", "zs_prompt", "zs_caption"):
            for task in ("t1", "t2"):
                for b in range(15):
                    conf = (b + 0.5) / 15
                    acc = conf * (0.6 if head != "lp" else 0.95)
                    base = dict(model=model, dataset="d", task=task, head=head, stratum=f"bin={b:02d}", seed=np.nan)
                    n = 10 + b
                    rows.append({**base, "metric": "calibration_accuracy", "value": acc, "n": n})
                    rows.append({**base, "metric": "calibration_confidence", "value": conf, "n": n})
                rows.append(
                    dict(model=model, dataset="d", task=task, head=head, metric="ece", stratum="all", value=0.1, n=300)
                )
    t = pd.DataFrame(rows)
    t["ci_low"], t["ci_high"] = np.nan, np.nan
    return t


def test_reliability_diagram(tmp_path):
    from mubench_probe.report import reliability_diagram

    table = calibration_table()
    out = reliability_diagram(table, tmp_path / "reliability.png")
    assert out == tmp_path / "reliability.png" and out.exists() and out.stat().st_size > 1000
    plain = table[~table["metric"].str.startswith("calibration_")]
    assert reliability_diagram(plain, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
