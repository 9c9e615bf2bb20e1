"""Each head and metric against a plain reference on the same arrays."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score
from sklearn.model_selection import train_test_split

from mubench_probe.heads import KNNHead, LinearProbe, PromptZeroShot, PrototypeHead, caption_choice
from mubench_probe.heads.knn import search, weighted_votes
from mubench_probe.heads.linear import DEFAULT_MAX_ITER, DEFAULT_TOL
from mubench_probe.heads.metrics import classification_metrics, modality_gap, paired_difference
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


def test_prompt_zero_shot_ensembles_normalised_templates():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(3, 4, 8))
    head = PromptZeroShot(e).fit()
    unit = e / np.linalg.norm(e, axis=-1, keepdims=True)
    ref = unit.mean(axis=1)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(head.weights_, ref, rtol=1e-5)
    x = l2_normalize(rng.normal(size=(20, 8)))
    assert (head.predict(x) == (x @ ref.T).argmax(1)).all()
    single = PromptZeroShot(e, template=2).fit()
    np.testing.assert_allclose(single.weights_, unit[:, 2], rtol=1e-5)


def test_prototype_head_is_cosine_nearest_class_mean():
    rng = np.random.default_rng(1)
    x, y = l2_normalize(rng.normal(size=(60, 5))), rng.integers(0, 3, 60)
    head = PrototypeHead().fit(x, y)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    q = l2_normalize(rng.normal(size=(30, 5)))
    assert (head.predict(q) == (q @ means.T).argmax(1)).all()


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centres = l2_normalize(rng.normal(size=(4, 16)))
    y = rng.integers(0, 4, 400)
    x = l2_normalize(centres[y] + 0.35 * rng.normal(size=(400, 16)))
    return x, y


def test_linear_probe_matches_plain_scikit_learn(blobs):
    x, y = blobs
    probe = LinearProbe().fit(x[:300], y[:300])
    # the C it chose is the best validation accuracy among the C values it fitted ...
    xtr, xva, ytr, yva = train_test_split(x[:300], y[:300], test_size=0.2, stratify=y[:300], random_state=0)
    for c, score in probe.val_scores_.items():
        ref = LogisticRegression(C=c, tol=DEFAULT_TOL, max_iter=DEFAULT_MAX_ITER).fit(xtr, ytr)
        assert abs(ref.score(xva, yva) - score) < 1e-9
    assert probe.val_scores_[probe.C_] == max(probe.val_scores_.values())
    # ... and its final model is a direct fit with that C on all the training data
    ref = LogisticRegression(C=probe.C_, tol=DEFAULT_TOL, max_iter=DEFAULT_MAX_ITER).fit(x[:300], y[:300])
    np.testing.assert_allclose(probe.model_.coef_, ref.coef_, atol=1e-3)
    assert (probe.predict(x[300:]) == ref.predict(x[300:])).mean() >= 0.99
    assert probe.score(x[300:], y[300:]) > 0.8


def test_linear_probe_falls_back_without_validation_data(blobs):
    x, y = blobs
    one_shot = np.array([np.flatnonzero(y == c)[0] for c in range(4)])
    probe = LinearProbe().fit(x[one_shot], y[one_shot])
    assert probe.C_ == 10.0 and probe.val_scores_ == {}


def _brute_knn(train, labels, query, ks, t, n_classes):
    sims = query @ train.T
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


def test_knn_matches_numpy_brute_force_with_ties(blobs):
    x, y = blobs
    train, ytr = np.concatenate([x[:200], x[:50]]), np.concatenate([y[:200], (y[:50] + 1) % 4])  # exact ties
    query = np.concatenate([x[200:260], x[:10]])  # some queries equal training points
    head = KNNHead((1, 3, 10, 25), n_classes=4).fit(train, ytr)
    got = head.predict_all(query)
    ref = _brute_knn(train.astype(np.float32), ytr, query.astype(np.float32), (1, 3, 10, 25), 0.07, 4)
    for k in ref:
        assert (got[k] == ref[k]).all(), k
    scores, idx = search(train, query, 5)
    sims = query.astype(np.float32) @ train.astype(np.float32).T
    np.testing.assert_allclose(scores, np.take_along_axis(sims, idx, 1), atol=1e-5)


def test_weighted_votes_prefer_close_neighbours():
    scores = np.array([[0.9, 0.5, 0.5]])
    labels = np.array([[0, 1, 1]])
    # exp(0/0.07) = 1 beats 2 * exp(-0.4/0.07): the single close neighbour wins
    assert weighted_votes(scores, labels, 2, (3,))[3][0] == 0
    assert weighted_votes(scores, labels, 2, (3,), temperature=10.0)[3][0] == 1


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
