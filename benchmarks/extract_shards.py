"""Sharded extraction: one process vs `--launcher local --shards 2` on the same images, in one run.

  python benchmarks/extract_shards.py [--images 2048] [--model mubench-tiny-vit:random] [--repeats 3]

Both write a fresh store from a CSV manifest of the bundled sample's images (cycled up to
--images rows; 256-row chunks). Per repeat, adjacent in time: wall and CPU seconds (user + sys,
of every process) of `probe extract` in one process (2 loader workers) and of two shard
processes (1 loader worker each: the same number of processes decoding), and whether the two
stores are byte-identical (creation times aside). The overhead of a shard is the extra CPU time
of the sharded run, per shard: a second interpreter, torch import, model load and text
encoding... (only shard 0 encodes texts), and the claims. The claims' own cost is also timed
directly: claim + write-audit + release of one chunk, on the local filesystem and on an S3
emulator (moto), median of 200.
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
from pathlib import Path

from mubench_probe.claims import LocalChunkClaims, ObjectChunkClaims
from mubench_probe.datasets import load_dataset
from mubench_probe.locations import location


def manifest(folder: Path, n: int) -> Path:
    ds = load_dataset("sample")
    files = []
    for i in range(len(ds)):
        p = folder / f"img{i:03d}.jpg"
        p.write_bytes(ds.reader.read(i))
        files.append((p, ds.meta["label_name"].iloc[i]))
    csv = folder / "cells.csv"
    rows = [files[i % len(files)] for i in range(n)]
    csv.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return csv


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(args: list[str]) -> tuple[float, float]:
    c0, t0 = cpu_children(), time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mubench_probe.cli", *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stdout[-2000:] + out.stderr[-2000:])
    return time.perf_counter() - t0, cpu_children() - c0


def contents(store: Path) -> dict[str, bytes]:
    """Every file but claims and the metadata that holds creation times."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if p.is_file() and not rel.startswith(".") and not (p.name == "zarr.json" and b'"created"' in p.read_bytes()):
            out[rel] = p.read_bytes()
    return out


def claim_cost(claims, n: int = 200) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        claims.try_claim(i)
        claims.owns(i)
        claims.record_written(i)
        claims.release(i)
        times.append(time.perf_counter() - t0)
    claims.close()
    return statistics.median(times) * 1000


def claims_benchmark(tmp: Path) -> None:
    local = claim_cost(LocalChunkClaims(tmp / "claims"))
    line = f"claims per chunk (claim + check + audit + release, median of 200): local filesystem {local:.2f} ms"
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        print(line + "; S3 emulator: moto not installed")
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket="bench")
    s3 = claim_cost(ObjectChunkClaims(location("s3://bench/store"), ".claims/run"))
    server.stop()
    print(line + f", S3 emulator (moto on loopback, 7 requests) {s3:.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--model", default="mubench-tiny-vit:random")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        csv = manifest(tmp, args.images)
        base = ["extract", "--dataset", str(csv), "--model", args.model, "--device", "cpu", "--chunk-rows", "256"]
        rows = []
        for r in range(args.repeats):
            one, two = tmp / f"one{r}.zarr", tmp / f"two{r}.zarr"
            w1, c1 = timed([*base, "--store", str(one), "--workers", "2"])
            w2, c2 = timed(
                [*base, "--store", str(two), "--workers", "1", "--launcher", "local", "--shards", "2", "--log-dir",
                 str(tmp / f"logs{r}")]
            )  # fmt: skip
            same = contents(one) == contents(two)
            rows.append((w1, c1, w2, c2, same))
            print(
                f"repeat {r}: one process {w1:.1f} s wall / {c1:.1f} s CPU; 2 shards {w2:.1f} s wall / {c2:.1f} s CPU; "
                f"wall ratio {w2 / w1:.2f}; identical store: {same}"
            )
        med = statistics.median
        overhead = [(c2 - c1) / 2 for _, c1, _, c2, _ in rows]
        print(
            f"{args.images} images, {args.model}: one process {med(r[0] for r in rows):.1f} s, 2 shards "
            f"{med(r[2] for r in rows):.1f} s (wall ratio, median of per-repeat ratios: "
            f"{med(r[2] / r[0] for r in rows):.2f}); overhead per shard {med(overhead):.1f} s CPU "
            f"(repeats {', '.join(f'{o:.1f}' for o in overhead)}); stores identical in every repeat: "
            f"{all(r[4] for r in rows)}"
        )
        claims_benchmark(tmp)


if __name__ == "__main__":
    main()
