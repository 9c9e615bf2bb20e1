"""`probe browse` thumbnails and memory: cold/warm thumbnail latency and the server's RSS.

    python benchmarks/browse_thumbs.py [--rows 100000]

Cold: a row never rendered (one image read and decode, render, PNG encode, cache write); warm:
the same request again (a cache read). Both through the app (Starlette TestClient, in process),
on the bundled sample with the tiny random model, plus the render alone of a 2048x2048 5-channel
uint16 TIFF (the composite path). RSS: a real `probe browse` process after it has answered the
overview, an image page, the errors view and 50 thumbnails, on the sample and (with --rows) on a
synthetic store of that many rows (no images: API only). Importable: `thumbnail_latency`,
`composite_render_ms`, `server_rss_mb`.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def thumbnail_latency(store: Path, rows: list[int], cache: Path) -> dict[str, float]:
    """p50/p95 ms of cold and warm thumbnail requests for `rows` through the app."""
    from starlette.testclient import TestClient

    from mubench_probe.browse.app import create_app
    from mubench_probe.browse.context import BrowseContext

    ctx = BrowseContext.open(store, None, cache)
    client = TestClient(create_app(ctx))
    rid = next(iter(ctx.runs))
    client.get(f"/thumb/{rid}/{rows[0]}.png?size=100")  # opens the dataset once (not a thumbnail cost)
    out: dict[str, list[float]] = {"cold": [], "warm": []}
    for kind in ("cold", "warm"):
        for r in rows:
            t = time.perf_counter()
            resp = client.get(f"/thumb/{rid}/{r}.png")
            out[kind].append(time.perf_counter() - t)
            if resp.status_code != 200:
                raise RuntimeError(resp.text)
    return {f"{k}_{q}": _pct(v, p) for k, v in out.items() for q, p in (("p50_ms", 50), ("p95_ms", 95))}


def composite_render_ms(repeats: int = 5) -> float:
    """Median ms to decode and render a 2048x2048 5-channel uint16 TIFF to a 160 px composite."""
    import tifffile

    from mubench_probe.browse.thumbs import pixel_spec, render_image

    arr = np.random.default_rng(0).integers(0, 60000, size=(5, 2048, 2048), dtype=np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, imagej=True, metadata={"axes": "CYX"})
    data, spec = buf.getvalue(), pixel_spec({"intensity_policy": "percentile"})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        render_image(data, spec, 160)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def server_rss_mb(store: Path, results: Path | None, thumbs: int = 50) -> float:
    """RSS (MB) of a `probe browse` process after it answered every kind of request."""
    import psutil

    cmd = [sys.executable, "-m", "mubench_probe.cli", "browse", str(store), "--cache", tempfile.mkdtemp()]
    if results is not None:
        cmd += ["--results", str(results)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]

        def get(path: str) -> bytes:
            with urllib.request.urlopen(url + path.lstrip("/"), timeout=300) as r:
                return r.read()

        overview = json.loads(get("/api/overview"))
        rid = overview["runs"][0]["id"]
        get(f"/api/image/{rid}/0")
        choices = json.loads(get("/api/errors/choices"))["choices"]
        if choices:
            c = choices[0]
            get(f"/api/errors?run={c['run']}&task={c['task']}&head={c['head']}")
        for r in range(min(thumbs, overview["runs"][0]["rows"])):
            try:
                get(f"/thumb/{rid}/{r}.png")
            except urllib.error.HTTPError:
                break  # a synthetic store has no images
        return psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=0, help="also measure RSS on a synthetic store of this many rows")
    args = ap.parse_args()
    from mubench_probe import api
    from mubench_probe.config import EvalConfig
    from mubench_probe.datasets import load_dataset
    from mubench_probe.encoders.openclip import register_bundled_configs

    register_bundled_configs()
    tmp = Path(tempfile.mkdtemp(prefix="browse-bench-"))
    sample = load_dataset("sample")
    store = tmp / "sample.zarr"
    api.extract("mubench-tiny-vit:random", sample, store=store, num_workers=0)
    results = tmp / "results"
    api.evaluate(store, EvalConfig(heads=("lp", "knn"), shots=()), tasks=["fine/bccd"], results_dir=results)
    lat = thumbnail_latency(store, list(range(1, 101)), tmp / "cache")
    print(json.dumps({"thumbnails_sample_100_rows": lat}, indent=1))
    print(json.dumps({"composite_2048x2048x5_uint16_render_ms": round(composite_render_ms(), 1)}))
    print(json.dumps({"server_rss_mb_sample": round(server_rss_mb(store, results), 1)}))
    if args.rows:
        import pandas as pd

        from mubench_probe.testing import write_run

        rng = np.random.default_rng(0)
        n = args.rows
        meta = pd.DataFrame({"label_name": rng.choice(["a", "b", "c", "d"], n), "dataset": "synth"})
        big = tmp / "big.zarr"
        write_run(big, rng.normal(size=(n, 512)).astype(np.float32), meta, dtype="float16", chunk_rows=8192)
        print(json.dumps({f"server_rss_mb_{n}_rows_512d": round(server_rss_mb(big, None), 1)}))


if __name__ == "__main__":
    main()
