"""Evaluation speed on a synthetic store: full `probe evaluate`, probe sweep vs LogisticRegressionCV,
FAISS kNN vs scikit-learn NearestNeighbors(metric="cosine").

  python benchmarks/evaluate_speed.py [--n 20000 --dim 512 --classes 20]

Everything is measured in this one run on the same arrays; figures are medians of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.neighbors import NearestNeighbors

from mubench_probe import api
from mubench_probe.heads.knn import KNNHead, search
from mubench_probe.heads.linear import DEFAULT_CS, DEFAULT_MAX_ITER, DEFAULT_TOL, LinearProbe
from mubench_probe.store import EmbeddingStore, RunLayout, l2_normalize
from mubench_probe.tasks import DEFAULT_TEMPLATES, prompt_texts


def synthetic(n: int, dim: int, classes: int, seed: int = 0, spread: float = 8.0):
    """Unit vectors around random class centres; `spread` sets how much classes overlap."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(classes, dim)))
    y = rng.integers(0, classes, size=n)
    x = l2_normalize(centres[y] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim))
    return x, y, centres


def build_store(path: str, x: np.ndarray, y: np.ndarray, centres: np.ndarray) -> None:
    classes = [f"class {i}" for i in range(len(centres))]
    texts = [t for row in prompt_texts(classes, DEFAULT_TEMPLATES) for t in row]
    rng = np.random.default_rng(1)
    text_emb = np.repeat(centres, len(DEFAULT_TEMPLATES), axis=0) + 0.5 * rng.normal(size=(len(texts), x.shape[1]))
    meta = pd.DataFrame({"label_name": [classes[i] for i in y], "dataset": "synthetic"})
    st = EmbeddingStore(path, create=True)
    layout = RunLayout(len(x), x.shape[1], 4096, "float16")
    prov = {
        "model_spec": "synthetic:random",
        "backend": "synthetic",
        "weights_hash": "0",
        "has_text": True,
        "dataset_spec": "synthetic",
    }
    run = st.prepare_run(
        "synthetic/synthetic/test",
        prov,
        layout,
        meta,
        texts,
        {},
        {"templates": list(DEFAULT_TEMPLATES), "tasks": {"fine/synthetic": classes}},
    )
    for ci in range(layout.n_chunks):
        sl = layout.chunk_slice(ci)
        run.write_chunk(ci, x[sl], [""] * (sl.stop - sl.start))
    run.write_text_embeddings(text_emb)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()
    x, y, centres = synthetic(args.n, args.dim, args.classes)
    train, test = next(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))
    print(f"synthetic {args.n} x {args.dim}, {args.classes} classes; one fold: {len(train)} train / {len(test)} test")

    # -- probe sweep vs LogisticRegressionCV on the same C grid and validation split ------------------
    inner_tr, inner_va = train_test_split(np.arange(len(train)), test_size=0.2, stratify=y[train], random_state=0)
    warnings.simplefilter("ignore", ConvergenceWarning)
    t_ours, probe = timed(lambda: LinearProbe().fit(x[train], y[train]), args.repeats)
    t_cv, cv = timed(
        lambda: LogisticRegressionCV(
            Cs=list(DEFAULT_CS),
            cv=[(inner_tr, inner_va)],
            tol=DEFAULT_TOL,
            max_iter=DEFAULT_MAX_ITER,
            solver="lbfgs",
            scoring="accuracy",
            use_legacy_attributes=False,
        ).fit(x[train], y[train]),
        args.repeats,
    )
    acc_ours, acc_cv = probe.score(x[test], y[test]), cv.score(x[test], y[test])
    print(
        f"probe sweep       {t_ours:7.2f} s  C={probe.C_:g}  test acc {acc_ours:.4f}  "
        f"({len(probe.val_scores_)} of {len(DEFAULT_CS)} C values fitted)"
    )
    print(f"LogisticRegCV     {t_cv:7.2f} s  C={float(np.ravel(cv.C_)[0]):g}  test acc {acc_cv:.4f}")
    print(
        f"  ratio sweep/LRCV = {t_ours / t_cv:.2f}  (target <= 0.5), accuracy difference "
        f"{100 * (acc_ours - acc_cv):+.2f} pt (target within 0.5)"
    )

    # -- kNN: FAISS vs scikit-learn -------------------------------------------------------------------
    ks = (1, 5, 10, 20)
    t_faiss, _ = timed(lambda: KNNHead(ks).fit(x[train], y[train]).predict_all(x[test]), args.repeats)
    t_sk, (_, idx) = timed(
        lambda: NearestNeighbors(n_neighbors=max(ks), metric="cosine").fit(x[train]).kneighbors(x[test]), args.repeats
    )
    same = np.mean(np.sort(idx, axis=1) == np.sort(search(x[train], x[test], max(ks))[1], axis=1))
    print(f"kNN FAISS         {t_faiss:7.3f} s (search + votes for k={ks})")
    print(
        f"kNN scikit-learn  {t_sk:7.3f} s (neighbours only)   ratio FAISS/sklearn = {t_faiss / t_sk:.2f}; "
        f"same neighbours {100 * same:.2f}%"
    )

    # -- full evaluation of one model -------------------------------------------------------------------
    if not args.skip_full:
        with tempfile.TemporaryDirectory() as d:
            build_store(f"{d}/s.zarr", x, y, centres)
            t0 = time.perf_counter()
            res = api.evaluate(f"{d}/s.zarr", results_dir=f"{d}/results")
            t_full = time.perf_counter() - t0
            s = api.summary(res.table).iloc[0]
        print(
            f"full evaluation   {t_full:7.1f} s (all heads, 5 folds, few-shot 5 x 5, 1000 bootstrap; "
            f"target < 120 s)  ZS {s['ZS'][0]:.3f} LP {s['LP'][0]:.3f} kNN@10 {s['kNN@10'][0]:.3f} "
            f"proto {s['proto'][0]:.3f}"
        )


if __name__ == "__main__":
    main()
