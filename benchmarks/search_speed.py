"""Search latency on 1M x 512 synthetic normalised vectors: FAISS exact and ANN vs a numpy baseline.

  python benchmarks/search_speed.py [--n 1000000 --dim 512 --batch 1000]

Reports, measured in this run on the same vectors: median single-query latency and the latency
of a 1,000-query batch for the exact index (IndexFlatIP), for one ANN index (IVF, trained on a
sample) with its recall@10 against exact search, and for numpy matmul + argpartition.
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np


def make_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (1000 centres), generated in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        block = centres[rng.integers(0, 1000, e - s)] + 1.5 * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int, block: int = 131_072) -> np.ndarray:
    """Exact top-k by blocked matmul + argpartition, merged across blocks."""
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for s in range(0, len(x), block):
        sims = q @ x[s : s + block].T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + s], axis=1)
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--single", type=int, default=20, help="single queries timed (median)")
    ap.add_argument("--repeats", type=int, default=3, help="batch repeats (median)")
    ap.add_argument("--ann", default="IVF1024,Flat")
    ap.add_argument("--nprobe", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    x = make_vectors(args.n, args.dim)
    rng = np.random.default_rng(1)
    queries = x[rng.choice(args.n, args.batch, replace=False)] + 0.05 * rng.standard_normal(
        (args.batch, args.dim), dtype=np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(
        f"{args.n:,} x {args.dim} vectors ({time.perf_counter() - t0:.0f} s to make), "
        f"faiss threads {faiss.omp_get_max_threads()}, k={args.k}"
    )

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    rows = []
    single = [queries[i : i + 1] for i in range(args.single)]
    t_np1 = statistics.median([median_time(lambda q=q: numpy_topk(x, q, args.k), 1) for q in single])
    t_np = median_time(lambda: numpy_topk(x, queries, args.k), args.repeats)
    t_fl1 = statistics.median([median_time(lambda q=q: flat.search(q, args.k), 1) for q in single])
    t_fl = median_time(lambda: flat.search(queries, args.k), args.repeats)
    _, exact = flat.search(queries, args.k)
    assert (np.sort(numpy_topk(x, queries[:50], args.k), 1) == np.sort(exact[:50], 1)).mean() > 0.99

    t_build = time.perf_counter()
    ann = faiss.index_factory(args.dim, args.ann, faiss.METRIC_INNER_PRODUCT)
    ann.train(x[rng.choice(args.n, min(args.n, 100_000), replace=False)])
    ann.add(x)
    faiss.ParameterSpace().set_index_parameter(ann, "nprobe", args.nprobe)
    t_build = time.perf_counter() - t_build
    t_an1 = statistics.median([median_time(lambda q=q: ann.search(q, args.k), 1) for q in single])
    t_an = median_time(lambda: ann.search(queries, args.k), args.repeats)
    _, approx = ann.search(queries, args.k)
    recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(exact, approx, strict=True)])

    rows = [
        ("numpy matmul+argpartition", t_np1, t_np, 1.0, ""),
        ("FAISS IndexFlatIP (exact)", t_fl1, t_fl, 1.0, ""),
        (f"FAISS {args.ann} nprobe={args.nprobe}", t_an1, t_an, recall, f"build {t_build:.0f} s"),
    ]
    print(f"{'method':34} {'1 query ms':>11} {args.batch:>5}-query s {'queries/s':>10} {'recall@10':>9}")
    for name, one, batch, rec, extra in rows:
        print(f"{name:34} {1000 * one:11.1f} {batch:13.2f} {args.batch / batch:10.0f} {rec:9.3f}  {extra}")
    print(
        f"exact FAISS batch throughput / numpy = {t_np / t_fl:.2f}x (target >= 1.5x); single query {t_np1 / t_fl1:.2f}x"
    )


if __name__ == "__main__":
    main()
