"""Reading costs of the microscopy inputs (issue 12), measured in one run on this machine.

1. Loading a folder of OME-TIFFs with bioio (metadata only: scenes, pixel size, channel names):
   milliseconds per file.
2. Rendering one 5-channel 16-bit z-stack row (`--channels ... --channel-mode each --z max`) through
   bioio (open the file, read the scene), against decoding the same file whole with tifffile and
   projecting in NumPy (no OME-XML parsing: a lower bound).
3. WebDataset rows: our reader (one seek and one read per row, shards kept open) reading the rows
   of a chunk, against webdataset's own sequential iterator over the same shards (ratio of rows/s).

    python benchmarks/microscopy_io.py [--files 200] [--rows 2000] [--repeats 5]

Prints medians and per-repeat ratios (the machine is shared and noisy: ratios within one run).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from mubench_probe.datasets import load_dataset, row_source
from mubench_probe.imaging import PixelSpec, get_policy, render

NAMES = ["DNA", "ER", "RNA", "AGP", "Mito"]


def _plate(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / ("ctrl", "drug")[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 4000, size=(3, 5, 256, 256), dtype=np.uint16)
        tifffile.imwrite(
            d / f"w{i:04d}.ome.tif",
            arr,
            ome=True,
            photometric="minisblack",
            metadata={"axes": "ZCYX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65, "Channel": {"Name": NAMES}},
        )


def _shards(root: Path, rows: int, per_shard: int = 500) -> str:
    rng = np.random.default_rng(1)
    jpgs = []
    for _ in range(16):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, size=(96, 96, 3), dtype=np.uint8)).save(buf, format="JPEG")
        jpgs.append(buf.getvalue())
    n_shards = -(-rows // per_shard)
    for s in range(n_shards):
        with tarfile.open(root / f"s-{s:03d}.tar", "w") as tf:
            for j in range(min(per_shard, rows - s * per_shard)):
                for ext, data in (("jpg", jpgs[j % 16]), ("cls", str(j % 3).encode())):
                    info = tarfile.TarInfo(f"{s:03d}{j:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / f"s-{{000..{n_shards - 1:03d}}}.tar")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _plate(root / "plate", args.files)
        load_dataset(str(root / "plate"))  # import bioio and its plugins once
        load_ms = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ds = load_dataset(str(root / "plate"))
            load_ms.append((time.perf_counter() - t0) / args.files * 1000)
        print(f"bioio load, metadata only: {statistics.median(load_ms):.1f} ms per OME-TIFF (median of {args.repeats})")

        spec = PixelSpec(get_policy("percentile"), channels=("DNA", "RNA", "Mito"), channel_mode="each", z="max")
        n = min(40, len(ds))
        ratios, bioio_ms = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(n):
                render(row_source(ds.reader, i, 10**8), spec)
            t_bioio = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(n):
                arr = tifffile.imread(ds.reader.paths[i]).max(axis=0)
                [spec.policy(arr[c]) for c in (0, 2, 4)]
            t_whole = time.perf_counter() - t0
            ratios.append(t_bioio / t_whole)
            bioio_ms.append(t_bioio / n * 1000)
        print(
            f"each-mode row (3 of 5 channels, z max of 3, 256x256 uint16): bioio open + read + render "
            f"{statistics.median(bioio_ms):.1f} ms/row; time ratio vs tifffile whole-file decode "
            f"{statistics.median(ratios):.2f}x (per repeat: {', '.join(f'{r:.2f}' for r in ratios)})"
        )

        import webdataset as wds

        spec_wds = _shards(root, args.rows)
        ds = load_dataset(spec_wds)
        ours, theirs, ratios = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(len(ds)):  # chunks are consecutive rows
                ds.reader.read(i)
            ours.append(len(ds) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            count = sum(1 for _ in wds.WebDataset(spec_wds, shardshuffle=False))
            theirs.append(count / (time.perf_counter() - t0))
            ratios.append(ours[-1] / theirs[-1])
        print(
            f"WebDataset rows: offset reads {statistics.median(ours):,.0f} rows/s, webdataset's iterator "
            f"{statistics.median(theirs):,.0f} rows/s; ratio {statistics.median(ratios):.2f}x "
            f"(per repeat: {', '.join(f'{r:.2f}' for r in ratios)})"
        )


if __name__ == "__main__":
    main()
