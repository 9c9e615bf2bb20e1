"""Does evaluation churn the allocator too? `probe evaluate` with and without probe's allocator settings.

  python benchmarks/evaluate_allocator.py [--repeats 3]

The hard 4,000-row, 1280-d, 7-task store of evaluate_speed.py, evaluated with all heads (5 folds,
few-shot, 1,000 bootstrap resamples) in a fresh `probe evaluate` process per measurement,
interleaved: glibc's default allocator (MUBENCH_PROBE_ALLOCATOR=system) vs as shipped. Prints wall,
user and sys seconds and minor page faults (medians) and shipped/system per repeat.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from evaluate_speed import STORE_SOURCES

from mubench_probe.testing import multi_source_store


def one(store: str, results: str, system: bool) -> dict[str, float]:
    env = {**os.environ, "MUBENCH_PROBE_ALLOCATOR": "system" if system else "tuned"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "mubench_probe.cli", "evaluate", store, "--out", results, "--force"]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "faults": after.ru_minflt - before.ru_minflt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = f"{d}/s.zarr"
        multi_source_store(store, dim=1280, sources=STORE_SOURCES, signal=0.12, chunk_rows=1024)
        runs: dict[str, list[dict[str, float]]] = {"system": [], "shipped": []}
        for r in range(args.repeats):
            for name in ("system", "shipped"):
                m = one(store, f"{d}/results-{name}", name == "system")
                runs[name].append(m)
                print(
                    f"repeat {r} {name:8s} wall {m['wall']:6.1f} s  user {m['user']:6.1f} s  sys {m['sys']:5.1f} s  "
                    f"{m['faults'] / 1e6:5.2f} M minor faults",
                    flush=True,
                )
    print("\nmedians:")
    for name, ms in runs.items():
        med = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
        print(
            f"  {name:8s} wall {med['wall']:6.1f} s  user {med['user']:6.1f} s  sys {med['sys']:5.1f} s  "
            f"{med['faults'] / 1e6:5.2f} M minor faults"
        )
    ratio = [a["wall"] / b["wall"] for a, b in zip(runs["shipped"], runs["system"], strict=True)]
    print(
        f"  shipped / system wall: {statistics.median(ratio):.2f} (per repeat {', '.join(f'{x:.2f}' for x in ratio)})"
    )


if __name__ == "__main__":
    main()
