"""Phenotypic-activity mAP (copairs-style) at scale: wall time and peak memory of `phenotypic_map`.

  python benchmarks/phenotypic_map.py [--rows 100000 --dim 768 --classes 100 --batches 20 --n-perm 1000]

copairs materialises every pair and was OOM-killed at 9,216 profiles on 14 GB; the issue asks for
100,000 x 768 within 4 GB peak RSS. The run happens in a fresh child process, which makes the
synthetic embeddings (float32 unit vectors: class centre + batch offset + noise, made block by block),
then calls `phenotypic_map` once; it reports its own peak RSS (ru_maxrss, which includes the input),
its RSS just before the call, and the call's wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def make_profiles(
    n: int, dim: int, classes: int, batches: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors with a class signal weaker than the noise and a batch effect, in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = 0.3 * rng.standard_normal((classes, dim), dtype=np.float32)
    offsets = 0.2 * rng.standard_normal((batches, dim), dtype=np.float32)
    labels = rng.integers(0, classes, n)
    plates = rng.integers(0, batches, n)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 10_000):
        e = min(n, s + 10_000)
        block = centres[labels[s:e]] + offsets[plates[s:e]] + rng.standard_normal((e - s, dim), dtype=np.float32)
        x[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, labels, np.array([f"plate{b:03d}" for b in plates])


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def child(args: argparse.Namespace) -> None:
    from mubench_probe.heads.phenotypic import phenotypic_map

    x, labels, plates = make_profiles(args.rows, args.dim, args.classes, args.batches)
    before = rss_mb()
    t0 = time.perf_counter()
    df = phenotypic_map(x, labels, plates, n_perm=args.n_perm, block_rows=args.block_rows)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    out = {
        "wall_s": wall,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "input_mb": x.nbytes / 2**20,
        "classes_scored": int(df["n_queries"].gt(0).sum()),
        "mean_map": float(df["mean_average_precision"].mean()),
        "significant_q05": int((df["q_value"] < 0.05).sum()),
    }
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--n-perm", type=int, default=1000)
    ap.add_argument("--block-rows", type=int, default=None, help="queries per block (default: the library's)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(
        f"{args.rows:,} x {args.dim} float32 ({res['input_mb']:.0f} MB), {args.classes} classes, "
        f"{args.batches} batches, n_perm={args.n_perm}"
    )
    print(f"phenotypic_map wall time   {res['wall_s']:.1f} s")
    print(
        f"peak RSS (child, incl. input) {res['peak_rss_mb']:.0f} MB = {res['peak_rss_mb'] / res['input_mb']:.2f}x "
        f"the input; {res['rss_before_mb']:.0f} MB before the call (target <= 4096 MB)"
    )
    print(
        f"classes scored {res['classes_scored']}, mean class mAP {res['mean_map']:.4f}, "
        f"q < 0.05: {res['significant_q05']}"
    )


if __name__ == "__main__":
    main()
