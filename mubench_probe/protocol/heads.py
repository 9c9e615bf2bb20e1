"""How each task head runs on a task's rows and folds: the runner half of the head registry.

The declarative half (names, needs, metrics) is `head_specs.HEAD_SPECS`; here `@runs(name)`
registers one runner per task-scoped head, and `evaluate_task` runs the requested ones in the
registry's order, checking each head's needs declaratively.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..config import EvalConfig
from ..errors import ProbeError
from ..head_specs import HEAD_SPECS
from ..heads import KNNHead, LinearProbe, PromptZeroShot, PrototypeHead, scoring
from ..heads.confounders import (
    batch_effect_index,
    expected_calibration_error,
    knn_nsb_predict,
    reliability_curve,
    softmax_scores,
)
from ..heads.metrics import classification_metrics, modality_gap, paired_difference
from ..heads.phenotypic import phenotypic_map
from ..heads.scoring import view
from .arrays import Output, TaskArrays
from .plan import Folds, TaskPlan, few_shot_indices, groups_of

# Errors a head raises on data it cannot handle (too few rows, degenerate classes, ...): they
# become a note and a skipped head, never a traceback.
HEAD_ERRORS = (ValueError, ArithmeticError, np.linalg.LinAlgError, ProbeError)


def _report(
    out: Output,
    t: TaskArrays,
    head: str,
    idx: np.ndarray,
    pred: np.ndarray,
    cfg: EvalConfig,
    strata: bool = True,
    seed: int | None = None,
) -> None:
    name, y = t.task.name, t.y[idx]
    metrics = classification_metrics(
        y, pred, t.task.n_classes, cfg.n_boot, cfg.seed, class_names=t.task.classes, ci_method=cfg.ci_method
    )
    for metric, est in metrics.items():
        out.add(name, head, metric, est, seed=seed)
    if seed is None:
        out.predict(name, head, t.rows[idx], y, pred)
    if not strata:
        return
    for col in cfg.strata:
        if col not in t.meta:
            continue
        values = t.meta[col].to_numpy()[idx]
        levels = [v for v in pd.unique(values) if v is not None and v == v]
        for v in sorted(levels, key=str):  # single-level strata are kept: results can be grouped by them
            m = values == v
            by_stratum = classification_metrics(
                y[m], pred[m], t.task.n_classes, cfg.n_boot, cfg.seed, ci_method=cfg.ci_method
            )
            out.add(name, head, "accuracy", by_stratum["accuracy"], stratum=f"{col}={v}")


def _blocks(idx: np.ndarray, dim: int) -> list[np.ndarray]:
    """Index blocks of bounded size: predictions are made a block of rows of `dim` floats at a time."""
    step = scoring.gather_rows(dim)
    return [idx[s : s + step] for s in range(0, len(idx), step)] or [idx]


def _rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[idx], or x itself when idx is every row in order (no copy)."""
    return x if len(idx) == len(x) and bool((idx == np.arange(len(x))).all()) else x[idx]


def guarded(out: Output, name: str, head: str, fn: Callable[[], None]) -> None:
    """Run one head; data it cannot handle becomes a note and a skipped head."""
    try:
        fn()
    except HEAD_ERRORS as exc:
        out.note(f"{name}: {head} skipped ({type(exc).__name__}: {exc})", "skipped")


def missing_class_notes(t: TaskArrays, folds: Folds) -> list[str]:
    notes = []
    for i, (train, test) in enumerate(folds):
        absent = sorted(set(t.y[test]) - set(t.y[train]))
        if absent:
            n = int(np.isin(t.y[test], absent).sum())
            names = ", ".join(t.task.classes[c] for c in absent)
            notes.append(
                f"{t.task.name}: fold {i} has no training rows of {names}: probes cannot predict "
                f"it, its {n} test rows count as errors"
            )
    return notes


def per_batch(out: Output, t: TaskArrays, batches: np.ndarray, col: str) -> None:
    """Leave-one-batch-out: each head's accuracy on every held-out batch, and their mean."""
    name = t.task.name
    for frame in [f for f in out.predictions if len(f) and f["task"].iloc[0] == name]:
        head = str(frame["head"].iloc[0])
        b = batches[np.searchsorted(t.rows, frame["row"].to_numpy())]  # t.rows is sorted (row order)
        right = (frame["y_true"].to_numpy() == frame["y_pred"].to_numpy()).astype(float)
        accs = []
        for value in sorted(set(b)):
            m = b == value
            out.add(name, head, "accuracy", float(right[m].mean()), stratum=f"loso:{col}={value}", n=int(m.sum()))
            accs.append(float(right[m].mean()))
        out.add(name, head, "loso_mean_accuracy", float(np.mean(accs)), n=len(accs))


def calibration(out: Output, name: str, head: str, proba: np.ndarray, y: np.ndarray, cfg: EvalConfig) -> None:
    """Expected calibration error (15 bins, bootstrap CI) and the reliability curve behind it."""
    out.add(name, head, "ece", expected_calibration_error(proba, y, CALIBRATION_BINS, cfg.n_boot, cfg.seed))
    for _, r in reliability_curve(proba, y, CALIBRATION_BINS).iterrows():
        stratum, n = f"bin={int(r['bin']):02d}", int(r["count"])
        out.add(name, head, "calibration_confidence", float(r["confidence"]), stratum=stratum, n=n)
        out.add(name, head, "calibration_accuracy", float(r["accuracy"]), stratum=stratum, n=n)


def _batch_effect(out: Output, t: TaskArrays, batches: np.ndarray, col: str, cfg: EvalConfig) -> None:
    """Over each row's k nearest neighbours: share of the same class vs of the same batch, and
    PathoROB's robustness index (same class from another batch vs other class from the same batch)."""
    k = min(cfg.batch_k, len(t.y) - 1)
    if k < 1:
        return
    for metric, est in batch_effect_index(t.x, t.y, batches, k, cfg.n_boot, cfg.seed).items():
        out.add(t.task.name, "batch", f"{metric}@{k}", est, stratum=f"batch={col}")


def _phenotypic_map(out: Output, t: TaskArrays, batches: np.ndarray, col: str, cfg: EvalConfig) -> None:
    """copairs' phenotypic retrieval mAP per class (positives: same class in another batch), with a
    permutation null and Benjamini-Hochberg q-values."""
    name = t.task.name
    table = phenotypic_map(t.x, t.y, batches, n_perm=cfg.map_permutations, seed=cfg.seed)
    for _, r in table.iterrows():
        cls = f"class={t.task.classes[int(r['class'])]}"
        n = int(r["n_queries"])
        out.add(name, "map", "mAP", float(r["mean_average_precision"]), stratum=cls, n=n)
        out.add(name, "map", "p_value", float(r["p_value"]), stratum=cls, n=n)
        out.add(name, "map", "q_value", float(r["q_value"]), stratum=cls, n=n)
    scored = table[table["n_queries"] > 0]
    if len(scored):
        n = int(scored["n_queries"].sum())
        out.add(name, "map", "mAP", float(scored["mean_average_precision"].mean()), stratum=f"batch={col}", n=n)
        out.add(name, "map", "fraction_q<0.05", float((scored["q_value"] < 0.05).mean()), stratum=f"batch={col}", n=n)


def _zero_shot(out: Output, t: TaskArrays, test: np.ndarray, cfg: EvalConfig, correct: dict) -> None:
    name, x = t.task.name, _rows(t.x, test)
    assert t.prompt_emb is not None
    pred = np.full(len(t.y), -1, dtype=np.int64)
    head = PromptZeroShot.from_templates(t.prompt_emb)
    sims = head.similarities(x)
    pred[test] = sims.argmax(axis=1)  # ties: the lower class, as `predict`
    _report(out, t, "zs_prompt", test, pred[test], cfg)
    calibration(out, name, "zs_prompt", softmax_scores(sims), t.y[test], cfg)
    correct["zs"] = pred == t.y
    accs = []
    for j, tmpl in enumerate(t.templates):
        p = PromptZeroShot.from_templates(t.prompt_emb, template=j).predict(x)
        est = classification_metrics(t.y[test], p, t.task.n_classes, 0)["accuracy"]
        out.add(name, f"zs_prompt[{j}]", "accuracy", est, stratum=f"template={tmpl}")
        accs.append(est.value)
    if accs:
        out.add(name, "zs_prompt", "template_spread", float(np.max(accs) - np.min(accs)), n=len(test))
        out.add(name, "zs_prompt", "template_std", float(np.std(accs)), n=len(test))
    gap = modality_gap(x, t.prompt_emb.reshape(-1, t.prompt_emb.shape[-1]))
    out.add(name, "alignment", "modality_gap", gap, n=len(test))


def _probe_record(
    out: Output, name: str, head: str, probe: LinearProbe, n: int, stratum: str, seed: int | None
) -> None:
    """The chosen C, whether it is an edge of the grid, and the validation curve behind it."""
    out.add(name, head, "chosen_C", probe.C_, stratum=stratum, seed=seed, n=n)
    out.add(name, head, "C_at_edge", float(probe.at_edge_), stratum=stratum, seed=seed, n=n)
    for c, score in probe.val_curve_:
        out.add(name, head, f"val_{probe.select}", score, stratum=f"{stratum};C={c:g}", seed=seed, n=n)


def _edge_note(name: str, head: str, probes: list[tuple[str, LinearProbe]], cs: Sequence[float]) -> list[str]:
    notes = []
    for end, c in (("smallest", cs[0]), ("largest", cs[-1])):
        where = [label for label, p in probes if p.at_edge_ and p.C_ == c]
        if where:
            notes.append(
                f"{name}: {head} chose C={c:g}, the {end} value of the grid, in {', '.join(where)}: "
                "the best C may lie outside it (widen --probe-cs)"
            )
    return notes


def probe_for(cfg: EvalConfig, **kw: Any) -> LinearProbe:
    """A linear probe with the evaluation's C grid, stopping rule, selection criterion and solver."""
    settings = dict(
        Cs=cfg.cs,
        patience=cfg.patience,
        random_state=cfg.seed,
        fallback_C=cfg.fallback_c,
        backend=cfg.probe_backend,
        device=cfg.device,
        select=cfg.probe_select,
    )
    return LinearProbe(**{**settings, **kw})


def knn_for(cfg: EvalConfig, n_classes: int) -> KNNHead:
    """A kNN head with the evaluation's k grid, temperature, index and device."""
    device = None if cfg.device == "auto" else cfg.device
    return KNNHead(cfg.ks, cfg.temperature, n_classes, index=cfg.knn_index, device=device, seed=cfg.seed)


def run_linear_probe(
    out: Output, t: TaskArrays, folds: Folds, test: np.ndarray, cfg: EvalConfig, correct: dict, grouped: bool = False
) -> None:
    """Out-of-fold probe; with `grouped` folds, C is also validated on held-out groups (sources, plates).

    One head of `evaluate_task`, public so that it can be run on hand-made folds."""
    name = t.task.name
    pred = np.full(len(t.y), -1, dtype=np.int64)
    proba = np.zeros((len(t.y), t.task.n_classes))
    probes = []
    groups = groups_of(t) if grouped else None
    for i, (train, te) in enumerate(folds):
        probe = probe_for(cfg)
        probe.fit(view(t.x, train), t.y[train], groups=groups[train] if groups is not None else None)
        for block in _blocks(te, t.x.shape[1]):
            pred[block] = probe.predict(t.x[block])
            proba[np.ix_(block, probe.classes_)] = probe.predict_proba(t.x[block])
        _probe_record(out, name, "lp", probe, len(train), f"fold={i}", None)
        probes.append((f"fold {i}", probe))
        if len(probe.classes_) < 2:
            out.note(f"{name}: lp fold {i} has one training class: it predicts that class", "other")
    _report(out, t, "lp", test, pred[test], cfg)
    calibration(out, name, "lp", proba[test], t.y[test], cfg)
    correct["lp"] = pred == t.y
    for n in _edge_note(name, "lp", probes, cfg.cs):
        out.note(n, "probe_c_edge")
    in_source = [label for label, p in probes if groups is not None and p.validation_ == "stratified"]
    if in_source:
        out.note(
            f"{name}: lp validated C on a stratified split of the training {t.task.group_by} values in "
            f"{', '.join(in_source)} (too few {t.task.group_by} values per class to hold some out)",
            "probe_folds",
        )


RECALL_QUERIES = 1000  # test rows per fold on which an approximate kNN index is checked against exact search
CALIBRATION_BINS = 15


def run_knn(
    out: Output, t: TaskArrays, folds: Folds, test: np.ndarray, cfg: EvalConfig, batches: np.ndarray | None = None
) -> None:
    """Out-of-fold kNN; with `batches`, also kNN whose neighbours never share the query's batch
    (`knn_nsb@k`, "not same batch"); with an approximate --knn-index, its recall@10 against exact search.
    One head of `evaluate_task`, public so that it can be run on hand-made folds."""
    preds = {k: np.full(len(t.y), -1, dtype=np.int64) for k in cfg.ks}
    nsb = {k: np.full(len(t.y), -1, dtype=np.int64) for k in cfg.ks} if batches is not None else {}
    recalls, asked = [], 0
    for i, (train, te) in enumerate(folds):
        knn = knn_for(cfg, t.task.n_classes)
        gallery = view(t.x, train)
        knn.fit(gallery, t.y[train])
        for block in _blocks(te, t.x.shape[1]):
            for k, p in knn.predict_all(t.x[block]).items():
                preds[k][block] = p
            if batches is not None:
                found = knn_nsb_predict(
                    gallery,
                    t.y[train],
                    batches[train],
                    t.x[block],
                    batches[block],
                    cfg.ks,
                    t.task.n_classes,
                    cfg.temperature,
                )
                for k, p in found.items():
                    nsb[k][block] = p
        if cfg.knn_index != "Flat":
            rng = np.random.default_rng(cfg.seed + i)
            sample = np.sort(rng.choice(te, size=min(RECALL_QUERIES, len(te)), replace=False))
            recalls.append(knn.recall(t.x[sample], 10))
            asked += len(sample)
        del knn  # this fold's index (a copy of its gallery) goes before the next fold's is built
    main_k = cfg.ks[min(2, len(cfg.ks) - 1)]
    for k, p in preds.items():
        _report(out, t, f"knn@{k}", test, p[test], cfg, strata=k == main_k)
    for k, p in nsb.items():
        _report(out, t, f"knn_nsb@{k}", test, p[test], cfg, strata=False)
        d = paired_difference(
            preds[k][test] == t.y[test], p[test] == t.y[test], cfg.n_boot, cfg.seed, ci_method=cfg.ci_method
        )
        out.add(t.task.name, "batch", f"knn_minus_nsb@{k}", d["difference"])
    if recalls:
        out.add(
            t.task.name, "knn", "index_recall@10", float(np.mean(recalls)), stratum=f"index={cfg.knn_index}", n=asked
        )


def run_few_shot(out: Output, t: TaskArrays, folds: Folds, cfg: EvalConfig) -> None:
    """k shots per class from one training fold per seed; C tuned only on those shots.

    One head of `evaluate_task`, public so that it can be run on hand-made folds."""
    name = t.task.name
    for shots in cfg.shots:
        accs: dict[str, list[float]] = {"lp": [], "proto": []}
        probes = []
        for s in range(cfg.fewshot_seeds):
            train, test = folds[s % len(folds)]
            idx = few_shot_indices(t.y, train, shots, seed=cfg.seed * 1000 + s)
            if idx is None:
                out.note(f"{name}: {shots}-shot skipped (a class has fewer than {shots} training rows)", "skipped")
                break
            probe = probe_for(cfg, val_fraction=0.5, random_state=s).fit(t.x[idx], t.y[idx])
            probes.append((f"seed {s}", probe))
            _probe_record(out, name, f"lp_{shots}shot", probe, len(idx), "all", s)
            for head, model in (("lp", probe), ("proto", PrototypeHead(t.task.n_classes).fit(t.x[idx], t.y[idx]))):
                pred = np.concatenate([model.predict(t.x[block]) for block in _blocks(test, t.x.shape[1])])
                est = classification_metrics(t.y[test], pred, t.task.n_classes, 0)["accuracy"]
                out.add(name, f"{head}_{shots}shot", "accuracy", est, seed=s)
                accs[head].append(est.value)
        for head, values in accs.items():
            if values:
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                m, half = float(np.mean(values)), 1.96 * sd / np.sqrt(len(values))
                out.records.append(
                    {
                        "task": name,
                        "head": f"{head}_{shots}shot",
                        "metric": "accuracy",
                        "stratum": "mean_over_seeds",
                        "value": m,
                        "ci_low": m - half,
                        "ci_high": m + half,
                        "n": len(values),
                        "seed": None,
                    }
                )
        if shots > 1:
            for n in _edge_note(name, f"lp_{shots}shot", probes, cfg.cs):
                out.note(n, "probe_c_edge")


# ---- the registry: one runner per task-scoped head of head_specs.HEAD_SPECS ----------------------------


@dataclass
class HeadRun:
    """What the heads of one task share: its planned rows and folds, its batches, and which rows each
    head got right (`correct`: the alignment measures compare them after every head ran)."""

    out: Output
    t: TaskArrays
    plan: TaskPlan
    cfg: EvalConfig
    batch: str | None = None
    batches: np.ndarray | None = None
    correct: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def many_batches(self) -> bool:
        return self.batches is not None and len(set(self.batches)) >= 2


Runner = Callable[[HeadRun], None]
RUNNERS: dict[str, Runner] = {}


def runs(name: str) -> Callable[[Runner], Runner]:
    """Register the runner of a task head declared in `head_specs.HEAD_SPECS`."""
    spec = HEAD_SPECS.get(name)
    if spec is None or spec.scope != "task":
        raise ValueError(f"{name!r} is not a task head of head_specs.HEAD_SPECS")

    def register(fn: Runner) -> Runner:
        RUNNERS[name] = fn
        return fn

    return register


@runs("zs_prompt")
def _zs_prompt(h: HeadRun) -> None:
    _zero_shot(h.out, h.t, h.plan.test, h.cfg, h.correct)


@runs("batch")
def _batch(h: HeadRun) -> None:
    if h.batches is not None and h.batch is not None:
        _batch_effect(h.out, h.t, h.batches, h.batch, h.cfg)


@runs("map")
def _map(h: HeadRun) -> None:
    if h.batches is not None and h.batch is not None:
        _phenotypic_map(h.out, h.t, h.batches, h.batch, h.cfg)


@runs("lp")
def _lp(h: HeadRun) -> None:
    run_linear_probe(h.out, h.t, h.plan.folds, h.plan.test, h.cfg, h.correct, h.plan.grouped)


@runs("proto")
def _proto(h: HeadRun) -> None:
    t = h.t
    pred = np.full(len(t.y), -1, dtype=np.int64)
    for train, te in h.plan.folds:
        head = PrototypeHead(t.task.n_classes).fit(view(t.x, train), t.y[train])
        for block in _blocks(te, t.x.shape[1]):
            pred[block] = head.predict(t.x[block])
    _report(h.out, t, "proto", h.plan.test, pred[h.plan.test], h.cfg)
    h.correct["proto"] = pred == t.y


@runs("knn")
def _knn(h: HeadRun) -> None:
    # neighbours from another batch only where the folds do not already hold batches out
    nsb = h.batches if h.many_batches and not h.plan.grouped and h.plan.batch is None else None
    run_knn(h.out, h.t, h.plan.folds, h.plan.test, h.cfg, nsb)


@runs("fewshot")
def _fewshot(h: HeadRun) -> None:
    run_few_shot(h.out, h.t, h.plan.folds, h.cfg)
