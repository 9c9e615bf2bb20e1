"""`probe browse` numbers: map first paint, query latency, thumbnails, server memory.

  python benchmarks/browse.py [--rows 100000 --map-rows 1000000 --dim 512 --repeats 3]

Builds one synthetic store (in a temporary folder) holding: a `--rows` x `--dim` image gallery
(clustered unit vectors), a `--map-rows` x 16 run for the big map, a `--rows` run carrying the
tiny bundled open_clip model's provenance (so a text query loads a real model and encodes with
it; its embeddings are 32-d), and 450 rows over the bundled sample's images for thumbnails.
Then it starts `probe browse` as its own process (so its RSS is the server's alone) and reports:

- the map's first computation (server side, cold: reading the embeddings + exact PCA, once per run);
- first paint of the map in headless Chromium (/usr/bin/chromium, driven by Playwright): time from
  navigation start to the first WebGL frame drawn (the page's `window.__probeMapPaint`, set after a
  readPixels that waits for the frame), map cached server side, a fresh page each repeat; and the
  time per frame of a scripted zoom (30 wheel steps; a map of more than 120,000 points draws a fixed
  random subset of 120,000 while it moves and the whole map once the input has been still 180 ms);
- p50/p95 latency (client wall time over HTTP) of image -> image ("more like this", k=10) over
  the `--rows` gallery, and of text -> image over the `--rows` tiny-model run (first query, which
  loads the model, reported apart);
- thumbnail latency cold (decode + render + cache write) and warm (from the on-disk cache);
- the server's RSS after start and at the end.

`probe browse` sets OMP_WAIT_POLICY=PASSIVE (unless set): with spinning OpenMP threads, a text query
took 10x longer on a busy CPU. Headless Chromium draws WebGL in software (SwiftShader) on a machine
without a GPU: paint and frame times there are an upper bound of what a browser with a GPU shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mubench_probe.browse.context import run_id_for
from mubench_probe.store import EmbeddingStore, RunLayout
from mubench_probe.tasks import derive_tasks
from mubench_probe.testing import write_run

TINY = "mubench-tiny-vit:random"
LOD_POINTS = 120_000  # static/pages/map.js: a bigger map draws this random subset while it pans or zooms
CHROMIUM = os.environ.get("PROBE_CHROMIUM", "/usr/bin/chromium")
TEXTS = [
    "a micrograph of a white blood cell",
    "a platelet",
    "red blood cells in a smear",
    "a fluorescence image of nuclei",
    "an electron micrograph of mitochondria",
    "a lymphocyte with a large nucleus",
    "a neutrophil with a segmented nucleus",
    "a blurry out of focus image",
]


def clustered(n: int, dim: int, seed: int, centres: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `centres` random centres, in blocks (bounded memory); and each row's centre."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    which = rng.integers(0, centres, n)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        block = c[which[s:e]] + 1.5 * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, which


def synthetic_meta(which: np.ndarray, classes: int, batches: int) -> pd.DataFrame:
    labels = np.array([f"class {i:02d}" for i in range(classes)], dtype=object)
    plates = np.array([f"plate {i}" for i in range(batches)], dtype=object)
    return pd.DataFrame({"label_name": labels[which % classes], "dataset": plates[(which // classes) % batches]})


def text_run(store: EmbeddingStore, rows: int) -> str:
    """A run whose provenance names the tiny open_clip model (its weights hash and preprocessing), so that
    the server reloads that model for a text query; its image embeddings are synthetic 32-d vectors."""
    from mubench_probe.encoders import load_encoder

    enc = load_encoder(TINY, device="cpu")
    x, which = clustered(rows, enc.info.embed_dim, seed=2)
    meta = synthetic_meta(which, 20, 4)
    texts = [f"a microscopy image of {c}." for c in sorted(set(meta["label_name"]))]
    prov = {
        "model_spec": TINY,
        "backend": enc.info.backend,
        "weights_hash": enc.info.weights_hash,
        "preprocess": enc.info.preprocess,
        "has_text": True,
        "dataset_spec": "textgallery",
    }
    plan = {"templates": ["a microscopy image of {}."], "tasks": {t.name: list(t.classes) for t in derive_tasks(meta)}}
    layout = RunLayout(rows, x.shape[1], 8192, "float32")
    run = store.prepare_run("tiny_text/textgallery/test", prov, layout, meta, texts, {}, plan)
    for ci in range(layout.n_chunks):
        sl = layout.chunk_slice(ci)
        run.write_chunk(ci, x[sl], [""] * (sl.stop - sl.start))
    run.write_text_embeddings(np.asarray(enc.encode_texts(texts), dtype=np.float32))
    return run_id_for(run.path)


def build(path: Path, rows: int, map_rows: int, dim: int) -> dict[str, str]:
    from mubench_probe.datasets import load_dataset

    st = EmbeddingStore(path, create=True)
    t0 = time.perf_counter()
    ids = {}
    x, which = clustered(rows, dim, seed=0)
    ids["gallery"] = run_id_for(
        write_run(
            st, x, synthetic_meta(which, 60, 8), model="synthetic:gallery", dataset="gallery", chunk_rows=8192
        ).path
    )
    del x
    x, which = clustered(map_rows, 16, seed=1)
    ids["map"] = run_id_for(
        write_run(st, x, synthetic_meta(which, 60, 8), model="synthetic:map", dataset="million", chunk_rows=65536).path
    )
    del x
    ids["text"] = text_run(st, rows)
    sample = load_dataset("sample")
    xs = np.random.default_rng(3).standard_normal((len(sample.meta), 16)).astype(np.float32)
    ids["thumbs"] = run_id_for(write_run(st, xs, sample.meta, model="synthetic:thumbs", dataset="sample").path)
    print(f"store built in {time.perf_counter() - t0:.0f} s: {path}", flush=True)
    return ids


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timed_get(client, url: str) -> float:
    t0 = time.perf_counter()
    r = client.get(url)
    dt = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise SystemExit(f"GET {url}: {r.status_code} {r.text[:200]}")
    return dt


def first_paint(base: str, run_id: str, repeats: int) -> tuple[list[float], float]:
    """Navigation start -> first WebGL frame drawn (ms), fresh page per repeat; and ms per zoom frame."""
    from playwright.sync_api import sync_playwright

    paints, frame = [], float("nan")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            for i in range(repeats):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"{base}#/map?run={run_id}")
                page.wait_for_selector('canvas.map-gl[data-painted="true"]', timeout=600_000)
                paints.append(float(page.evaluate("() => window.__probeMapPaint")))
                if i == repeats - 1:
                    frame = float(
                        page.evaluate(
                            """async () => {
                              const ov = document.querySelector('canvas.map-overlay');
                              const r = ov.getBoundingClientRect();
                              const t0 = performance.now();
                              for (let i = 0; i < 30; i++) {
                                ov.dispatchEvent(new WheelEvent('wheel', {deltaY: i % 2 ? 60 : -60, bubbles: true,
                                  cancelable: true, clientX: r.left + r.width / 2, clientY: r.top + r.height / 2}));
                                await new Promise((res) => requestAnimationFrame(() => requestAnimationFrame(res)));
                              }
                              return (performance.now() - t0) / 30;
                            }"""
                        )
                    )
                page.close()
        finally:
            browser.close()
    return paints, frame


def spread(lat: list[float]) -> str:
    return f"{pct(lat, 50):.1f} / {pct(lat, 95):.1f} ms"


def measure(client, base: str, ids: dict[str, str], pid: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Every number of the table, against the running server at `base` (process `pid`)."""
    out: list[tuple[str, str]] = [("server RSS after start", f"{rss_mib(pid):.0f} MiB")]
    sizes = {"gallery": args.rows, "map": args.map_rows}
    for key, n in sizes.items():
        dt = timed_get(client, f"{base}api/map/{ids[key]}/points")
        out.append((f"map computed, cold ({n:,} rows, PCA, once per run)", f"{dt / 1000:.2f} s"))
    for key, n in sizes.items():
        paints, frame = first_paint(base, ids[key], args.repeats)
        out.append((f"map first paint, {n:,} points (median of {len(paints)})", f"{statistics.median(paints):.0f} ms"))
        drawn = "" if n <= LOD_POINTS else f", {LOD_POINTS:,}-point subset while moving"
        out.append((f"map zoom frame, {n:,} points (software WebGL{drawn})", f"{frame:.0f} ms"))
    like = f"{base}api/search/{ids['gallery']}/row/"
    for r in range(3):
        timed_get(client, f"{like}{r}?k=10")  # warm-up: the gallery and its index are read once
    rows = np.random.default_rng(0).integers(0, args.rows, args.queries)
    lat = [timed_get(client, f"{like}{int(r)}?k=10") for r in rows]
    out.append((f"image -> image, {args.rows:,} x {args.dim}, k=10: p50 / p95", spread(lat)))
    text = f"{base}api/search/{ids['text']}/text"
    t0 = time.perf_counter()
    client.get(text, params={"q": TEXTS[0], "k": 10}).raise_for_status()
    out.append(("text -> image, first query (loads the model)", f"{time.perf_counter() - t0:.1f} s"))
    lat = []
    for i in range(max(args.queries // 2, 1)):
        t0 = time.perf_counter()
        client.get(text, params={"q": f"{TEXTS[i % len(TEXTS)]} {i}", "k": 10}).raise_for_status()
        lat.append((time.perf_counter() - t0) * 1000)
    out.append((f"text -> image, {args.rows:,} x 32 (tiny model), k=10: p50 / p95", spread(lat)))
    thumbs = [f"{base}thumb/{ids['thumbs']}/{r}.png" for r in range(0, 450, 15)]
    cold = [timed_get(client, u) for u in thumbs]
    warm = [timed_get(client, u) for u in thumbs]
    out.append(
        ("thumbnail cold / warm (median of 30)", f"{statistics.median(cold):.1f} / {statistics.median(warm):.1f} ms")
    )
    out.append(("server RSS at the end", f"{rss_mib(pid):.0f} MiB"))
    return out


def existing_ids(store: Path) -> dict[str, str]:
    key = {"gallery": "gallery", "million": "map", "textgallery": "text", "sample": "thumbs"}
    return {key[r.path.split("/")[1]]: run_id_for(r.path) for r in EmbeddingStore(store).runs()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the query galleries and the small map")
    ap.add_argument("--map-rows", type=int, default=1_000_000, help="rows of the big map")
    ap.add_argument("--dim", type=int, default=512, help="embedding width of the image gallery")
    ap.add_argument("--repeats", type=int, default=3, help="fresh pages per first-paint measurement")
    ap.add_argument("--queries", type=int, default=100, help="image -> image queries (text: half as many)")
    ap.add_argument("--store", type=Path, default=None, help="reuse (or build once into) this store folder")
    args = ap.parse_args()
    import httpx

    with tempfile.TemporaryDirectory() as d:
        store = args.store or Path(d) / "browse.zarr"
        ids = existing_ids(store) if store.exists() else build(store, args.rows, args.map_rows, args.dim)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "mubench_probe.cli", "browse", str(store), "--cache", str(Path(d) / "cache")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            base = (proc.stdout.readline() if proc.stdout else "").strip()
            if not base.startswith("http"):
                raise SystemExit(f"probe browse did not start: {base!r}")
            with httpx.Client(timeout=600) as client:
                client.get(base + "api/overview")
                table = measure(client, base, ids, proc.pid, args)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\n| measure ({os.cpu_count()} CPUs) | value |\n|---|---|")
    for name, value in table:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
