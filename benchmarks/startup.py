"""Start-up time and memory of commands that never load a model (they must not import torch).

  python benchmarks/startup.py [--repeats 5]

Each command runs as a fresh process; wall time and its own peak RSS (from wait4) are reported
as medians. `import torch` alone is measured as the reference of what the lazy imports avoid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def measure(cmd: list[str], repeats: int) -> tuple[float, float]:
    walls, rss = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - t0)
        rss.append(usage.ru_maxrss / 1024)  # KiB -> MiB on Linux
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed")
    return statistics.median(walls), statistics.median(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    probe = [sys.executable, "-m", "mubench_probe.cli"]
    with tempfile.TemporaryDirectory() as d:
        store = f"{d}/s.zarr"
        subprocess.run(
            [
                *probe,
                "extract",
                "--dataset",
                "sample",
                "--limit",
                "64",
                "--model",
                "mubench-tiny-vit:random",
                "--store",
                store,
                "--workers",
                "0",
            ],
            check=True,
            capture_output=True,
        )
        rows = [
            ("probe info STORE", [*probe, "info", store]),
            ("probe evaluate --help", [*probe, "evaluate", "--help"]),
            ("probe verify STORE", [*probe, "verify", store]),
            ("probe models", [*probe, "models"]),
            ("probe datasets", [*probe, "datasets"]),
            ("python -c 'import torch' (reference)", [sys.executable, "-c", "import torch"]),
        ]
        print(f"{'command':40s} {'wall s':>8s} {'peak RSS MiB':>13s}   (median of {args.repeats})")
        for name, cmd in rows:
            wall, rss = measure(cmd, args.repeats)
            print(f"{name:40s} {wall:8.2f} {rss:13.0f}")


if __name__ == "__main__":
    main()
