"""Linear probe: multinomial logistic regression with C chosen on a held-out validation split.

How C is chosen, and why:
- The sweep runs from strong to weak regularisation, each fit warm-started from the previous
  solution, with a tight tolerance (lbfgs's default tolerance stops long before convergence on
  unit-norm features, and every C then looks alike).
- Real embeddings sit in a narrow cone, so the class signal lives in a residual of a few
  percent of each vector's norm. Strongly regularised fits then predict the majority class
  whatever C is: the validation curve starts *flat*. A sweep that stops when the score has not
  improved for a few steps stops right there, at the smallest C, with a chance-level probe.
  Here the sweep stops only after the score has *risen above its starting value and then
  fallen* below the best for `patience` consecutive steps; a flat start or a plateau never
  stops it. The chosen C has the best validation score (`select`: log-loss by default, see
  `validation_score` and docs/benchmarks.md, "Choosing C under a class-mix shift"), ties going to the smaller C (the
  same rule as an exhaustive sweep over the grid).
- The final model is refit on train + validation with the chosen C, warm-started.
- The objective is scikit-learn's LogisticRegression (lbfgs) objective, to the letter: mean
  log-loss + ||W||^2 / (2 C n), intercept not penalised, multinomial softmax over all classes
  (binomial with one weight vector for two classes). We minimise it with scipy's L-BFGS-B
  ourselves, stopping on the gradient only: scikit-learn also stops when the objective changes
  by < 64 eps relative, and under strong regularisation that happens while class scores still
  differ by less than the remaining error (a few-shot probe then reported accuracies that the
  exact optimum does not have).
- Every fit solves that problem exactly, reparameterised for speed: features are
  centred (the intercept is not penalised, so a shift changes nothing) and divided by their RMS
  norm s with C multiplied by s^2 (the same optimum); with fewer rows than dimensions the
  problem is solved in the row space of the data, where an L2-penalised linear model's weights
  lie. On cone data this needs 5-10x fewer lbfgs iterations, and few-shot fits ~100x less time.
  `tol` (max |gradient|) applies to that well-scaled problem: at 1e-7 the validation
  predictions of the whole warm-started sweep equal those of cold, plain scikit-learn fits at
  tol 1e-8 on the raw features (tests/test_probe.py checks this on hard data).
- Without any validation data (one example per class) C is `fallback_C` (see FALLBACK_C).

Solvers (`backend`): "sklearn" minimises that objective with scipy's L-BFGS-B (above);
"torch" minimises the very same objective, on the same reparameterised problem, inside the
same sweep, with torch's full-batch L-BFGS (strong Wolfe line search) in float64, on the GPU when
`device` is one: at a million rows the loss and gradient are two matrix products that a GPU
does in milliseconds. Both stop on the same max |gradient| <= tol. "auto" is torch on a GPU,
else sklearn. At scale (training rows given as a RowView, more than LARGE_CELLS values) the
CPU solver never materialises the float64 problem: centring, scaling, loss and gradient are
computed over blocks of rows gathered from the float32 embeddings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_expit, logsumexp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ..config import DEFAULT_CS, DEFAULT_PATIENCE, DEFAULT_PROBE_SELECT, FALLBACK_C, resolve_backend
from . import scoring
from .scoring import RowView, validate_fit

DEFAULT_TOL = 1e-7
DEFAULT_MAX_ITER = 1000


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) row indices; every class keeps at least one training row.

    Each class sends round(fraction * n_c) of its rows, but never all of them, to validation,
    so classes with a single row stay in training (scikit-learn's stratified split refuses them).
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = min(round(fraction * len(rows)), len(rows) - 1)
        if k > 0:
            val.append(rng.permutation(rows)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(y)), val_idx), val_idx


def grouped_validation_split(
    y: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Whole groups (source datasets) held out for validation: at least `fraction` of the rows.

    When the outer folds test on unseen sources, C should be chosen for unseen sources too: an
    in-source split sees every C above some value reach the same accuracy and, ties going to
    the smaller C, picks the most regularised probe, which transfers worst. Groups are held out
    in a seeded order, skipping any whose removal would take a class out of training, until the
    validation rows reach `fraction` and hold two classes. None where that is impossible (few
    sources per class): the caller then validates in-source.
    """
    names = np.unique(groups)
    held: list[str] = []
    for g in np.random.default_rng(seed).permutation(names):
        trial = np.isin(groups, [*held, g])
        if len(np.unique(y[~trial])) < len(np.unique(y)):
            continue  # a class would leave training
        held.append(g)
        if trial.sum() >= fraction * len(y) and len(np.unique(y[trial])) >= 2:
            return np.flatnonzero(~trial), np.flatnonzero(trial)
    return None


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved: list[tuple[object, int]] = []


@contextmanager
def serial_optimizer_blas() -> Iterator[None]:
    """Run scipy's BLAS single-threaded while probes fit (numpy's own BLAS keeps its threads).

    L-BFGS-B updates its 10^4-10^5-element vectors with level-1 BLAS calls; OpenBLAS threads
    them and spends ~10 ms per iteration waking its threads (measured on 2 cores: a sweep took
    28 s with the default and 4.9 s with scipy's BLAS on one thread). The matrix products of the
    loss run in numpy's BLAS, a separate library in pip wheels, and keep their threads. Where
    scipy and numpy share one BLAS nothing is changed. Re-entrant across threads (--jobs).
    """
    global _blas_users
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved.clear()
            from threadpoolctl import ThreadpoolController

            libs = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
            numpy_libs = {c.filepath for c in libs if "numpy" in c.filepath}
            for c in libs:
                if "scipy" in c.filepath and c.filepath not in numpy_libs and c.num_threads > 1:
                    _blas_saved.append((c, c.num_threads))
                    c.set_num_threads(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                for c, n in _blas_saved:
                    c.set_num_threads(n)  # type: ignore[attr-defined]


def _objective(w: np.ndarray, z: np.ndarray, target: np.ndarray, lam: float, k: int) -> tuple[float, np.ndarray]:
    """scikit-learn's objective and gradient; w = (k, d + 1) weights and intercepts, flattened."""
    n, d = z.shape
    wk = w.reshape(k, d + 1)
    logits = z @ wk[:, :d].T + wk[:, d]
    if k == 1:  # binomial: target in {0, 1}
        margin = logits[:, 0]
        loss = -(target * log_expit(margin) + (1 - target) * log_expit(-margin)).mean()
        resid = (np.exp(log_expit(margin)) - target)[:, None]
    else:  # multinomial: target one-hot (n, k)
        lse = logsumexp(logits, axis=1)
        loss = float((lse - (logits * target).sum(axis=1)).mean())
        resid = np.exp(logits - lse[:, None]) - target
    grad = np.empty_like(wk)
    grad[:, :d] = resid.T @ z / n + lam * wk[:, :d]
    grad[:, d] = resid.mean(axis=0)
    return float(loss) + 0.5 * lam * float((wk[:, :d] ** 2).sum()), grad.ravel()


class BlockZ:
    """The reparameterised features (x[rows] - mean) / scale of a RowView, never materialised:
    rows are gathered, converted to float64, centred and scaled one block at a time."""

    def __init__(self, view: RowView, mean: np.ndarray, scale: float, idx: np.ndarray | None = None) -> None:
        self.view, self.mean, self.scale = view, mean, scale
        self.idx = np.arange(len(view)) if idx is None else idx

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.idx), self.view.shape[1])

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, rows: np.ndarray) -> BlockZ:
        return BlockZ(self.view, self.mean, self.scale, self.idx[rows])

    def blocks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        size = size or max(1, scoring.gather_rows(self.view.shape[1]) // 2)  # float64: half the rows of a float32 block
        for s in range(0, len(self.idx), size):
            block = np.asarray(self.view[self.idx[s : s + size]], dtype=np.float64)
            block -= self.mean
            block /= self.scale
            yield s, block


def _blocked_objective(w: np.ndarray, z: BlockZ, y: np.ndarray, lam: float, k: int) -> tuple[float, np.ndarray]:
    """`_objective` summed over blocks of rows (labels as indices: no (n, k) one-hot in memory)."""
    n, d = z.shape
    wk = w.reshape(k, d + 1)
    loss, grad = 0.0, np.zeros_like(wk)
    for s, zb in z.blocks():
        yb = y[s : s + len(zb)]
        logits = zb @ wk[:, :d].T + wk[:, d]
        if k == 1:
            margin, target = logits[:, 0], yb.astype(np.float64)
            loss -= float((target * log_expit(margin) + (1 - target) * log_expit(-margin)).sum())
            resid = (np.exp(log_expit(margin)) - target)[:, None]
        else:
            lse = logsumexp(logits, axis=1)
            loss += float((lse - logits[np.arange(len(yb)), yb]).sum())
            resid = np.exp(logits - lse[:, None])
            resid[np.arange(len(yb)), yb] -= 1.0
        grad[:, :d] += resid.T @ zb
        grad[:, d] += resid.sum(axis=0)
    grad /= n
    grad[:, :d] += lam * wk[:, :d]
    return loss / n + 0.5 * lam * float((wk[:, :d] ** 2).sum()), grad.ravel()


@dataclass
class _Fit:
    """Weights (k, d) and intercepts (k,) of one solved problem; k = 1 for two classes."""

    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int

    def decision(self, z: np.ndarray | BlockZ) -> np.ndarray:
        if isinstance(z, BlockZ):
            out = np.empty((len(z), len(self.intercept)))
            for s, zb in z.blocks():
                out[s : s + len(zb)] = zb @ self.coef.T + self.intercept
            return out
        return z @ self.coef.T + self.intercept

    def predict(self, z: np.ndarray) -> np.ndarray:
        d = self.decision(z)
        return (d[:, 0] > 0).astype(np.int64) if d.shape[1] == 1 else d.argmax(axis=1)


def fit_logistic(
    z: np.ndarray | BlockZ,
    y: np.ndarray,
    n_classes: int,
    C: float,
    tol: float,
    max_iter: int,
    start: _Fit | None = None,
) -> _Fit:
    """Minimise scikit-learn's penalised log-loss for labels 0..n_classes-1 (warm start from `start`)."""
    n, d = z.shape
    k = 1 if n_classes == 2 else n_classes
    w0 = np.zeros((k, d + 1)) if start is None else np.hstack([start.coef, start.intercept[:, None]])
    fn: Callable[..., tuple[float, np.ndarray]]  # the objective and its gradient, for this kind of z
    args: tuple[Any, ...]
    if isinstance(z, BlockZ):
        fn, args = _blocked_objective, (z, np.asarray(y, dtype=np.int64), 1.0 / (C * n), k)
    else:
        fn, args = _objective, (z, y.astype(np.float64) if k == 1 else np.eye(n_classes)[y], 1.0 / (C * n), k)
    res = minimize(
        fn,
        w0.ravel(),
        args=args,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 0.0},
    )
    w = res.x.reshape(k, d + 1)
    return _Fit(w[:, :d].copy(), w[:, d].copy(), int(res.nit))


def fit_logistic_torch(
    z: Any,
    y: np.ndarray,
    n_classes: int,
    C: float,
    tol: float,
    max_iter: int,
    start: _Fit | None = None,
) -> _Fit:
    """The same objective as `fit_logistic`, minimised by torch's full-batch L-BFGS in float64.

    `z` is a float64 torch tensor (on any device; see `LinearProbe._tensor`). Stops when
    max |gradient| <= tol (as scipy's gtol), or after `max_iter` iterations.
    """
    import torch

    n, d = z.shape
    k = 1 if n_classes == 2 else n_classes
    dev = z.device
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=dev)
    w0 = np.zeros((k, d + 1)) if start is None else np.hstack([start.coef, start.intercept[:, None]])
    w = torch.tensor(w0, dtype=torch.float64, device=dev, requires_grad=True)
    lam = 1.0 / (C * n)

    def objective() -> torch.Tensor:
        logits = z @ w[:, :d].T + w[:, d]
        if k == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], yt.to(torch.float64))
        else:
            loss = torch.nn.functional.cross_entropy(logits, yt)
        return loss + 0.5 * lam * (w[:, :d] ** 2).sum()

    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=0.0,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    out = w.detach().cpu().numpy()
    return _Fit(out[:, :d].copy(), out[:, d].copy(), n_iter)


def torch_device(device: str | None) -> str:
    """The torch device for the probe: cuda when asked (or `auto` with a GPU), else cpu."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


SELECTION_CRITERIA = ("accuracy", "balanced_accuracy", "log_loss")


def validation_score(criterion: str, y: np.ndarray, pred: np.ndarray, log_proba: np.ndarray | None = None) -> float:
    """How good a C's validation predictions are (higher is better) under `criterion`.

    accuracy rewards the majority class whenever validation rows' class mix differs from the
    training rows' (held-out sources, plates, patients): the curve is flat over C and the tie
    goes to the smallest C, a probe that predicts one class. balanced_accuracy (mean recall over
    the classes present in validation) rescales a flat curve but leaves it flat; log_loss (the
    mean log-probability of the true class, so higher is better) is continuous and does not tie.
    """
    if criterion == "accuracy":
        return float((pred == y).mean())
    if criterion == "balanced_accuracy":
        return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))
    if criterion == "log_loss":
        if log_proba is None:
            raise ValueError("log_loss selection needs class log-probabilities")
        return float(log_proba[np.arange(len(y)), y].mean())
    raise ValueError(f"unknown selection criterion {criterion!r}; choose from {', '.join(SELECTION_CRITERIA)}")


def choose_c(curve: list[tuple[float, float]]) -> float:
    """Best validation score; ties go to the smaller C (the grid is swept in increasing order)."""
    best = max(score for _, score in curve)
    return next(c for c, score in curve if score == best)


def should_stop(scores: list[float], patience: int) -> bool:
    """True once the curve has risen above its first value and then stayed below its best for `patience` steps."""
    best = max(scores)
    if best <= scores[0]:
        return False  # a flat (or falling) start is no reason to stop
    last_best = max(i for i, s in enumerate(scores) if s == best)
    return len(scores) - 1 - last_best >= patience


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Estimator: `fit(X, y)` picks C on a stratified validation split, then refits on all of X.

    Fitted attributes: `C_`, `val_curve_` (list of (C, validation score under `select`) in sweep order),
    `validation_` ("stratified", "held-out groups" or "none"), `at_edge_` (the chosen C is the
    first or last of the grid on a curve that is not flat: widen the grid), `classes_`, `coef_`,
    `intercept_`, `n_iter_`. One class in `y` gives a constant predictor (`C_` is NaN).
    """

    def __init__(
        self,
        Cs: tuple[float, ...] = DEFAULT_CS,
        C: float | None = None,
        val_fraction: float = 0.2,
        patience: int | None = DEFAULT_PATIENCE,
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        random_state: int = 0,
        fallback_C: float = FALLBACK_C,
        backend: str = "sklearn",
        device: str | None = None,
        select: str = DEFAULT_PROBE_SELECT,
    ) -> None:
        self.Cs = Cs
        self.C = C
        self.val_fraction = val_fraction
        self.patience = patience
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.fallback_C = fallback_C
        self.backend = backend
        self.device = device
        self.select = select

    def fit(self, X: np.ndarray | RowView, y: np.ndarray, groups: np.ndarray | None = None) -> LinearProbe:
        """Choose C and fit; with `groups`, C is validated on held-out groups (see grouped_validation_split).

        X may be a RowView (the training rows of a larger array), solved without materialising it."""
        self._backend = resolve_backend(self.backend, self.device)
        self._tensors: dict[int, Any] = {}
        x, y = validate_fit(self, X, y, np.float64)
        if isinstance(x, RowView):
            return self._fit_blocked(x, y, groups)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.val_curve_: list[tuple[float, float]] = []
        self.validation_ = "none"
        self.at_edge_ = False
        self.n_iter_ = 0
        self.n_features_in_ = x.shape[1]
        if len(self.classes_) < 2:  # nothing to separate: a constant predictor, reported by the caller
            self.C_ = float("nan")
            self.coef_, self.intercept_ = np.zeros((1, x.shape[1])), np.zeros(1)
            return self
        self._mean = x.mean(axis=0)
        xc = x - self._mean
        self._scale = float(np.sqrt((xc**2).sum(axis=1).mean())) or 1.0
        # Exact reduction to the row space when there are fewer rows than dimensions.
        self._basis = np.linalg.qr(xc.T)[0] if len(x) < x.shape[1] else None
        with serial_optimizer_blas():
            self._fit_ = self._sweep(self._reparam(x), y_idx, groups)
        coef = self._fit_.coef / self._scale
        self.coef_ = coef @ self._basis.T if self._basis is not None else coef
        self.intercept_ = self._fit_.intercept - self.coef_ @ self._mean
        return self

    def _fit_blocked(self, view: RowView, y: np.ndarray, groups: np.ndarray | None) -> LinearProbe:
        """The same fit with centring, scaling and the objective computed over blocks of rows."""
        n, d = view.shape
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.val_curve_, self.validation_, self.at_edge_, self.n_iter_, self.n_features_in_ = [], "none", False, 0, d
        if len(self.classes_) < 2:
            self.C_ = float("nan")
            self.coef_, self.intercept_ = np.zeros((1, d)), np.zeros(1)
            return self
        total = np.zeros(d)
        for _, block in view.blocks():
            total += block.sum(axis=0, dtype=np.float64)
        self._mean = total / n
        sq = 0.0
        for _, block in view.blocks():
            sq += float(((block.astype(np.float64) - self._mean) ** 2).sum())
        self._scale = float(np.sqrt(sq / n)) or 1.0
        self._basis = None  # more rows than dimensions at this size
        with serial_optimizer_blas():
            self._fit_ = self._sweep(BlockZ(view, self._mean, self._scale), y_idx, groups)
        self.coef_ = self._fit_.coef / self._scale
        self.intercept_ = self._fit_.intercept - self.coef_ @ self._mean
        return self

    def _tensor(self, z: np.ndarray | BlockZ) -> Any:
        """z as a float64 torch tensor on the probe's device, converted once per fit."""
        import torch

        key = id(z)
        if key not in self._tensors:
            dev = torch_device(self.device)
            if isinstance(z, BlockZ):
                t = torch.empty(z.shape, dtype=torch.float64, device=dev)
                for s, zb in z.blocks():
                    t[s : s + len(zb)] = torch.from_numpy(zb)
            else:
                t = torch.as_tensor(np.ascontiguousarray(z), dtype=torch.float64, device=dev)
            self._tensors[key] = (z, t)  # z kept alive so that its id stays unique
        return self._tensors[key][1]

    def _reparam(self, x: np.ndarray) -> np.ndarray:
        z = x - self._mean
        if self._basis is not None:
            z = z @ self._basis
        return z / self._scale

    def _solve(self, z: np.ndarray | BlockZ, y: np.ndarray, c: float, start: _Fit | None = None) -> _Fit:
        """Fit labels 0..k-1 of `y` (all of them present) at C = c, with the chosen backend."""
        if getattr(self, "_backend", "sklearn") == "torch":
            fit = fit_logistic_torch(
                self._tensor(z), y, int(y.max()) + 1, c * self._scale**2, self.tol, self.max_iter, start
            )
        else:
            fit = fit_logistic(z, y, int(y.max()) + 1, c * self._scale**2, self.tol, self.max_iter, start)
        self.n_iter_ += fit.n_iter
        return fit

    def _split(self, y: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if groups is not None:
            split = grouped_validation_split(y, np.asarray(groups).astype(str), self.val_fraction, self.random_state)
            if split is not None:
                self.validation_ = "held-out groups"
                return split
        self.validation_ = "stratified"
        return validation_split(y, self.val_fraction, self.random_state)

    def _sweep(self, z: np.ndarray | BlockZ, y: np.ndarray, groups: np.ndarray | None) -> _Fit:
        tr, va = self._split(y, groups)
        if self.C is not None or len(va) == 0:
            self.C_ = float(self.C if self.C is not None else self.fallback_C)
            return self._solve(z, y, self.C_)
        seen, y_tr = np.unique(y[tr], return_inverse=True)  # grouped splits may leave classes out
        fit: _Fit | None = None
        best: _Fit | None = None
        scores: list[float] = []
        z_tr, z_va = z[tr], z[va]  # once for the whole sweep (the torch backend moves them once)
        for c in self.Cs:
            fit = self._solve(z_tr, y_tr, c, fit)  # warm start from the previous C
            scores.append(self._score(fit, z_va, y[va], seen))
            self.val_curve_.append((float(c), scores[-1]))
            if scores[-1] > max(scores[:-1], default=-1.0):
                best = fit
            if self.patience is not None and should_stop(scores, self.patience):
                break
        self.C_ = choose_c(self.val_curve_)
        flat = max(scores) == min(scores)  # validation cannot tell the C values apart: no edge to widen
        self.at_edge_ = not flat and len(self.Cs) > 1 and self.C_ in (self.Cs[0], self.Cs[-1])
        # refit on train + validation, warm-started from the chosen fit where it has every class
        return self._solve(z, y, self.C_, best if len(seen) == len(self.classes_) else None)

    def _score(self, fit: _Fit, z_va: np.ndarray | BlockZ, y_va: np.ndarray, seen: np.ndarray) -> float:
        """The validation score of one C under `select` (the labels of `y_va` are all in `seen`)."""
        d = fit.decision(z_va)
        if self.select != "log_loss":
            pred = seen[(d[:, 0] > 0).astype(np.int64) if d.shape[1] == 1 else d.argmax(axis=1)]
            return validation_score(self.select, y_va, pred)
        if d.shape[1] == 1:
            log_proba = np.stack([log_expit(-d[:, 0]), log_expit(d[:, 0])], axis=1)
        else:
            log_proba = d - logsumexp(d, axis=1, keepdims=True)
        idx = np.searchsorted(seen, y_va)  # columns are the training classes
        return validation_score("log_loss", idx, idx, log_proba)

    def _input(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float64, reset=False)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Class scores (n, classes); for two classes the score of the second, as scikit-learn."""
        x = self._input(X)
        if len(self.classes_) < 2:
            return np.zeros(len(x))
        d = self._fit_.decision(self._reparam(x))
        return d[:, 0] if d.shape[1] == 1 else d

    def predict(self, X: np.ndarray) -> np.ndarray:
        x = self._input(X)
        if len(self.classes_) < 2:
            return np.full(len(x), self.classes_[0])
        return self.classes_[self._fit_.predict(self._reparam(x))]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        x = self._input(X)
        if len(self.classes_) < 2:
            return np.ones((len(x), 1))
        d = self._fit_.decision(self._reparam(x))
        if d.shape[1] == 1:
            p1 = np.exp(log_expit(d[:, 0]))
            return np.stack([1 - p1, p1], axis=1)
        return np.exp(d - logsumexp(d, axis=1, keepdims=True))
