"""Extraction throughput: pure forward vs data loading vs the full `probe extract` path.

Measures, in one run on the same real images (the bundled BCCD sample):
  (1) images/s of the model forward alone on pre-processed tensors,
  (2) images/s of decode + intensity policy + preprocessing alone, with the same DataLoader
      workers (the data-loading limit),
  (3) images/s of the full extraction path (loader + forward + Zarr writes) into a fresh store,
      timed from the loader's start to the last chunk written (model loading, weight hashing
      and text encoding happen once per model and are shown separately as "e2e"),
and prints full/forward and full/data: each ratio is computed within one repeat (the three
measurements adjacent in time) and the median over --repeats is shown; rates are medians too.

  python benchmarks/extract_throughput.py [--models ViT-B-32:random mubench-tiny-vit:random]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch.utils.data import DataLoader

from mubench_probe import api
from mubench_probe.datasets import LoadedDataset, load_dataset
from mubench_probe.encoders import load_encoder
from mubench_probe.extraction import ImageRows, _collate, input_shape
from mubench_probe.imaging import get_policy, load_rgb


def _rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


@dataclass
class _Cycle:
    """Reads the sample's images round-robin so a benchmark can use more rows than it has."""

    inner: object
    n: int

    def __len__(self) -> int:
        return self.n

    def read(self, i: int) -> bytes:
        return self.inner.read(i % len(self.inner))


def images(n: int) -> LoadedDataset:
    base = load_dataset("sample")
    reps = -(-n // len(base))
    meta = pd.concat([base.meta] * reps, ignore_index=True).iloc[:n]
    return LoadedDataset(
        "sample-cycled", f"sample-x{n}", "test", {**base.identity, "rows": str(n)}, meta, _Cycle(base.reader, n)
    )


def bench(spec: str, n: int, batch_size: int, workers: int, repeats: int) -> dict[str, float]:
    ds = images(n)
    enc = load_encoder(spec, device="cpu")
    policy = get_policy("percentile")
    tensors = torch.stack([enc.transform(load_rgb(ds.reader.read(i), policy)) for i in range(len(ds))])
    batches = list(torch.split(tensors, batch_size))
    enc.encode_images(batches[0])  # warm-up

    def forward() -> None:
        for b in batches:
            enc.encode_images(b)

    def data() -> None:
        loader = DataLoader(
            ImageRows(ds, enc.transform, policy, input_shape(enc)),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=4 if workers else None,
        )
        for _ in loader:
            pass

    rates: dict[str, list[float]] = {"forward": [], "data": [], "full": [], "e2e": []}
    for _ in range(repeats):  # interleaved, so drifting machine load hits all three alike
        rates["forward"].append(_rate(forward, n))
        rates["data"].append(_rate(data, n))
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            report = api.extract(
                spec, ds, store=f"{d}/s.zarr", batch_size=batch_size, num_workers=workers, device="cpu"
            )
            rates["e2e"].append(n / (time.perf_counter() - t0))
            rates["full"].append(report.images_per_second)
    out = {k: statistics.median(v) for k, v in rates.items()}
    # Ratios are taken within each repeat (adjacent in time) and then their median: this shared
    # machine's speed drifts by +-25% over minutes, which a ratio of medians would mix in.
    out["full/fwd"] = statistics.median(f / m for f, m in zip(rates["full"], rates["forward"], strict=True))
    out["full/data"] = statistics.median(f / d for f, d in zip(rates["full"], rates["data"], strict=True))
    fwd = [f / m for f, m in zip(rates["full"], rates["forward"], strict=True)]
    dat = [f / d for f, d in zip(rates["full"], rates["data"], strict=True)]
    out["ranges"] = f"full/fwd {min(fwd):.2f}-{max(fwd):.2f}, full/data {min(dat):.2f}-{max(dat):.2f}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ViT-B-32:random", "mubench-tiny-vit:random"])
    ap.add_argument(
        "--images", type=int, nargs="+", default=[256, 3000], help="images per model (one value, or one per model)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sizes = args.images if len(args.images) == len(args.models) else args.images[:1] * len(args.models)
    print(
        f"torch threads {torch.get_num_threads()}, workers {args.workers}, batch {args.batch_size}, "
        f"median of {args.repeats}"
    )
    print(
        f"{'model':26} {'n':>4} {'forward':>9} {'data':>8} {'full':>8} {'e2e':>8} "
        f"{'full/fwd':>9} {'full/data':>9}   (images/s)"
    )
    for spec, n in zip(args.models, sizes, strict=True):
        r = bench(spec, n, args.batch_size, args.workers, args.repeats)
        print(
            f"{spec:26} {n:4d} {r['forward']:9.1f} {r['data']:8.1f} {r['full']:8.1f} {r['e2e']:8.1f} "
            f"{r['full/fwd']:9.2f} {r['full/data']:9.2f}   per repeat: {r['ranges']}"
        )


if __name__ == "__main__":
    main()
