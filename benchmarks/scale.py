"""Evaluation at a million rows, measured in one run on this machine.

  python benchmarks/scale.py [--rows 1000000] [--dim 768] [--classes 100] [--keep DIR] [--steps 2,3,4]

1. Writes a synthetic ROWS x DIM float16 store (CLASSES classes, image-only) through the store
   API.
2. kNN on a 200,000-row subset (160,000 gallery, 40,000 queries): an IVF index (exact re-scoring
   of its candidates) vs exact search, time ratio and recall@10, for a growing share of lists
   probed until recall@10 >= 0.95.
3. `probe evaluate` on the whole store in a fresh process (heads proto and knn, --knn-index
   IVF1024,Flat:nprobe=8, 2 folds, 100 bootstrap resamples): peak RSS (VmHWM) against the
   float32 array size (target <= 2x), time, and the index's recall (a few lists probed, to
   keep the run short on 2 cores: the recall target is shown on the subset in 2).
4. Linear probe, torch vs scikit-learn backend (the same objective and sweep) on --probe-rows
   rows of the store (the first --probe-classes classes, C grid 1, 10): time ratio, chosen C, held-out
   accuracy difference. On this CPU-only machine torch runs float64 on the CPU: the time ratio
   says what the backend costs here, not what a GPU gives.
Sizes are flags so the script fits the machine; the defaults take about 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mubench_probe.heads import KNNHead, LinearProbe
from mubench_probe.store import EmbeddingStore, RunLayout

EVALUATE = textwrap.dedent(
    """
    import json, sys, time
    from mubench_probe import api
    from mubench_probe.config import EvalConfig
    import faiss, sklearn.linear_model, pandas  # libraries loaded before the baseline

    def status(key):
        return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

    base, t0 = status("VmRSS"), time.perf_counter()
    cfg = EvalConfig(heads=("proto", "knn"), n_boot=100, folds=2, knn_index=sys.argv[2], strata=())
    res = api.evaluate(sys.argv[1], cfg)
    t = res.table
    acc = {h: float(t[(t["head"] == h) & (t["metric"] == "accuracy") & (t["stratum"] == "all")]["value"].iloc[0])
           for h in ("proto", "knn@10")}
    recall = t[t["metric"] == "index_recall@10"]["value"]
    print(json.dumps({"base": base, "peak": status("VmHWM"), "seconds": time.perf_counter() - t0, "acc": acc,
                      "recall": float(recall.iloc[0]) if len(recall) else None}))
    """
)


def make_store(path: Path, rows: int, dim: int, classes: int, seed: int = 0, chunk: int = 8192) -> None:
    """Unit vectors shaped like real embeddings: a narrow cone around one axis, class means and
    within-class variation in one 64-d subspace (classes overlap), a little isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, 65)))[0].T.astype(np.float32)  # 64-d subspace + a common axis
    spectrum = (1.0 / np.arange(1, 65) ** 1.0).astype(np.float32)  # a decaying spectrum, as real embeddings have
    means = (rng.standard_normal((classes, 64), dtype=np.float32) * spectrum) @ basis[:64] * 1.2 + basis[64]  # a cone
    y = rng.integers(0, classes, rows)
    meta = pd.DataFrame({"label_name": [f"class {c:03d}" for c in y], "dataset": "synthetic"})
    st = EmbeddingStore(path, create=True)
    prov = {"model_spec": "synthetic:scale", "backend": "synthetic", "weights_hash": "0", "has_text": False}
    layout = RunLayout(rows, dim, chunk, "float16")
    run = st.prepare_run("synthetic_scale/synthetic/test", prov, layout, meta, [], {}, {})
    for ci in range(layout.n_chunks):
        sl = layout.chunk_slice(ci)
        m = sl.stop - sl.start
        latent = (rng.standard_normal((m, 64), dtype=np.float32) * spectrum) @ basis[:64] * 0.6
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (0.1 / np.sqrt(dim))
        x = means[y[sl]] + latent + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        run.write_chunk(ci, x, [""] * m)


def evaluate_memory(store: Path, rows: int, dim: int, index: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", EVALUATE, str(store), index], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    m = json.loads(out.stdout.strip().splitlines()[-1])
    x32 = rows * dim * 4
    print(
        f"3. evaluate {rows:,} x {dim} fp16 store (proto + kNN via {index}, 2 folds): {m['seconds']:.0f} s; "
        f"float32 embeddings {x32 / 2**30:.2f} GiB; peak RSS {m['peak'] / 2**30:.2f} GiB = "
        f"**{m['peak'] / x32:.2f}x** (libraries before evaluating: {m['base'] / 2**30:.2f} GiB; growth "
        f"{(m['peak'] - m['base']) / x32:.2f}x) — target <= 2x"
    )
    print(
        f"   accuracy proto {m['acc']['proto']:.4f}, knn@10 {m['acc']['knn@10']:.4f}; index recall@10 vs exact "
        f"(1,000 test rows per fold) {m['recall']:.4f}"
    )


def knn_subset(store: Path, n: int, nlist: int) -> None:
    """IVF vs exact kNN on the first n rows, probing 1/64, 1/32, ... of the lists until recall@10 >= 0.95.

    FAISS scans an IVF list query by query (no matrix product), while exact search is one BLAS
    product: on a CPU, IVF pays off only when it scans a small share of a large gallery."""
    (run,) = EmbeddingStore(store).runs()
    x = run.image_embeddings()[:n]
    y = pd.factorize(run.meta()["label_name"].to_numpy()[:n], sort=True)[0]
    train, test = np.arange(n) % 5 != 0, np.arange(n) % 5 == 0
    t0 = time.perf_counter()
    exact = KNNHead((10,)).fit(x[train], y[train])
    e_pred = exact.predict(x[test])
    t_exact = time.perf_counter() - t0
    print(
        f"2. kNN on {n:,} rows ({train.sum():,} gallery, {test.sum():,} queries, k=10): exact search {t_exact:.1f} s, "
        f"accuracy {np.mean(e_pred == y[test]):.4f}; IVF{nlist},Flat (build + search; recall@10 vs exact on 2,000 "
        "queries, target >= 0.95):"
    )
    for frac in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4):
        spec = f"IVF{nlist},Flat:nprobe={max(1, int(nlist * frac))}"
        t0 = time.perf_counter()
        ann = KNNHead((10,), index=spec).fit(x[train], y[train])
        a_pred = ann.predict(x[test])
        t_ann = time.perf_counter() - t0
        recall = ann.recall(x[test][:2000], 10)
        print(
            f"   {spec:28s} {t_ann:6.1f} s = **{t_ann / t_exact:.2f}x** exact; recall@10 {recall:.4f}; "
            f"same predictions {np.mean(a_pred == e_pred):.4f}; accuracy {np.mean(a_pred == y[test]):.4f}"
        )
        if recall >= 0.95:
            break


def probe_backends(store: Path, n: int, classes: int) -> None:
    (run,) = EmbeddingStore(store).runs()
    labels = pd.factorize(run.meta()["label_name"].to_numpy(), sort=True)[0]
    rows = np.flatnonzero(labels < classes)[:n]
    x, y = run.image_embeddings()[rows], labels[rows]
    test = np.arange(len(y)) % 5 == 0
    cs = (1.0, 10.0)
    out = {}
    for backend in ("sklearn", "torch"):
        t0 = time.perf_counter()
        probe = LinearProbe(Cs=cs, backend=backend, device="cpu").fit(x[~test], y[~test])
        out[backend] = (time.perf_counter() - t0, probe.C_, probe.score(x[test], y[test]), probe.n_iter_)
    (ts, cs_, accs, its), (tt, ct, acct, itt) = out["sklearn"], out["torch"]
    print(
        f"4. probe on {len(y):,} rows x {x.shape[1]} ({classes} classes, C grid {cs}): sklearn {ts:.1f} s "
        f"({its} iterations, C={cs_:g}, test acc {accs:.4f}); torch (CPU, float64) {tt:.1f} s ({itt} iterations, "
        f"C={ct:g}, test acc {acct:.4f}): time ratio torch/sklearn **{tt / ts:.2f}**, same C: {cs_ == ct}, "
        f"accuracy difference {100 * (acct - accs):+.2f} pt (target within 0.5)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--index", default="IVF1024,Flat:nprobe=8", help="the full evaluate's --knn-index")
    ap.add_argument("--subset-nlist", type=int, default=1024, help="IVF lists on the subset (~160 rows per list)")
    ap.add_argument("--subset", type=int, default=200_000)
    ap.add_argument("--probe-rows", type=int, default=200_000)
    ap.add_argument("--probe-classes", type=int, default=20)
    ap.add_argument("--keep", type=Path, help="write the store here (and reuse it if it exists)")
    ap.add_argument("--steps", default="2,3,4", help="which measurements to run (e.g. 3 to re-measure memory only)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.keep or Path(tmp) / "scale.zarr"
        if not (store / "zarr.json").exists():
            make_store(store, args.rows, args.dim, args.classes)
        print(
            f"store: {args.rows:,} x {args.dim} float16, {args.classes} classes, "
            f"written in {time.perf_counter() - t0:.0f} s"
        )
        steps = {s.strip() for s in args.steps.split(",")}
        if "2" in steps:
            knn_subset(store, min(args.subset, args.rows), args.subset_nlist)
        if "3" in steps:
            evaluate_memory(store, args.rows, args.dim, args.index)
        if "4" in steps:
            probe_backends(store, args.probe_rows, args.probe_classes)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
