"""Robustness in `probe evaluate` (task group `robustness/`): every clean run scored against its perturbed twins.

A perturbed twin (`probe extract --perturb blur:1`) holds the same dataset rows as its clean run,
each image perturbed before encoding. For every task of the clean run, `evaluate_twins` plans the
task exactly as the clean evaluation does (`protocol.plan_task`: same rows, classes and folds),
fits each head on the clean training rows of each fold and scores it on the clean and on the
perturbed test rows (`heads.robustness`); zero-shot heads need no training and are scored on both.
Rows are those valid in the clean run and in every twin. Results are rows of the long results
table: task `robustness/<task>`, stratum `perturb=<key>` (`perturb=<key>;class=<name>` per
class), heads `invariance` (cosines), `lp`, `proto`, `knn@k`, `zs_prompt`, `zs_caption` (metrics
accuracy_clean, accuracy, drop, retained, agreement) and `alignment` (lp_minus_zs on perturbed
rows). `summary` reduces them to one row per model: the mean drop over the perturbations every
model has, so that models are compared at matched severities (docs/concepts/robustness.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from .config import EvalConfig
from .errors import StoreError
from .heads import PromptZeroShot, PrototypeHead, caption_choice
from .heads.metrics import Estimate, paired_difference
from .heads.robustness import Predictor, clean_trained_predictions, invariance, row_cosines, shift_scores
from .heads.scoring import view
from .protocol import (
    HEAD_ERRORS,
    Output,
    TaskArrays,
    caption_groups,
    groups_of,
    knn_for,
    plan_task,
    probe_for,
    task_config,
)
from .store import EmbeddingStore, Run, RunArrays

PREFIX = "robustness/"
STRATUM = "perturb="
SHIFT_METRICS = ("accuracy_clean", "accuracy", "drop", "retained", "agreement")
# The registry heads this protocol re-scores on perturbed rows: heads fitted on clean training rows
# (keys of `_fitters`), and the class-prompt zero-shot head (no fitting: its text side is unperturbed).
TRAINED_HEADS = ("lp", "proto", "knn")
PROMPT_HEAD = "zs_prompt"
Twins = Sequence[tuple[str, np.ndarray]]  # (perturbation key, the twin's image embeddings, all run rows)


_TWIN_ARRAYS: dict[tuple[str, str, int], RunArrays] = {}  # the twins of the clean run last evaluated


def _cached(twins: Sequence[Run]) -> list[RunArrays]:
    """Each twin's arrays, read once and shared by every unit of its clean run (the units of a run
    share its twins' Run objects, and come run by run); only one run's twins are held at a time.
    Keyed by the Run object too (alive while cached), so a twin extracted again is read again."""
    keys = [(str(t.store_path), t.path, id(t)) for t in twins]
    kept = {k: _TWIN_ARRAYS.get(k) or RunArrays(t) for k, t in zip(keys, twins, strict=True)}
    _TWIN_ARRAYS.clear()
    _TWIN_ARRAYS.update(kept)
    return [kept[k] for k in keys]


def twin_arrays(twins: Sequence[Run], valid: np.ndarray) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """The rows valid in the clean run and in every twin, and each twin's (key, image embeddings).

    A twin whose rows do not match the clean run's in number is refused: its rows could not be
    paired with the clean ones."""
    shifted = []
    for twin, arrays in zip(twins, _cached(twins), strict=True):
        if len(arrays.valid) != len(valid):
            raise StoreError(
                f"{twin.path} has {len(arrays.valid)} rows, its clean run {len(valid)}: it is not a twin of it "
                f"(re-extract it with `probe extract --perturb {twin.perturbation}`)"
            )
        valid = valid & arrays.valid
        shifted.append((str(twin.perturbation), arrays.x))
    return valid, shifted


def _fitters(t: TaskArrays, cfg: EvalConfig, grouped: bool) -> dict[str, Callable[[np.ndarray], Predictor]]:
    """Per trained head, `fit(train rows) -> predictor` on the clean rows of `t`, as `protocol` fits it."""
    n = t.task.n_classes
    groups = groups_of(t) if grouped else None

    def lp(train: np.ndarray) -> Predictor:
        probe = probe_for(cfg).fit(view(t.x, train), t.y[train], groups=groups[train] if groups is not None else None)
        return lambda rows: {"lp": probe.predict(rows)}

    def proto(train: np.ndarray) -> Predictor:
        head = PrototypeHead(n).fit(view(t.x, train), t.y[train])
        return lambda rows: {"proto": head.predict(rows)}

    def knn(train: np.ndarray) -> Predictor:
        head = knn_for(cfg, n)
        head.fit(view(t.x, train), t.y[train])
        return lambda rows: {f"knn@{k}": p for k, p in head.predict_all(rows).items()}

    every = dict(zip(TRAINED_HEADS, (lp, proto, knn), strict=True))
    return {h: fit for h, fit in every.items() if h in cfg.heads}


def _add(out: Output, task: str, head: str, key: str, scores: dict[str, Estimate], stratum: str = "") -> None:
    for metric, est in scores.items():
        out.add(task, head, metric, est, stratum=f"{STRATUM}{key}{stratum}")


def evaluate_twins(t: TaskArrays, twins: Twins, cfg: EvalConfig) -> Output:
    """One task's robustness to each twin: invariance, and every head trained clean and scored perturbed.

    `t` is the clean run's task arrays (rows valid in every twin), `twins` each twin's key and
    image embeddings over all run rows (`twin_arrays`)."""
    cfg = task_config(cfg, t.task)
    out = Output()
    plan = plan_task(t, cfg)
    a, test, folds = plan.arrays, plan.test, plan.folds
    name = PREFIX + t.task.name
    if len(test) == 0 or not twins:
        out.note(f"{name}: skipped, no rows to test under --protocol {cfg.protocol}", "skipped")
        return out
    every = len(a.rows) == len(twins[0][1]) and bool((a.rows == np.arange(len(a.rows))).all())
    shifted = [x if every else x[a.rows] for _, x in twins]  # a task over every row: no copy
    keys = [k for k, _ in twins]
    y = a.y[test]
    for key, xp in zip(keys, shifted, strict=True):
        overall, per_class = invariance(row_cosines(a.x[test], xp[test]), y, a.task.n_classes)
        _add(out, name, "invariance", key, overall)
        for c, stats in per_class.items():
            _add(out, name, "invariance", key, stats, f";class={a.task.classes[c]}")
    clean: dict[str, np.ndarray] = {}
    perturbed: list[dict[str, np.ndarray]] = [{} for _ in twins]
    if PROMPT_HEAD in cfg.heads and a.prompt_emb is not None:
        zs = PromptZeroShot.from_templates(a.prompt_emb)
        clean[PROMPT_HEAD] = np.full(len(a.y), -1, dtype=np.int64)
        clean[PROMPT_HEAD][test] = zs.predict(a.x[test])
        for p, xp in zip(perturbed, shifted, strict=True):
            p["zs_prompt"] = np.full(len(a.y), -1, dtype=np.int64)
            p["zs_prompt"][test] = zs.predict(xp[test])
    for head, fit in _fitters(a, cfg, plan.grouped).items() if folds else ():
        try:
            got_clean, ps = clean_trained_predictions(fit, a.x, shifted, folds, len(a.y))
        except HEAD_ERRORS as exc:
            out.note(f"{name}: {head} skipped ({type(exc).__name__}: {exc})", "skipped")
            continue
        clean.update(got_clean)
        for p, got in zip(perturbed, ps, strict=True):
            p.update(got)
    if not folds and set(TRAINED_HEADS) & set(cfg.heads):
        out.note(f"{name}: trained heads skipped ({plan.how})", "skipped")
    for key, p in zip(keys, perturbed, strict=True):
        for head, pred in clean.items():
            _add(out, name, head, key, shift_scores(y, pred[test], p[head][test], cfg.n_boot, cfg.seed, cfg.ci_method))
        if "lp" in p and "zs_prompt" in p:
            right_lp, right_zs = p["lp"][test] == y, p["zs_prompt"][test] == y
            d = paired_difference(right_lp, right_zs, cfg.n_boot, cfg.seed, ci_method=cfg.ci_method)
            _add(out, name, "alignment", key, {"lp_minus_zs": d["difference"]})
    return out


def evaluate_caption_twins(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    captions: dict[str, tuple[np.ndarray, np.ndarray]],
    meta: pd.DataFrame,
    valid: np.ndarray,
    twins: Twins,
    cfg: EvalConfig,
) -> Output:
    """μ-Bench caption zero-shot on clean and perturbed images, pooled per group (coarse, fine) over
    the rows the clean caption unit scores (`robustness/mubench/<group>`, head `zs_caption`)."""
    out = Output()
    for group, (keys, keep) in caption_groups(captions, meta, valid, cfg).items():
        answers: list[np.ndarray] = []
        chosen: list[list[np.ndarray]] = [[] for _ in range(len(twins) + 1)]
        for ck in keys:
            options, answer = captions[ck]
            ok, pick, _ = caption_choice(image_emb, text_emb, options, answer)
            rows = np.flatnonzero(ok & keep)
            if rows.size == 0:
                continue
            answers.append(answer[rows])
            chosen[0].append(pick[rows])
            for j, (_, xp) in enumerate(twins, start=1):
                chosen[j].append(caption_choice(xp, text_emb, options, answer)[1][rows])
        if not answers:
            continue
        y, pc = np.concatenate(answers), np.concatenate(chosen[0])
        for (key, _), picks in zip(twins, chosen[1:], strict=True):
            scores = shift_scores(y, pc, np.concatenate(picks), cfg.n_boot, cfg.seed, cfg.ci_method)
            _add(out, f"{PREFIX}mubench/{group}", "zs_caption", key, scores)
    return out


# ---- reading the results back ------------------------------------------------------------------------

PERCEPTION = ("lp",)  # what the image encoder perceives: the probe trained on clean rows
ALIGNMENT = ("zs_prompt", "zs_caption")  # what reaches text: zero-shot heads


def _severity(key: str) -> tuple[str, float]:
    """(name, severity) of a perturbation key `name:severity` (NaN when not a number)."""
    name, _, sev = key.rpartition(":")
    try:
        return (name or key), float(sev)
    except ValueError:
        return (name or key), float("nan")


def long_table(table: pd.DataFrame) -> pd.DataFrame:
    """The robustness rows of a results table, overall (not per class), with `task` stripped of
    its prefix and the columns `key`, `perturbation` and `severity` parsed from the stratum."""
    if table.empty or "task" not in table:
        return pd.DataFrame()
    t = table[table["task"].astype(str).str.startswith(PREFIX) & table["stratum"].astype(str).str.startswith(STRATUM)]
    t = t[~t["stratum"].astype(str).str.contains(";", regex=False)]
    if t.empty:
        return pd.DataFrame()
    key = t["stratum"].astype(str).str.slice(len(STRATUM))
    parsed = [_severity(k) for k in key]
    return t.assign(
        task=t["task"].astype(str).str.slice(len(PREFIX)),
        key=key,
        perturbation=[p[0] for p in parsed],
        severity=[p[1] for p in parsed],
    ).reset_index(drop=True)


MEASURES = {
    # column: (heads, metric); averaged over the (dataset, task, head) cells every model has
    "perception_drop": (PERCEPTION, "drop"),
    "perception_retained": (PERCEPTION, "retained"),
    "alignment_drop": (ALIGNMENT, "drop"),
    "alignment_retained": (ALIGNMENT, "retained"),
    "knn_agreement@10": (("knn@10",), "agreement"),
    "cosine_median": (("invariance",), "cosine_median"),
}


def per_perturbation(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, perturbation key): each MEASURES column averaged over the (dataset, task,
    head) cells that every model with that measure and key has (an image-only model has no
    alignment rows, and does not remove them from the others), so models are compared on the same
    tasks; `tasks` counts those cells for the perception drop."""
    t = long_table(table)
    if t.empty:
        return pd.DataFrame()
    rows: dict[tuple[str, str], dict] = {}
    for column, (heads, metric) in MEASURES.items():
        m = t[t["head"].isin(heads) & (t["metric"] == metric)]
        cell = ["key", "dataset", "task", "head"]  # kept where every model with this measure and key has it
        m = m[m.groupby(cell)["model"].transform("nunique") == m.groupby("key")["model"].transform("nunique")]
        for (model, key), g in m.groupby(["model", "key"]):
            row = rows.setdefault((str(model), str(key)), {"model": model, "key": key})
            row[column] = float(g["value"].astype(float).mean())
            if column == "perception_drop":
                row["tasks"] = len(g)
    if not rows:
        return pd.DataFrame()
    out = pd.DataFrame(list(rows.values()))
    parsed = [_severity(k) for k in out["key"]]
    out.insert(2, "perturbation", [p[0] for p in parsed])
    out.insert(3, "severity", [p[1] for p in parsed])
    return out.sort_values(["model", "perturbation", "severity"], kind="stable").reset_index(drop=True)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model: the mean of each measure over the perturbation keys every model has
    (matched severities), with their number; a PathoROB-style average performance drop is
    `1 - perception_retained` (or alignment)."""
    p = per_perturbation(table)
    if p.empty:
        return pd.DataFrame()
    keys = p.groupby("key")["model"].nunique()
    matched = keys[keys == p["model"].nunique()].index
    p = p[p["key"].isin(matched)]
    columns = [c for c in MEASURES if c in p]
    out = p.groupby("model")[columns].mean().reset_index()
    out.insert(1, "perturbations", p.groupby("model")["key"].nunique().to_numpy())
    return out


def ready_twins(store: EmbeddingStore, run: Run, among: Sequence[Run] | None = None) -> tuple[list[Run], list[str]]:
    """The complete perturbed twins of `run` (among one scan of the store's runs, when given), and a
    note for each one still being extracted."""
    ready, notes = [], []
    for twin in store.twins(run, among):
        if twin.complete:
            ready.append(twin)
        else:
            notes.append(
                f"{run.model_spec}: perturbed run {twin.perturbation} skipped, still being extracted; finish it "
                f"with `probe extract --model {run.model_spec} --perturb {twin.perturbation} ...`"
            )
    return ready, notes
