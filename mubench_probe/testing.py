"""Hard synthetic data and stores for testing heads and protocols (no models, no network).

Easy data hides bugs: the bundled BCCD sample is nearly linearly separable, so a linear probe
stuck at its strongest regularisation still passed every test. Real embeddings are
anisotropic: unit vectors in a narrow cone around one common direction, with the class signal
in a small residual. `hard_embeddings` builds exactly that, with weak, imbalanced classes and an
anisotropic noise spectrum; `multi_source_store` writes a μ-Bench-like store with several
source datasets, coarse attributes shared by some sources and owned by one, class prompts,
per-image caption options and a `split` column, so every protocol can be tested on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .datasets.base import slug
from .perturb import from_key
from .store import EmbeddingStore, Run, RunLayout
from .store.layout import model_dir
from .tasks import derive_tasks, prompt_texts, unique_texts


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _noise(rng: np.random.Generator, n: int, dim: int, decay: float) -> np.ndarray:
    """Gaussian noise with a power-law spectrum (decay 0 = isotropic) in a random basis, unit mean norm."""
    spectrum = 1.0 / np.arange(1, dim + 1) ** decay
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    noise = (rng.normal(size=(n, dim)) * spectrum) @ basis.T
    return noise / np.sqrt((noise**2).sum(axis=1).mean())


def hard_embeddings(
    n: int = 1500,
    dim: int = 768,
    classes: int = 10,
    *,
    residual: float = 0.2,
    signal: float = 0.1,
    imbalance: float = 0.1,
    decay: float = 0.0,
    min_rows: int = 0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors `normalize(u + r)`: a common direction u plus a residual r of mean norm `residual`.

    The residual is `signal * class_mean + noise` (class means orthogonal to u, unit noise), so
    the class signal is weak and sits in a small part of each vector. Class frequencies fall as
    exp(-imbalance * c); `min_rows` forces at least that many rows in every class (the rarest
    last). With the defaults (768-d, 10 classes) every prediction is the majority class until
    C is about 0.3, and an exhaustive sweep of C picks 300-3000.
    """
    rng = np.random.default_rng(seed)
    u = _unit(rng.normal(size=dim))
    means = rng.normal(size=(classes, dim))
    means = _unit(means - np.outer(means @ u, u))
    p = np.exp(-imbalance * np.arange(classes))
    y = rng.choice(classes, size=n, p=p / p.sum())
    for c in range(classes):  # make sure small classes exist with at least min_rows rows
        short = min_rows - int((y == c).sum())
        if short > 0:
            donors = np.flatnonzero(y == np.bincount(y, minlength=classes).argmax())
            y[rng.choice(donors, size=short, replace=False)] = c
    r = signal * means[y] + _noise(rng, n, dim, decay)
    r -= np.outer(r @ u, u)
    r *= residual / np.sqrt((r**2).sum(axis=1).mean())
    return _unit(u + r).astype(np.float32), y.astype(np.int64)


@dataclass(frozen=True)
class Source:
    """One source dataset of a synthetic μ-Bench-like store."""

    name: str
    classes: int
    rows: int
    modality: str
    stain: str
    domain: str


DEFAULT_SOURCES = (
    Source("histo_a", 7, 260, "light microscopy", "H&E", "pathology"),
    Source("histo_b", 5, 220, "light microscopy", "H&E", "pathology"),
    Source("fluo_a", 6, 240, "fluorescence microscopy", "DAPI", "cell biology"),
    Source("fluo_b", 4, 200, "fluorescence microscopy", "DAPI", "cell biology"),
    Source("em_a", 3, 140, "electron microscopy", "uranyl acetate", "cell biology"),
)
COARSE = ("domain", "modality", "stain")
CAPTION_TEMPLATES = ("a {} image.", "an image taken with {}.")


def write_run(
    store: str | Path | EmbeddingStore,
    x: np.ndarray,
    meta: pd.DataFrame,
    *,
    text_vectors: Mapping[str, np.ndarray] | None = None,
    captions: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    templates: Sequence[str] = ("a microscopy image of {}.",),
    model: str = "synthetic:random",
    dataset: str = "synth",
    chunk_rows: int = 64,
    dtype: str = "float32",
    failures: Sequence[str] | None = None,
    perturbation: str | None = None,
) -> Run:
    """Write one run through the store API, as `probe extract` would, from arrays.

    `perturbation` (a key such as "blur:1") writes the perturbed twin of the same run, keyed
    and placed as `probe extract --perturb` places it. `text_vectors` maps every text the heads
    need (class prompts, caption options) to its embedding; None makes an image-only run.
    `captions[key]` holds (options (N, K) indices into the text table, answer (N,)), with the
    text table ordered as `list(text_vectors)`.
    """
    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store, create=True)
    tasks = derive_tasks(meta)
    texts = list(text_vectors) if text_vectors is not None else []
    layout = RunLayout(len(x), x.shape[1], chunk_rows, dtype)
    prov = {
        "model_spec": model,
        "backend": "synthetic",
        "weights_hash": "0",
        "has_text": text_vectors is not None,
        "dataset_spec": dataset,
    }
    pert = from_key(perturbation) if perturbation is not None else None
    if pert is not None:
        prov["perturbation"] = pert.provenance()
    plan = {"templates": list(templates), "tasks": {t.name: list(t.classes) for t in tasks}}
    top = model_dir(model.replace(":", "_"), slug(pert.key) if pert is not None else None)
    run = st.prepare_run(f"{top}/{dataset}/test", prov, layout, meta, texts, captions or {}, plan)
    fails = list(failures) if failures is not None else [""] * len(x)
    for ci in range(layout.n_chunks):
        sl = layout.chunk_slice(ci)
        run.write_chunk(ci, x[sl], fails[sl])
    if text_vectors is not None:
        run.write_text_embeddings(np.array([text_vectors[t] for t in texts]))
    return run


def multi_source_store(
    path: str | Path,
    *,
    dim: int = 128,
    sources: Sequence[Source] = DEFAULT_SOURCES,
    models: Sequence[str] = ("synthetic:a",),
    templates: Sequence[str] = ("a microscopy image of {}.", "a micrograph of {}."),
    residual: float = 0.2,
    signal: float = 0.6,
    attribute_signal: float = 0.5,
    alignment: float = 0.5,
    test_fraction: float = 0.25,
    seed: int = 0,
    chunk_rows: int = 64,
) -> Path:
    """A μ-Bench-like store with several source datasets, for every protocol and head.

    Rows of each source carry `label_name` (the source's own classes), `dataset`, coarse
    attributes (`domain`, `modality`, `stain`; with the defaults `electron microscopy` and
    `uranyl acetate` occur in one source only), a `split` column (train/test) and caption
    options for every attribute (two sentence templates) and the fine classes
    (`classification_0`, `classification_1`), as μ-Bench stores them. Images are
    `hard_embeddings`-style cone vectors whose residual carries attribute and class signal; text
    vectors sit in their own cone (a modality gap) and point partly (`alignment`) to the class
    signal. Each model in `models` gets its own, differently seeded, run.
    """
    rng0 = np.random.default_rng(seed)
    meta_parts, labels_per_source = [], {}
    for s in sources:
        p = np.exp(-0.15 * np.arange(s.classes))
        y = rng0.choice(s.classes, size=s.rows, p=p / p.sum())
        y[: s.classes] = np.arange(s.classes)  # every class present
        names = [f"{s.name} class {c}" for c in range(s.classes)]
        labels_per_source[s.name] = names
        split = np.where(rng0.random(s.rows) < test_fraction, "test", "train")
        meta_parts.append(
            pd.DataFrame(
                {
                    "label_name": [names[c] for c in y],
                    "dataset": s.name,
                    "domain": s.domain,
                    "modality": s.modality,
                    "stain": s.stain,
                    "split": split,
                    "image_id": [f"{s.name}-{i}" for i in range(s.rows)],
                }
            )
        )
    meta = pd.concat(meta_parts, ignore_index=True)
    for i, model in enumerate(models):
        rng = np.random.default_rng(seed + 1000 * (i + 1))
        u, v = _unit(rng.normal(size=dim)), _unit(rng.normal(size=dim))
        directions: dict[str, np.ndarray] = {}

        def direction(key: str, rng: np.random.Generator = rng, directions: dict = directions) -> np.ndarray:
            if key not in directions:
                directions[key] = _unit(rng.normal(size=dim))
            return directions[key]

        r = _noise(rng, len(meta), dim, 0.3)
        for attr in COARSE:
            r += attribute_signal * np.stack([direction(f"{attr}={a}") for a in meta[attr]])
        r += attribute_signal * np.stack([direction(f"dataset={d}") for d in meta["dataset"]])
        r += signal * np.stack([direction(f"label={c}") for c in meta["label_name"]])
        r -= np.outer(r @ u, u)
        r *= residual / np.sqrt((r**2).sum(axis=1).mean())
        x = _unit(u + r).astype(np.float32)

        def text_vec(key: str, rng: np.random.Generator = rng, v: np.ndarray = v) -> np.ndarray:
            aligned = alignment * direction(key) + (1 - alignment) * _unit(rng.normal(size=dim))
            return _unit(v + 0.5 * _unit(aligned))

        texts: dict[str, np.ndarray] = {}
        for task in derive_tasks(meta):
            for cls, row in zip(task.classes, prompt_texts(task.classes, templates), strict=True):
                key = f"label={cls}" if task.kind == "fine" else f"{task.column}={cls}"
                for t in row:
                    texts.setdefault(t, text_vec(key))
        captions = _captions(meta, labels_per_source, texts, text_vec)
        write_run(
            path,
            x,
            meta,
            text_vectors=texts,
            captions=captions,
            templates=templates,
            model=model,
            dataset="multi",
            chunk_rows=chunk_rows,
        )
    return Path(path)


def _captions(
    meta: pd.DataFrame, labels: Mapping[str, list[str]], texts: dict[str, np.ndarray], text_vec: Any
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """μ-Bench-style caption options: every value of an attribute (or the source's classes) per image."""
    keys: dict[str, tuple[str, Sequence[str], list[str]]] = {}
    for j, tmpl in enumerate(CAPTION_TEMPLATES):
        suffix = "" if j == 0 else "_1"
        for attr in COARSE:
            keys[f"{attr}{suffix}"] = (tmpl, sorted(meta[attr].unique()), list(meta[attr]))
        keys[f"classification_{j}"] = (tmpl, [], list(meta["label_name"]))
    out = {}
    for key, (tmpl, values, truth) in keys.items():
        attr = key.removesuffix("_1") if not key.startswith("classification") else "label"
        rows_options = []
        for i in range(len(truth)):
            opts = values or labels[meta["dataset"].iloc[i]]
            rows_options.append([tmpl.format(o) for o in opts])
        for sentence in unique_texts(rows_options):  # each option's vector points to its own value
            texts.setdefault(sentence, text_vec(f"{attr}={_value_of(sentence, tmpl)}"))
        index = {t: k for k, t in enumerate(texts)}
        width = max(len(o) for o in rows_options)
        options = np.full((len(truth), width), -1, dtype=np.int32)
        answer = np.zeros(len(truth), dtype=np.int32)
        for i, (opts, t) in enumerate(zip(rows_options, truth, strict=True)):
            options[i, : len(opts)] = [index[o] for o in opts]
            answer[i] = opts.index(tmpl.format(t))
        out[key] = (options, answer)
    return out


def _value_of(sentence: str, template: str) -> str:
    head, _, tail = template.partition("{}")
    return sentence[len(head) : len(sentence) - len(tail)]


def sources_per_class(n_sources: int, classes: int) -> np.ndarray:
    """How many sources carry each class in `confounded_sources`: two each (so that every class
    survives `_plan_kfold`, which drops classes of a single source), the rest going two to class 0
    for one to class 1 (8 sources, 3 classes: 4, 2, 2; 10 sources: 5, 3, 2)."""
    if classes < 2 or n_sources < 2 * classes:
        raise ValueError(f"{classes} classes need at least {2 * classes} sources, not {n_sources}")
    per = np.full(classes, 2)
    for i in range(n_sources - 2 * classes):
        per[1 if i % 3 == 2 else 0] += 1
    return per


def confounded_sources(
    n_sources: int = 8,
    rows_per_source: int = 150,
    dim: int = 256,
    classes: int = 3,
    *,
    signal: float = 0.75,
    batch: float = 1.3,
    residual: float = 0.2,
    decay: float = 1.0,
    spread: float = 0.45,
    minority_rows: float = 0.65,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multi-source cone embeddings whose class is constant within each source: (x, y, groups).

    A coarse attribute (domain, modality, stain) is constant within a source dataset, so a
    grouped protocol tests every class on unseen sources. Rows are `hard_embeddings`-style unit
    vectors `normalize(u + r)`, the residual r (mean norm `residual`) being
    `signal * class_mean + batch * source_offset + noise`: class means and source offsets are
    random unit directions orthogonal to u, the noise (unit mean norm) has a power-law spectrum
    (`decay`), most of it in a few directions. The source offset (the batch effect) is larger
    than the class signal; a linear separator for the class exists, and `PrototypeHead`
    transfers to held-out sources (on most seeds, see below). Sources per class are uneven
    (`sources_per_class`: 4, 2, 2 by default), and so are their sizes: `rows_per_source` times
    a log-normal factor (sigma `spread`), times `minority_rows` for sources of classes other
    than 0. `groups` holds source names.

    What it reproduces (issue 18): on grouped outer folds (StratifiedGroupKFold by source, as
    protocol `_plan_kfold`; `grouped_folds`), `LinearProbe(select="accuracy").fit(x, y, groups=...)`
    validates C on held-out sources. A class with two sources in the outer training fold is learnt
    there from the one left in inner training, and its held-out validation source is recognised
    at no C while the class-0 validation rows are right at every C: the validation curve is flat
    (where no source can be held out, the in-source fallback split instead reaches 1.0 at a small
    C and stays there), ties go to the smallest such C, and its probe predicts the training
    majority class for a whole held-out source. The outer training fold holds one more source per
    class, and there proto and LogisticRegression at a large fixed C transfer. With the defaults
    and seed 2 (1092 rows, majority 57.8%): accuracy-selected lp 58.0%, proto 89.3%, a probe at
    C = 10^4 89.6%. Seeds 0-7 put accuracy-selected lp 0-25 points above the majority rate and
    proto 2-52 points above it (seed 4: nothing transfers). Balanced accuracy fails the same way:
    its curve is flat or saturated in the same folds (it reweighs classes, it breaks no ties);
    log-loss, a continuous score, does not tie (tests/test_probe_selection.py,
    benchmarks/probe_selection.py).
    """
    per = sources_per_class(n_sources, classes)
    rng = np.random.default_rng(seed)
    u = _unit(rng.normal(size=dim))

    def directions(k: int) -> np.ndarray:
        m = rng.normal(size=(k, dim))
        return _unit(m - np.outer(m @ u, u))

    means = directions(classes)
    offsets = directions(n_sources)
    label = np.repeat(np.arange(classes), per)
    factor = np.exp(spread * rng.normal(size=n_sources)) * np.where(label == 0, 1.0, minority_rows)
    size = np.maximum(20, np.round(rows_per_source * factor)).astype(int)
    src = np.repeat(np.arange(n_sources), size)
    y = label[src]
    r = signal * means[y] + batch * offsets[src] + _noise(rng, len(y), dim, decay)
    r -= np.outer(r @ u, u)
    r *= residual / np.sqrt((r**2).sum(axis=1).mean())
    groups = np.array([f"source_{s}" for s in range(n_sources)])[src]
    return _unit(u + r).astype(np.float32), y.astype(np.int64), groups


def grouped_folds(y: np.ndarray, groups: np.ndarray, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outer (train, test) folds that test every source once: StratifiedGroupKFold, as protocol `_plan_kfold`."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = min(k, len(np.unique(groups)))
    return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))


def exhaustive_reference(
    x: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    groups: np.ndarray | None = None,
    selects: Sequence[str] = ("accuracy", "balanced_accuracy", "log_loss"),
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, tuple[float, np.ndarray]]:
    """What `LinearProbe(select=s).fit(x[train], y[train], groups=groups[train])` should predict on
    x[test], from plain scikit-learn: {select: (chosen C, predictions)}.

    The same inner split as the probe (`grouped_validation_split` when groups are given, else or
    where it returns None `validation_split`), every C of DEFAULT_CS fitted from scratch by
    LogisticRegression(C, tol=1e-8, max_iter=20000) on float64, C chosen by accuracy,
    `balanced_accuracy_score` or `log_loss` (labels: the inner training classes) on the
    validation rows, ties to the smaller C, then refitted on all of x[train]. No early stopping:
    the probe's `patience` must not change its choice.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, log_loss

    from .config import DEFAULT_CS
    from .heads.linear import grouped_validation_split, serial_optimizer_blas, validation_split

    xt, yt = np.asarray(x, dtype=np.float64)[train], np.asarray(y)[train]
    split = None
    if groups is not None:
        split = grouped_validation_split(yt, np.asarray(groups)[train].astype(str), val_fraction, seed)
    tr, va = split if split is not None else validation_split(yt, val_fraction, seed)
    scores: dict[str, list[float]] = {s: [] for s in selects}
    refits: dict[float, np.ndarray] = {}
    out = {}
    with warnings.catch_warnings(), serial_optimizer_blas():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # validation may lack a training class: scored over the classes it holds, as the probe
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        for c in DEFAULT_CS:
            m = LogisticRegression(C=c, tol=1e-8, max_iter=20000).fit(xt[tr], yt[tr])
            pred = m.predict(xt[va])
            for s in selects:
                if s == "accuracy":
                    scores[s].append(float((pred == yt[va]).mean()))
                elif s == "balanced_accuracy":
                    scores[s].append(float(balanced_accuracy_score(yt[va], pred)))
                elif s == "log_loss":
                    scores[s].append(-float(log_loss(yt[va], m.predict_proba(xt[va]), labels=m.classes_)))
                else:
                    raise ValueError(f"unknown selection criterion {s!r}")
        for s in selects:
            best = DEFAULT_CS[int(np.argmax(scores[s]))]  # argmax: ties go to the smaller C
            if best not in refits:
                refits[best] = LogisticRegression(C=best, tol=1e-8, max_iter=20000).fit(xt, yt).predict(x[test])
            out[s] = (best, refits[best])
    return out


def rotation_invariant(encoder: Any) -> Any:
    """`encoder` made invariant to 90-degree rotations by construction: its image embedding is the
    mean of the embeddings of the 4 rotations of the preprocessed input. Under `rotate:90` its
    perturbed run must equal the clean one (to the preprocessing's resampling error), which
    tests the perturbed-extraction path end to end. Its spec is `rot4(SPEC)`."""
    import dataclasses

    import torch

    from .encoders.base import Encoder

    class Rot4(Encoder):
        def __init__(self, inner: Encoder) -> None:
            self.inner = inner
            self.info = dataclasses.replace(inner.info, spec=f"rot4({inner.info.spec})")
            self.transform, self.device = inner.transform, inner.device
            self.precision, self.memory_format = inner.precision, inner.memory_format

        def _images(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            outs = [self.inner._images(torch.rot90(x, k, dims=(-2, -1)), features) for k in range(4)]
            emb = torch.stack([o[0].float() for o in outs]).mean(0)
            feats = [o[1].float() for o in outs if o[1] is not None]
            return emb, (torch.stack(feats).mean(0) if features and len(feats) == 4 else None)

        def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
            return self.inner.encode_texts(texts, batch_size)

    return Rot4(encoder)
