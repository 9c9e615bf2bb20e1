"""Each head and metric against a plain reference on the same arrays; references are exact by construction."""

from fractions import Fraction

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from mubench_probe.heads import KNNHead, LinearProbe, PromptZeroShot, PrototypeHead, caption_choice
from mubench_probe.heads.knn import search, weighted_votes
from mubench_probe.heads.linear import FALLBACK_C, should_stop, validation_split
from mubench_probe.heads.metrics import classification_metrics, modality_gap, paired_difference
from mubench_probe.heads.retrieval import caption_retrieval
from mubench_probe.heads.scoring import exact_scores, quantize, top_k
from mubench_probe.store import l2_normalize


def test_caption_choice_hand_computed():
    # texts: 0 = east, 1 = north, 2 = west, 3 = south (unit vectors)
    text = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
    img = l2_normalize(np.array([[1, 0.1], [0.1, 1], [-1, -0.2], [0, -1], [1, 0]], dtype=np.float32))
    options = np.array([[1, 0, 2], [0, 1, -1], [3, 2, 0], [0, 1, 2], [1, 2, -1]])
    answer = np.array([1, 1, 0, 0, -1])  # the last entry is null
    valid, chosen, correct = caption_choice(img, text, options, answer)
    assert valid.tolist() == [True, True, True, True, False]
    # image 0 points east -> option 1 (text 0) ; image 1 north -> option 1 ; image 2 west -> option 1 (text 2)
    # image 3 south: options are east/north/west, all equally far -> ties go to the first option
    assert chosen.tolist() == [1, 1, 1, 0, -1]
    assert correct.tolist() == [True, True, False, True, False]


def test_caption_options_with_identical_embeddings_tie_to_the_first_option():
    """Captions that differ only after the tokenizer's context length embed identically: a true tie."""
    rng = np.random.default_rng(0)
    t = l2_normalize(rng.normal(size=(1, 512))).astype(np.float32)
    texts = np.concatenate([l2_normalize(rng.normal(size=(5, 512))).astype(np.float32), t, t, t])
    img = l2_normalize(t + 0.01 * rng.normal(size=(40, 512))).astype(np.float32)
    for perm in ([5, 6, 7], [7, 5, 6], [6, 0, 7, 5]):  # the tied texts at other positions of the table
        options = np.tile(perm, (40, 1))
        _, chosen, _ = caption_choice(img, texts, options, np.zeros(40, dtype=int))
        first_tied = next(i for i, o in enumerate(perm) if o >= 5)
        assert (chosen == first_tied).all()


def test_prompt_zero_shot_ensembles_normalised_templates():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(3, 4, 8))
    head = PromptZeroShot.from_templates(e)
    unit = e / np.linalg.norm(e, axis=-1, keepdims=True)
    ref = unit.mean(axis=1)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(head.weights_, ref, rtol=1e-6)
    x = l2_normalize(rng.normal(size=(200, 8)))
    sims = x.astype(np.float64) @ ref.T
    top2 = np.sort(sims, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-6, "the check below must not hinge on rounding"
    assert (head.predict(x) == sims.argmax(1)).all()
    single = PromptZeroShot.from_templates(e, template=2)
    np.testing.assert_allclose(single.weights_, unit[:, 2], rtol=1e-6)
    # the estimator form: one row per (class, template) prompt
    direct = PromptZeroShot().fit(e.reshape(12, 8), np.repeat(np.arange(3), 4))
    np.testing.assert_array_equal(direct.weights_, head.weights_)


def test_prototype_head_is_cosine_nearest_class_mean_and_never_predicts_absent_classes():
    rng = np.random.default_rng(1)
    x, y = l2_normalize(rng.normal(size=(60, 5))), rng.integers(0, 3, 60)
    head = PrototypeHead().fit(x, y)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    q = l2_normalize(rng.normal(size=(30, 5)))
    assert (head.predict(q) == (q.astype(np.float64) @ means.T).argmax(1)).all()
    # class 3 has no training rows: a zero weight vector would win wherever all others are negative
    four = PrototypeHead(n_classes=4).fit(x, y)
    assert set(four.predict(-q)) <= {0, 1, 2}


def test_heads_are_scikit_learn_estimators():
    x, y = l2_normalize(np.random.default_rng(0).normal(size=(40, 6))), np.arange(40) % 2
    for head in (LinearProbe(patience=3), KNNHead(ks=(1, 3)), PrototypeHead(n_classes=2), PromptZeroShot()):
        twin = clone(head)
        assert twin.get_params() == head.get_params() and twin is not head
    probe = LinearProbe().set_params(C=1.0)
    assert probe.fit(x, y) is probe and probe.C_ == 1.0


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centres = l2_normalize(rng.normal(size=(4, 16)))
    y = rng.integers(0, 4, 400)
    x = l2_normalize(centres[y] + 0.35 * rng.normal(size=(400, 16)))
    return x, y


def test_linear_probe_final_model_is_plain_scikit_learn_at_the_chosen_c(blobs):
    x, y = blobs
    probe = LinearProbe().fit(x[:300], y[:300])
    ref = LogisticRegression(C=probe.C_, tol=1e-10, max_iter=10000).fit(x[:300], y[:300])
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-3, atol=1e-3 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(probe.intercept_, ref.intercept_, atol=1e-3 * np.abs(ref.coef_).max())
    assert (probe.predict(x[300:]) == ref.predict(x[300:])).all()
    assert probe.score(x[300:], y[300:]) > 0.8
    assert [c for c, _ in probe.val_curve_] == list(probe.Cs[: len(probe.val_curve_)])


def test_linear_probe_falls_back_without_validation_data(blobs):
    x, y = blobs
    one_shot = np.array([np.flatnonzero(y == c)[0] for c in range(4)])
    probe = LinearProbe().fit(x[one_shot], y[one_shot])
    assert probe.C_ == FALLBACK_C and probe.val_curve_ == []


def test_linear_probe_with_one_class_predicts_it(blobs):
    x, _ = blobs
    probe = LinearProbe().fit(x[:10], np.full(10, 3))
    assert np.isnan(probe.C_) and (probe.predict(x[10:20]) == 3).all()


def test_early_stopping_never_stops_on_a_flat_start_or_a_plateau():
    flat = [0.15] * 8
    assert not should_stop(flat, 2)
    assert not should_stop([0.2, 0.2, 0.1, 0.1, 0.1], 2), "falling from the start is not a rise"
    assert not should_stop([0.15, 0.15, 0.3, 0.5, 0.5, 0.5, 0.5], 2), "a plateau at the best is no fall"
    assert not should_stop([0.15, 0.3, 0.5, 0.4], 2)
    assert should_stop([0.15, 0.3, 0.5, 0.4, 0.45], 2)
    assert not should_stop([0.15, 0.5, 0.4, 0.5, 0.4], 2), "returning to the best resets the count"


def test_validation_split_keeps_every_class_in_training():
    y = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 2)
    tr, va = validation_split(y, 0.2, seed=0)
    assert set(y[tr]) == {0, 1, 2, 3} and sorted(np.concatenate([tr, va])) == list(range(len(y)))
    assert np.bincount(y[va], minlength=4).tolist() == [2, 1, 0, 0]
    again = validation_split(y, 0.2, seed=0)
    assert (again[1] == va).all()


def test_exact_scores_are_exact_integer_arithmetic():
    """Our score equals the exact rational dot product of the 24-bit-rounded vectors."""
    rng = np.random.default_rng(5)
    a, b = l2_normalize(rng.normal(size=(7, 33))), l2_normalize(rng.normal(size=(9, 33)))
    got = exact_scores(a, b)
    qa, qb = quantize(a).astype(np.int64), quantize(b).astype(np.int64)
    for i in range(7):
        for j in range(9):
            ref = Fraction(int(sum(int(u) * int(v) for u, v in zip(qa[i], qb[j], strict=True))), 2**48)
            assert Fraction(got[i, j]) == ref
    # longer vectors go to a coarser power-of-two grid and stay exact
    long = exact_scores(a * 10, b)
    qa10 = quantize(a * 10).astype(np.int64)
    assert Fraction(long[2, 3]) == Fraction(
        int(sum(int(u) * int(v) for u, v in zip(qa10[2], qb[3], strict=True))), 2**44
    )
    with pytest.raises(ValueError, match="finite"):
        exact_scores(np.full((1, 33), np.nan), b)


def _dyadic(rng, n, d):
    """Vectors of multiples of 1/8 (norm < 1): every dot product is exact in float64, in any order."""
    return rng.integers(-2, 3, size=(n, d)).astype(np.float32) / 8.0


def test_top_k_breaks_exact_ties_by_index_against_an_exact_reference():
    rng = np.random.default_rng(2)
    gallery = _dyadic(rng, 400, 12)
    gallery = np.concatenate([gallery, gallery[:150], gallery[:150]])  # many exact duplicates
    queries = _dyadic(rng, 60, 12)
    scores, rows = top_k(gallery, queries, 25, margin=2)  # a small margin forces the widening path
    ref = queries.astype(np.float64) @ gallery.astype(np.float64).T  # exact: small dyadic numbers
    for q in range(len(queries)):
        order = np.lexsort((np.arange(len(gallery)), -ref[q]))[:25]
        assert rows[q].tolist() == order.tolist(), q
        assert scores[q].tolist() == ref[q, order].tolist()


def test_top_k_equals_integer_arithmetic_wherever_duplicates_sit():
    """Random unit vectors with duplicates, in two gallery orders, against exact int64 dot products."""
    rng = np.random.default_rng(3)
    base = l2_normalize(rng.normal(size=(300, 64))).astype(np.float32)
    queries = np.concatenate([l2_normalize(rng.normal(size=(20, 64))), base[:10]]).astype(np.float32)
    for gallery in (np.concatenate([base, base[::3]]), np.concatenate([base[::3], base])[::-1]):
        scores, rows = top_k(gallery, queries, 10)
        ref = quantize(queries).astype(np.int64) @ quantize(gallery).astype(np.int64).T  # exact integers
        for q in range(len(queries)):
            order = np.lexsort((np.arange(len(gallery)), -ref[q]))[:10]
            assert rows[q].tolist() == order.tolist(), q
            assert (scores[q] * 2.0**48).tolist() == ref[q, order].astype(np.float64).tolist()
        twins = [q for q in range(10, 30) if scores[q, 0] == scores[q, 1]]
        assert twins, "queries equal to duplicated rows must produce exact ties"


def _brute_knn(train, labels, query, ks, t, n_classes):
    """Float64 brute force over vectors whose dot products are exact."""
    sims = query.astype(np.float64) @ train.astype(np.float64).T
    out = {}
    for k in ks:
        preds = []
        for row in sims:
            order = np.lexsort((np.arange(len(row)), -row))[:k]  # ties: lower index first
            votes = np.zeros(n_classes)
            for j in order:
                votes[labels[j]] += np.exp((row[j] - row[order[0]]) / t)
            preds.append(int(np.argmax(votes)))
        out[k] = np.array(preds)
    return out


def test_knn_matches_float64_brute_force_with_ties():
    rng = np.random.default_rng(4)
    x = _dyadic(rng, 300, 10)
    y = rng.integers(0, 4, 300)
    train, ytr = np.concatenate([x[:200], x[:50]]), np.concatenate([y[:200], (y[:50] + 1) % 4])  # exact ties
    query = np.concatenate([x[200:260], x[:10]])  # some queries equal training points
    head = KNNHead((1, 3, 10, 25), n_classes=4).fit(train, ytr)
    got = head.predict_all(query)
    ref = _brute_knn(train, ytr, query, (1, 3, 10, 25), 0.07, 4)
    for k in ref:
        assert (got[k] == ref[k]).all(), k
    scores, idx = search(train, query, 5)
    exact = query.astype(np.float64) @ train.astype(np.float64).T
    assert np.array_equal(scores, np.take_along_axis(exact, idx, 1))


def test_weighted_votes_prefer_close_neighbours():
    scores = np.array([[0.9, 0.5, 0.5]])
    labels = np.array([[0, 1, 1]])
    # exp(0/0.07) = 1 beats 2 * exp(-0.4/0.07): the single close neighbour wins
    assert weighted_votes(scores, labels, 2, (3,))[3][0] == 0
    assert weighted_votes(scores, labels, 2, (3,), temperature=10.0)[3][0] == 1


def test_retrieval_ranks_exact_ties_by_index():
    text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # texts 0 and 1 tie exactly
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    m = caption_retrieval(img, text, np.array([1, 0, 2]), ks=(1,))
    # image 0's caption (text 1) ranks after its exact twin, text 0; images 1 and 2 find theirs first
    assert m["image_to_text"]["R@1"] == pytest.approx(2 / 3)


def test_metrics_match_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300))  # class 4 only predicted
    m = classification_metrics(y, p, 5, n_boot=200, seed=1)
    assert m["accuracy"].value == pytest.approx(accuracy_score(y, p))
    assert m["balanced_accuracy"].value == pytest.approx(balanced_accuracy_score(y, p))
    assert m["macro_f1"].value == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    rec = recall_score(y, p, average=None, labels=[0, 1, 2, 3], zero_division=0)
    for c in range(4):
        assert m[f"recall[{c}]"].value == pytest.approx(rec[c])
    assert "recall[4]" not in m
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert m[key].ci_low < m[key].value < m[key].ci_high
    again = classification_metrics(y, p, 5, n_boot=200, seed=1)
    assert again["accuracy"].ci_low == m["accuracy"].ci_low, "fixed seed -> same CI"


def test_basic_bootstrap_interval_reflects_the_percentile_one():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    p = np.where(rng.random(400) < 0.62, y, 1 - y)
    pct = classification_metrics(y, p, 2, n_boot=999, seed=3)["accuracy"]
    basic = classification_metrics(y, p, 2, n_boot=999, seed=3, ci_method="basic")["accuracy"]
    assert basic.value == pct.value
    assert basic.ci_low == pytest.approx(2 * pct.value - pct.ci_high)
    assert basic.ci_high == pytest.approx(2 * pct.value - pct.ci_low)


def test_basic_bootstrap_agrees_with_scipy():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(8)
    correct = (rng.random(1500) < 0.35).astype(np.int64)
    ours = classification_metrics(correct, np.ones_like(correct), 2, n_boot=9999, seed=0, ci_method="basic")
    ref = bootstrap((correct,), np.mean, n_resamples=9999, method="basic", random_state=0).confidence_interval
    # two independent sets of 9,999 resamples: the endpoints agree to Monte-Carlo error (~0.002)
    assert ours["accuracy"].ci_low == pytest.approx(ref.low, abs=0.004)
    assert ours["accuracy"].ci_high == pytest.approx(ref.high, abs=0.004)


def test_paired_difference_hand_computed():
    a = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1], bool)  # 0.9
    b = np.array([1, 0, 1, 0, 0, 1, 0, 1, 0, 1], bool)  # 0.5
    d = paired_difference(a, b, n_boot=500)
    assert d["difference"].value == pytest.approx(0.4)
    assert d["ratio"].value == pytest.approx(0.5 / 0.9)
    assert d["difference"].ci_low > 0  # b is never right where a is wrong: a strictly better
    same = paired_difference(a, a, n_boot=100)
    assert same["difference"].ci_low == same["difference"].ci_high == 0


def test_modality_gap():
    img = np.array([[1.0, 0.0], [1.0, 0.0]])
    txt = np.array([[0.0, 1.0]])
    assert modality_gap(img, txt) == pytest.approx(np.sqrt(2))
    assert modality_gap(img, img) == 0


@pytest.mark.filterwarnings("ignore")
@parametrize_with_checks([LinearProbe(Cs=(0.1, 1.0, 10.0)), KNNHead(ks=(1, 3)), PrototypeHead(), PromptZeroShot()])
def test_scikit_learn_estimator_checks(estimator, check):
    """Every head passes scikit-learn's own estimator checks (clone, fit/predict contracts, input validation)."""
    check(estimator)
