"""What a perturbation sweep costs: each perturbed run against the bare forward pass and a clean extraction.

In one process, with the model loaded once and warmed up:
  forward   the bare forward pass over the rows, decoded and preprocessed beforehand (the model's limit)
  clean     `extract_into` of the clean run into a fresh store (decode, forward, checksummed writes, texts)
  sweep     `extract_into` with `--perturb` into the same store: the clean run is reopened and reused (no
            chunk recomputed), then every perturbation is its own run (perturb, forward, write; texts
            copied from the clean run), each row decoded once for the whole sweep (sweep.py)
  one by one  the same sweep into a copy of the clean store with the shared decode switched off
            (`sweep.MAX_SWEEP = 1`: each perturbed run reads and decodes every row itself)
Repeated (--repeats, shared and one-by-one in alternating order: this machine's speed drifts);
prints each repeat, then medians and the ratios per perturbed run / forward (the issue's
target: <= 1.1) and one by one / shared (what sharing the decode saves).

  python benchmarks/perturb_sweep.py [--model ViT-B-32:random] [--rows 256] [--workers 0] [--device cpu]
      [--perturb blur:1,2 noise:10 rotate:90 jpeg:50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import pandas as pd


def images(n: int):
    """The bundled sample's images, cycled to n rows."""
    from mubench_probe.datasets import LoadedDataset, load_dataset

    @dataclass
    class Cycle:
        inner: object
        n: int

        def __len__(self) -> int:
            return self.n

        def read(self, i: int) -> bytes:
            return self.inner.read(i % len(self.inner))

    base = load_dataset("sample")
    meta = pd.concat([base.meta] * -(-n // len(base)), ignore_index=True).iloc[:n]
    meta["image_id"] = [f"{v}#{i}" for i, v in enumerate(meta["image_id"])]  # one seed per row
    return LoadedDataset(
        "sample-cycled", f"sample-x{n}", "test", {**base.identity, "rows": str(n)}, meta, Cycle(base.reader, n)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32:random")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--perturb", nargs="+", default=["blur:1,2", "noise:10", "rotate:90", "jpeg:50"])
    ap.add_argument("--no-one-by-one", action="store_true", help="skip the sweep without the shared decode")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import shutil

    import torch

    from mubench_probe import allocator, sweep
    from mubench_probe.config import ExtractConfig
    from mubench_probe.encoders import load_encoder
    from mubench_probe.extraction import extract_into
    from mubench_probe.imaging import get_policy, load_rgb
    from mubench_probe.store import EmbeddingStore

    allocator.tune()
    ds = images(args.rows)
    enc = load_encoder(args.model, device=args.device)
    policy = get_policy("percentile")
    x = torch.stack([enc.transform(load_rgb(ds.reader.read(i), policy)) for i in range(args.rows)])
    batches = list(torch.split(x, args.batch_size))
    enc.encode_images(batches[0])  # warm-up

    def forward() -> float:
        t0 = time.perf_counter()
        for b in batches:
            enc.encode_images(b)
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    cfg = ExtractConfig(batch_size=args.batch_size, num_workers=args.workers, device=args.device)
    sweep_cfg = cfg.replace(perturb=tuple(args.perturb))
    n = len(sweep_cfg.perturb)
    rows = []
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            fwd = forward()
            st = EmbeddingStore(f"{d}/s.zarr", create=True)
            t0 = time.perf_counter()
            extract_into(st, enc, ds, cfg)
            clean_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            extract_into(st, enc, ds, cfg)  # the clean run again: reopened, checked, nothing recomputed
            reuse_s = time.perf_counter() - t0
            shutil.copytree(f"{d}/s.zarr", f"{d}/alone.zarr")
            modes = [("shared", f"{d}/s.zarr", 8), ("one by one", f"{d}/alone.zarr", 1)]
            per_run = {}
            for mode, path, share in modes if rep % 2 == 0 else modes[::-1]:  # alternate: the machine drifts
                if mode == "one by one" and args.no_one_by_one:
                    continue
                sweep.MAX_SWEEP = share
                t0 = time.perf_counter()
                report = extract_into(EmbeddingStore(path), enc, ds, sweep_cfg)
                per_run[mode] = (time.perf_counter() - t0 - reuse_s) / n
                assert report.chunks_written == 0 and all(r.chunks_written for r in report.perturbed)
            fwd = (fwd + forward()) / 2  # the bare forward before and after
        row = {"forward": fwd, "clean": clean_s, "reuse": reuse_s, **per_run}
        rows.append(row)
        print(f"repeat {rep}: " + "  ".join(f"{k} {v:.2f} s" for k, v in row.items()), flush=True)
    t = pd.DataFrame(rows)
    med = t.median()
    ratio = (t["shared"] / t["forward"]).median()
    print(f"\nmodel {args.model}, {args.rows} rows, batch {args.batch_size}, {args.workers} workers, {args.device}, ")
    print(f"{n} perturbed runs, medians of {args.repeats} repeats (ratios: median of the per-repeat ratios)")
    print(f"  forward (bare, preprocessed tensors)   {med['forward']:8.2f} s")
    clean = (t["clean"] / t["forward"]).median()
    print(f"  clean extraction                       {med['clean']:8.2f} s   clean / forward   {clean:5.2f}")
    print(f"  clean run reused (reopened, checked)   {med['reuse']:8.2f} s")
    print(f"  per perturbed run, shared decode       {med['shared']:8.2f} s   run / forward     {ratio:5.2f}")
    if "one by one" in t:
        one = (t["one by one"] / t["forward"]).median()
        gain = (t["one by one"] / t["shared"]).median()
        print(f"  per perturbed run, decoded one by one  {med['one by one']:8.2f} s   run / forward     {one:5.2f}")
        print(f"  one by one / shared                                      {gain:5.2f}")


if __name__ == "__main__":
    main()
