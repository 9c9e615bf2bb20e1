"""Phenotypic-activity mAP against plain references written from the definition.

Test embeddings are snapped to the 2^-24 grid `scoring` rounds to: then float64 `x @ x.T` is itself
exact (48-bit products, sums within 53 bits), so the plain reference ranks exactly as the function does
and the two agree to rounding (1e-12), not just to the grid's 1e-7.
"""

from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from mubench_probe.heads.phenotypic import (
    ap_matrix,
    benjamini_hochberg,
    null_ap,
    phenotypic_map,
    random_subsets,
    ranked_ap,
)
from mubench_probe.heads.scoring import exact_scores


def snap(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return (np.rint(x * 2.0**24) / 2.0**24).astype(np.float32)


def hard_data(seed: int = 0, n: int = 600, d: int = 32, batch_effect: float = 2.0):
    """Imbalanced classes, 4 batches with a strong batch offset, class 7 in one batch only, class 8 a singleton."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(8, n, p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    batches = rng.integers(0, 4, n)
    batches[labels == 7] = 2
    labels[0] = 8
    centres, offsets = rng.standard_normal((9, d)), rng.standard_normal((4, d))
    x = 0.6 * centres[labels] + batch_effect * offsets[batches] + rng.standard_normal((n, d))
    return snap(x), labels, np.array([f"plate-{b}" for b in batches])


def reference_map(x, labels, batches, naive: bool = False) -> dict[int, tuple[float, int, int]]:
    """Per class (mAP, queries, excluded) with sklearn's AP, one query at a time (no ties in the data).

    naive: positives are the same label in any batch (the definition this module must not use)."""
    s = x.astype(np.float64) @ x.astype(np.float64).T
    aps, excluded = {}, {}
    for i in range(len(x)):
        c = int(labels[i])
        aps.setdefault(c, [])
        excluded.setdefault(c, 0)
        same = labels == labels[i]
        pos = same & (np.ones(len(x), bool) if naive else batches != batches[i])
        pos[i] = False
        neg = ~same
        if not pos.any() or not neg.any():
            excluded[c] += 1
            continue
        scores = np.concatenate([s[i, pos], s[i, neg]])
        assert len(np.unique(scores)) == len(scores), "reference needs data without ties"
        truth = np.concatenate([np.ones(pos.sum()), np.zeros(neg.sum())])
        aps[c].append(average_precision_score(truth, scores))
    return {c: (float(np.mean(a)) if a else np.nan, len(a), excluded[c]) for c, a in aps.items()}


def tie_reference_map(x, labels, batches) -> dict[int, float]:
    """Per class mAP ranking by (-exact score, row index): the definition, with ties, one query at a time."""
    s = exact_scores(x, x)
    out = {}
    for i in range(len(x)):
        cands = [j for j in range(len(x)) if labels[j] != labels[i] or batches[j] != batches[i]]
        ranked = sorted(cands, key=lambda j: (-s[i, j], j))
        is_pos = [labels[j] == labels[i] for j in ranked]
        if not any(is_pos) or all(is_pos):
            continue
        hits, precisions = 0, []
        for rank, p in enumerate(is_pos, start=1):
            if p:
                hits += 1
                precisions.append(hits / rank)
        out.setdefault(int(labels[i]), []).append(np.mean(precisions))
    return {c: float(np.mean(a)) for c, a in out.items()}


@pytest.fixture(scope="module")
def hard():
    x, labels, batches = hard_data()
    return x, labels, batches, phenotypic_map(x, labels, batches, n_perm=200), reference_map(x, labels, batches)


def test_matches_sklearn_reference_on_hard_data(hard):
    _, labels, _, df, ref = hard
    assert df["class"].tolist() == sorted(ref)
    for row in df.itertuples():
        m, nq, ne = ref[row[1]]
        assert (row.n_queries, row.n_excluded) == (nq, ne)
        if nq:
            assert abs(row.mean_average_precision - m) < 1e-12
        else:
            assert np.isnan(row.mean_average_precision) and np.isnan(row.p_value) and np.isnan(row.q_value)
    # the one-batch class and the singleton have no positives: excluded, counted, not scored
    assert df.set_index("class").loc[[7, 8], ["n_queries", "n_excluded"]].values.tolist() == [
        [0, int((labels == 7).sum())],
        [0, 1],
    ]
    assert list(df.columns) == ["class", "mean_average_precision", "p_value", "q_value", "n_queries", "n_excluded"]


def test_positives_are_other_batches_only(hard):
    """Counting same-batch same-label rows as positives rewards the batch effect: the result must differ."""
    x, labels, batches, df, ref = hard
    naive = reference_map(x, labels, batches, naive=True)
    ours = df.set_index("class")["mean_average_precision"]
    for c in range(7):
        assert abs(ours[c] - ref[c][0]) < 1e-12
        assert naive[c][0] - ours[c] > 0.05  # with a strong batch effect, same-plate positives rank far higher


def test_block_size_and_batch_id_type_change_nothing(hard):
    x, labels, batches, df, _ = hard
    pd.testing.assert_frame_equal(df, phenotypic_map(x, labels, batches, n_perm=200, block_rows=7), check_exact=True)
    codes = pd.factorize(batches)[0] * 10 + 3  # the same batches under other ids
    pd.testing.assert_frame_equal(df, phenotypic_map(x, labels, codes, n_perm=200, block_rows=1), check_exact=True)


def test_ties_rank_the_lower_row_first():
    """Duplicated vectors under other labels and batches: positives tie with negatives everywhere."""
    rng = np.random.default_rng(1)
    base = snap(rng.standard_normal((15, 8)) + 2.0 * rng.standard_normal((1, 8)))
    x = base[rng.integers(0, 15, 160)]
    labels, batches = rng.integers(0, 4, 160), rng.integers(0, 3, 160)
    df = phenotypic_map(x, labels, batches, n_perm=50)
    ref = tie_reference_map(x, labels, batches)
    got = df.set_index("class")["mean_average_precision"]
    assert sorted(ref) == got.index.tolist()
    for c, m in ref.items():
        assert abs(got[c] - m) < 1e-12
    pd.testing.assert_frame_equal(df, phenotypic_map(x, labels, batches, n_perm=50, block_rows=7), check_exact=True)


def test_duplicated_rows_give_the_same_result_in_any_order():
    """Rows repeated whole (vector, label, batch) tie only with themselves: row order then cannot matter."""
    x, labels, batches = hard_data(seed=2, n=200)
    rep = np.random.default_rng(3).integers(0, 3, 200) + 1
    x, labels, batches = np.repeat(x, rep, axis=0), np.repeat(labels, rep), np.repeat(batches, rep)
    df = phenotypic_map(x, labels, batches, n_perm=100)
    for seed in range(2):
        perm = np.random.default_rng(seed).permutation(len(x))
        for block in (None, 7):
            other = phenotypic_map(x[perm], labels[perm], batches[perm], n_perm=100, block_rows=block)
            pd.testing.assert_frame_equal(df, other, check_exact=True)


def test_strong_signal_has_the_smallest_p_value():
    rng = np.random.default_rng(4)
    labels, batches = rng.integers(0, 5, 300), rng.integers(0, 3, 300)
    x = snap(
        4.0 * rng.standard_normal((5, 16))[labels]
        + 0.5 * rng.standard_normal((3, 16))[batches]
        + rng.standard_normal((300, 16))
    )
    df = phenotypic_map(x, labels, batches, n_perm=300)
    assert (df["mean_average_precision"] > 0.9).all()
    assert (df["p_value"] == 1 / 301).all()
    assert np.allclose(df["q_value"], 1 / 301)


def test_noise_p_values_are_not_small_and_are_deterministic():
    rng = np.random.default_rng(5)
    x = snap(rng.standard_normal((500, 16)))
    labels, batches = rng.integers(0, 20, 500), rng.integers(0, 4, 500)
    df = phenotypic_map(x, labels, batches, n_perm=200, seed=7)
    assert df["p_value"].median() > 0.2
    assert df["p_value"].min() > 1 / 201
    pd.testing.assert_frame_equal(df, phenotypic_map(x, labels, batches, n_perm=200, seed=7), check_exact=True)
    assert not df["p_value"].equals(phenotypic_map(x, labels, batches, n_perm=200, seed=8)["p_value"])
    assert phenotypic_map(x, labels, batches, n_perm=0)["p_value"].isna().all()


@pytest.mark.parametrize("n_pos,total", [(2, 5), (4, 5), (3, 6)])
def test_null_is_a_uniformly_random_ranking(n_pos, total):
    """Every placement of the positives equally often: compare with the exact distribution of AP."""
    exact = {}
    for ranks in combinations(range(1, total + 1), n_pos):
        ap = round(float(np.mean([k / r for k, r in enumerate(ranks, start=1)])), 12)
        exact[ap] = exact.get(ap, 0) + 1
    draws = null_ap(n_pos, total, 20_000, seed=0)
    values, counts = np.unique(np.round(draws, 12), return_counts=True)
    assert set(values.tolist()) == set(exact)
    n_subsets = sum(exact.values())
    for v, c in zip(values, counts, strict=True):
        expected = 20_000 * exact[float(v)] / n_subsets
        assert abs(c - expected) < 5 * np.sqrt(expected)  # five standard deviations
    sub = random_subsets(np.random.default_rng(0), 300, 40, 100)
    assert (np.diff(sub, axis=1) > 0).all() and sub.min() >= 0 and sub.max() < 100
    # the null's AP and the observed AP are bitwise one formula (a tie between them counts as >=)
    rank = sub + 1
    assert np.array_equal(ap_matrix(rank), ranked_ap(np.repeat(np.arange(300), 40), rank.ravel(), np.full(300, 40)))


def test_benjamini_hochberg():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.04, 0.9])
    # sorted: 0.01 0.03 0.04 0.04 0.2 0.9 -> x6/rank: 0.06 0.09 0.06 0.06 0.24 0.9 -> running min from the end
    assert np.allclose(benjamini_hochberg(p), [0.06, 0.06, 0.06, 0.24, 0.06, 0.9])
    assert np.array_equal(np.isnan(benjamini_hochberg([np.nan, 0.5])), [True, False])
    assert benjamini_hochberg([0.5, np.nan])[0] == 0.5
    rng = np.random.default_rng(0)
    ps = np.concatenate([rng.uniform(size=200) ** 3, [1.0, 1.0, 0.5, 0.5]])
    q = benjamini_hochberg(ps)
    assert (q <= 1).all() and (np.diff(q[np.argsort(ps)]) >= 0).all()
    stats = pytest.importorskip("scipy.stats")
    if hasattr(stats, "false_discovery_control"):
        assert np.allclose(q, stats.false_discovery_control(ps, method="bh"), rtol=1e-14, atol=0)
