"""The linear probe on hard data against an exhaustive, plain scikit-learn sweep.

The data are what real embeddings look like (`mubench_probe.testing.hard_embeddings`): unit
vectors in a narrow cone, the class signal in a residual of ~20% of the norm, weak and
imbalanced classes. Strongly regularised fits all predict the majority class, so the validation
curve starts flat; the probe shipped before stopped there, at C = 0.01, with chance accuracy.
"""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from mubench_probe.heads.linear import DEFAULT_CS, LinearProbe, serial_optimizer_blas, validation_split
from mubench_probe.testing import hard_embeddings

HARD = {
    "10 classes, 768-d, imbalanced": dict(n=900, dim=768, classes=10, seed=1),
    "13 classes, 1280-d, a class of 10 rows": dict(n=900, dim=1280, classes=13, signal=0.12, min_rows=10, seed=2),
    "7 classes, 512-d, anisotropic noise": dict(n=700, dim=512, classes=7, signal=0.15, decay=0.5, seed=3),
}


def exhaustive_sweep(x, y, val_fraction=0.2, seed=0, center=False):
    """Every C of the grid fitted from scratch by plain scikit-learn on the raw features, tightly converged,
    C chosen by validation accuracy (the probes below use `select="accuracy"`: this file tests the sweep,
    its stopping rule and the solver; tests/test_probe_selection.py tests each criterion, the default too).

    float64 (scikit-learn keeps float32 input in float32), and scipy's BLAS on one thread, which
    changes nothing but the time (see `serial_optimizer_blas`). `center` subtracts the mean: the
    same problem (the intercept is not penalised), which lbfgs can solve precisely where, on raw
    cone features under strong regularisation, it stops while the intercept's error still exceeds
    the tiny differences between class scores.
    """
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(axis=0)
    tr, va = validation_split(y, val_fraction, seed)
    curve = []
    with warnings.catch_warnings(), serial_optimizer_blas():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in DEFAULT_CS:
            m = LogisticRegression(C=c, tol=1e-8, max_iter=20000).fit(x[tr], y[tr])
            curve.append(float((m.predict(x[va]) == y[va]).mean()))
        best = DEFAULT_CS[int(np.argmax(curve))]  # argmax: ties go to the smaller C
        return best, curve, LogisticRegression(C=best, tol=1e-8, max_iter=20000).fit(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HARD))
def test_probe_matches_an_exhaustive_sweep_on_hard_data(name):
    x, y = hard_embeddings(**HARD[name])
    test = np.arange(len(y)) % 4 == 0
    best, curve, ref = exhaustive_sweep(x[~test], y[~test])
    # the data are hard: the curve starts flat at the majority rate and peaks at a large C
    assert curve[0] == curve[1] == curve[2] and best >= 100, curve
    probe = LinearProbe(select="accuracy").fit(x[~test], y[~test])
    ours, theirs = probe.score(x[test], y[test]), ref.score(x[test], y[test])
    assert probe.C_ == best or abs(ours - theirs) <= 0.005, (probe.C_, best, ours, theirs)
    majority = np.bincount(y[test]).max() / test.sum()
    assert ours > majority + 0.2, (ours, majority)
    # the validation curve it reports is the exhaustive one, up to where it stopped
    assert [s for _, s in probe.val_curve_] == curve[: len(probe.val_curve_)]


@pytest.mark.slow
def test_probe_at_a_chosen_c_is_plain_scikit_learn_on_hard_data():
    x, y = hard_embeddings(**HARD["10 classes, 768-d, imbalanced"])
    probe = LinearProbe(C=300.0).fit(x[:600], y[:600])
    ref = LogisticRegression(C=300.0, tol=1e-8, max_iter=20000).fit(x[:600].astype(np.float64), y[:600])
    assert (probe.predict(x[600:]) == ref.predict(x[600:])).all()


@pytest.mark.slow
def test_few_shot_probe_matches_an_exhaustive_sweep():
    x, y = hard_embeddings(**HARD["13 classes, 1280-d, a class of 10 rows"])
    rng = np.random.default_rng(0)
    shots = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), 8, replace=False) for c in range(13)]))
    rest = np.setdiff1d(np.arange(len(y)), shots)
    best, curve, ref = exhaustive_sweep(x[shots], y[shots], val_fraction=0.5, seed=3, center=True)
    probe = LinearProbe(val_fraction=0.5, random_state=3, select="accuracy").fit(x[shots], y[shots])
    assert [s for _, s in probe.val_curve_] == curve[: len(probe.val_curve_)]
    mean = x[shots].astype(np.float64).mean(axis=0)
    ours, theirs = probe.score(x[rest], y[rest]), ref.score(x[rest] - mean, y[rest])
    assert probe.C_ == best or abs(ours - theirs) <= 0.005, (probe.C_, best, ours, theirs)


@pytest.mark.slow
def test_edge_of_the_grid_is_flagged():
    x, y = hard_embeddings(**HARD["7 classes, 512-d, anisotropic noise"])
    short = LinearProbe(Cs=DEFAULT_CS[:7], select="accuracy").fit(x, y)  # the grid stops at C = 10: still rising there
    assert short.C_ == DEFAULT_CS[6] and short.at_edge_
    full = LinearProbe(select="accuracy").fit(x, y)
    assert DEFAULT_CS[0] < full.C_ < DEFAULT_CS[-1] and not full.at_edge_
