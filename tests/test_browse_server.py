"""`probe browse` server tests without a browser: status codes, escaping, token, path refusal,
read-only methods, and the numbers behind the pages (confusion matrix, neighbours, rendering)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("starlette")
from starlette.testclient import TestClient

from mubench_probe import api
from mubench_probe.browse.app import create_app
from mubench_probe.browse.context import BrowseContext, run_id_for
from mubench_probe.browse.errors import confusion
from mubench_probe.browse.server import check_host
from mubench_probe.browse.thumbs import DiskCache, parse_channels, pixel_spec, render_image
from mubench_probe.config import EvalConfig
from mubench_probe.errors import UsageError
from mubench_probe.imaging import COMPOSITE_COLOURS, get_policy
from mubench_probe.testing import write_run

SCRIPT = "<script>alert(1)</script>"
IMG = '<img src=x onerror="window.__pwned=1">'


def hostile_meta(sample) -> pd.DataFrame:
    """The sample's metadata with markup as a class label and as a metadata value."""
    meta = sample.meta.copy()
    labels = meta["label_name"].astype(str).to_numpy().copy()
    labels[labels == "platelet"] = SCRIPT
    meta["label_name"] = labels
    meta["stain"] = IMG
    return meta


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, sample):
    """Two synthetic runs over the sample's images (labels with markup) and their results."""
    root = tmp_path_factory.mktemp("browse")
    store, results = root / "hostile.zarr", root / "results"
    rng = np.random.default_rng(0)
    meta = hostile_meta(sample)
    x = rng.normal(size=(len(meta), 16)).astype(np.float32)
    write_run(store, x, meta, model="synthetic:a", dataset="sample")
    write_run(store, x + rng.normal(size=x.shape).astype(np.float32), meta, model="synthetic:b", dataset="sample")
    cfg = EvalConfig(heads=("proto", "knn"), ks=(5,), shots=(), n_boot=20)
    api.evaluate(store, cfg, results_dir=results)
    return store, results


@pytest.fixture(scope="module")
def ctx(hostile, tmp_path_factory):
    store, results = hostile
    return BrowseContext.open(store, results, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def client(ctx):
    return TestClient(create_app(ctx))


def run_a(ctx) -> str:
    return next(rid for rid, r in ctx.runs.items() if r.model_spec == "synthetic:a")


def test_pages_and_apis_answer(client, ctx):
    rid = run_a(ctx)
    for url in ("/", "/static/app.js", "/static/style.css", "/static/pages/overview.js", "/api/overview",
                "/api/errors/choices", f"/api/image/{rid}/3", f"/thumb/{rid}/3.png"):  # fmt: skip
        r = client.get(url)
        assert r.status_code == 200, (url, r.text[:200])
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    png = client.get(f"/thumb/{rid}/3.png")
    assert png.headers["content-type"] == "image/png"
    assert max(Image.open(io.BytesIO(png.content)).size) <= 160


def test_index_has_no_inline_script(client):
    html = client.get("/").text
    assert "<script" in html and 'src="/static/app.js"' in html
    assert all("src=" in tag for tag in html.split("<script")[1:])  # every script is a file: CSP forbids inline


@pytest.mark.parametrize(
    "url",
    [
        "/api/image/nosuchrun/3",
        "/api/image/{rid}/450",
        "/api/image/{rid}/99999999",
        "/thumb/nosuchrun/1.png",
        "/thumb/{rid}/450.png",
        "/api/errors?run=nosuchrun&task=fine/bccd&head=proto",
        "/api/errors?run={rid}&task=nosuchtask&head=proto",
        "/api/errors/cell?run={rid}&task=fine/bccd&head=proto&true=9&pred=0",
        "/static/nosuch.js",
        "/nosuchpage",
    ],
)
def test_unknown_things_are_404(client, ctx, url):
    r = client.get(url.format(rid=run_a(ctx)))
    assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    "url",
    [
        "/api/image/{rid}/-1",
        "/api/image/{rid}/1e3",
        "/api/image/{rid}/3?k=0",
        "/api/image/{rid}/3?k=abc",
        "/thumb/{rid}/3.png?size=-5",
        "/thumb/{rid}/3.png?channels=0,a",
        "/api/errors?run={rid}",
        "/api/overview?metric=nosuch",
    ],
)
def test_bad_parameters_are_400_or_404(client, ctx, url):
    r = client.get(url.format(rid=run_a(ctx)))
    assert r.status_code in (400, 404), r.text
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    "path",
    [
        "/static/../context.py",
        "/static/..%2fcontext.py",
        "/static/%2e%2e/%2e%2e/errors.py",
        "/static//etc/passwd",
        "/static/pages/../../context.py",
        "/thumb/..%2f..%2fetc/1.png",
        "/thumb/{rid}/..%2f1.png",
        "/api/image/..%2f..%2fetc%2fpasswd/1",
        "/../../etc/passwd",
    ],
)
def test_path_traversal_is_refused(client, ctx, path):
    r = client.get(path.format(rid=run_a(ctx)))
    assert r.status_code in (400, 404), (path, r.status_code)
    assert "root:" not in r.text and "import" not in r.text


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head(client, method):
    for url in ("/", "/api/overview", "/static/app.js"):
        r = client.request(method, url)
        assert r.status_code == 405, (method, url)
        assert r.headers["allow"] == "GET, HEAD"
    assert client.head("/api/overview").status_code == 200


def test_token_on_every_request(ctx):
    c = TestClient(create_app(ctx, token="s3cret-token"))
    rid = run_a(ctx)
    for url in ("/", "/static/app.js", "/api/overview", f"/thumb/{rid}/1.png", f"/api/image/{rid}/1"):
        assert c.get(url).status_code == 401, url
        assert c.get(url, headers={"X-Probe-Token": "wrong-token"}).status_code == 401
        assert c.get(url, headers={"X-Probe-Token": "s3cret-token"}).status_code == 200
    fresh = TestClient(create_app(ctx, token="s3cret-token"))
    first = fresh.get("/?token=s3cret-token")  # the printed URL: sets a cookie for module scripts and images
    assert first.status_code == 200 and "HttpOnly" in first.headers["set-cookie"]
    assert fresh.get("/static/app.js").status_code == 200
    assert TestClient(create_app(ctx, token="s3cret-token")).get("/?token=nope").status_code == 401


def test_loopback_server_refuses_other_hosts(ctx):
    c = TestClient(create_app(ctx, hosts=("127.0.0.1:8000",)), base_url="http://127.0.0.1:8000")
    assert c.get("/api/overview").status_code == 200
    assert c.get("/api/overview", headers={"host": "evil.example:8000"}).status_code == 400


def test_host_rules():
    check_host("127.0.0.1", None)
    check_host("localhost", None)
    check_host("::1", None)
    with pytest.raises(UsageError, match="--token"):
        check_host("0.0.0.0", None)
    with pytest.raises(UsageError, match="--token"):
        check_host("192.168.1.5", "")
    check_host("0.0.0.0", "long-enough-token")
    with pytest.raises(UsageError, match="8 printable"):
        check_host("0.0.0.0", "short")


def test_markup_in_labels_comes_back_as_data(client, ctx):
    """Labels and metadata are user data: JSON escapes < and > so they never read as markup."""
    rid = run_a(ctx)
    for url in (f"/api/image/{rid}/0", f"/api/errors?run={rid}&task=fine/bccd&head=proto", "/api/overview"):
        raw = client.get(url).text
        assert "<script" not in raw and "<img" not in raw, url
    img = client.get(f"/api/image/{rid}/0").json()
    values = {m["column"]: m["value"] for m in img["meta"]}
    assert values["stain"] == IMG  # the exact text survives, escaped only in transport
    errs = client.get(f"/api/errors?run={rid}&task=fine/bccd&head=proto").json()
    assert SCRIPT in errs["classes"]


def test_confusion_matrix_matches_predictions(client, ctx, hostile):
    rid = run_a(ctx)
    preds = pd.read_parquet(hostile[1] / "predictions.parquet")
    sel = preds[(preds["model"] == "synthetic:a") & (preds["task"] == "fine/bccd") & (preds["head"] == "proto")]
    view = client.get(f"/api/errors?run={rid}&task=fine/bccd&head=proto").json()
    n = len(view["classes"])
    ref = pd.crosstab(sel["y_true"], sel["y_pred"]).reindex(index=range(n), columns=range(n), fill_value=0)
    assert view["matrix"] == ref.to_numpy().tolist()
    assert view["total"] == len(sel) and view["wrong"] == int((sel["y_true"] != sel["y_pred"]).sum())
    assert view["ranked_by"] == "centroid_margin"
    scores = [w["score"] for w in view["most_wrong"]]
    assert scores == sorted(scores, reverse=True)
    assert all(w["true"] != w["pred"] for w in view["most_wrong"])
    i, j = np.unravel_index(np.argmax(np.where(np.eye(n, dtype=bool), -1, ref.to_numpy())), (n, n))
    cell = client.get(f"/api/errors/cell?run={rid}&task=fine/bccd&head=proto&true={i}&pred={j}").json()
    expect = sorted(sel[(sel["y_true"] == i) & (sel["y_pred"] == j)]["row"].tolist())
    assert [r["row"] for r in cell["rows"]] == expect and cell["total"] == len(expect)
    assert confusion(sel, n).tolist() == view["matrix"]


def test_neighbours_are_exact_cosine_top_k(client, ctx):
    """Each model's neighbours equal a plain numpy ranking (score desc, ties to the lower row)."""
    view = client.get(f"/api/image/{run_a(ctx)}/7?k=6").json()
    assert len(view["neighbours"]) == 2  # both models over the same rows, side by side
    for block in view["neighbours"]:
        x = ctx.runs[block["run"]].image_embeddings().astype(np.float64)
        s = x @ x[7]
        order = [int(j) for j in np.lexsort((np.arange(len(s)), -s)) if j != 7][:6]
        assert [h["row"] for h in block["hits"]] == order
        np.testing.assert_allclose([h["score"] for h in block["hits"]], s[order], atol=1e-5)
    heads = {(p["model"], p["head"]) for p in view["predictions"]}
    assert {("synthetic:a", "proto"), ("synthetic:b", "knn@5")} <= heads


def test_overview_lists_runs_and_results_with_links(client, ctx):
    o = client.get("/api/overview").json()
    assert {r["model"] for r in o["runs"]} == {"synthetic:a", "synthetic:b"}
    assert all(r["id"] == run_id_for(r["path"]) for r in o["runs"])
    rows = {(r["task"], r["head"]): r for r in o["headline"]["rows"]}
    cell = rows[("fine/bccd", "proto")]["cells"][run_a(ctx)]
    assert cell["ci_low"] <= cell["value"] <= cell["ci_high"]
    assert cell["errors"] == {"run": run_a(ctx), "task": "fine/bccd", "head": "proto"}


def test_thumbnails_are_cached_and_rendered_like_extraction(client, ctx, sample):
    rid = run_a(ctx)
    cache_files = lambda: list((ctx.cache_dir / "thumbs").rglob("*.png"))  # noqa: E731
    before = len(cache_files())
    a = client.get(f"/thumb/{rid}/11.png?size=0").content
    assert len(cache_files()) == before + 1
    assert client.get(f"/thumb/{rid}/11.png?size=0").content == a  # from the cache
    ref = Image.open(io.BytesIO(sample.reader.read(11))).convert("RGB")  # 8-bit RGB: the policy keeps it
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(a))), np.asarray(ref))


def test_disk_cache_is_bounded(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=10_000)
    for i in range(30):
        cache.put(f"k{i}", bytes(1000))
        time.sleep(0.001)
    assert cache.total_bytes() <= 10_000
    assert cache.get("k29") is not None and cache.get("k0") is None  # the oldest went first


def _tiff(arr: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, imagej=True, metadata={"axes": "CYX"})
    return buf.getvalue()


def test_multichannel_16bit_composite_matches_numpy():
    """>3 channels of uint16: each channel scaled by the percentile policy, then Fiji colours added."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 4000, size=(5, 24, 32), dtype=np.uint16)
    spec = pixel_spec({"intensity_policy": "percentile"})
    pol = get_policy("percentile")

    def reference(chans):
        acc = np.zeros((24, 32, 3), dtype=np.int64)
        for i, c in enumerate(chans):
            lo, hi = np.percentile(arr[c], [0.5, 99.5])
            plane = pol(arr[c])
            ref_plane = np.clip(np.round((arr[c].astype(np.float64) - lo) / (hi - lo) * 255), 0, 255)
            assert np.abs(plane.astype(int) - ref_plane).max() <= 1
            acc += plane[..., None].astype(np.int64) * np.array(COMPOSITE_COLOURS[i % 7][1])
        return np.minimum(acc, 255).astype(np.uint8)

    img, n = render_image(_tiff(arr), spec, 4096)
    assert n == 5
    np.testing.assert_array_equal(np.asarray(img), reference([0, 1, 2, 3, 4]))
    img, _ = render_image(_tiff(arr), spec, 4096, (1, 3))
    np.testing.assert_array_equal(np.asarray(img), reference([1, 3]))
    img, _ = render_image(_tiff(arr), spec, 4096, ())
    assert not np.asarray(img).any()
    with pytest.raises(UsageError, match="channel 7"):
        render_image(_tiff(arr), spec, 64, (7,))
    small, _ = render_image(_tiff(arr), spec, 16)
    assert max(small.size) == 16


def test_parse_channels():
    assert parse_channels(None) is None and parse_channels("") == ()
    assert parse_channels("3,1,3") == (1, 3)
    for bad in ("a", "-1", "1,,2", "1;2", "9999"):
        with pytest.raises(UsageError):
            parse_channels(bad)


@pytest.mark.slow
def test_cli_serves_and_stops_on_ctrl_c(hostile, tmp_path):
    store, results = hostile
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mubench_probe.cli", "browse", str(store), "--results", str(results),
           "--cache", str(tmp_path / "c")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        import urllib.request

        with urllib.request.urlopen(url + "api/overview", timeout=20) as r:
            assert json.loads(r.read())["runs"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err


def test_cli_refuses_public_host_without_token(hostile):
    from typer.testing import CliRunner

    from mubench_probe.cli import app

    r = CliRunner().invoke(app, ["browse", str(hostile[0]), "--host", "0.0.0.0"])
    assert r.exit_code == 2
    assert "--token" in r.output and "Traceback" not in r.output


def test_multichannel_rows_render_as_composites_with_toggles(tmp_path):
    """A 5-channel 16-bit row: the image page offers 5 channel toggles; the thumbnail route renders
    all channels, or the requested ones, exactly as render_image does from the file's bytes."""
    from .browse_harness import multichannel_store

    store, data = multichannel_store(tmp_path)
    ctx = BrowseContext.open(store, None, tmp_path / "cache")
    c = TestClient(create_app(ctx))
    rid = next(iter(ctx.runs))
    view = c.get(f"/api/image/{rid}/4").json()
    assert [ch["index"] for ch in view["channels"]] == [0, 1, 2, 3, 4]
    assert view["channels"][3]["colour"] == COMPOSITE_COLOURS[3][0]
    path = data / str(ctx.meta(rid)["path"].iloc[4])
    spec = pixel_spec(ctx.runs[rid].provenance)
    for query, chans in (("", None), ("&channels=0,4", (0, 4))):
        got = np.asarray(Image.open(io.BytesIO(c.get(f"/thumb/{rid}/4.png?size=0{query}").content)))
        want = np.asarray(render_image(path.read_bytes(), spec, 4096, chans)[0])
        np.testing.assert_array_equal(got, want)
    assert c.get(f"/thumb/{rid}/4.png?channels=5").status_code == 400


def test_caption_tasks_name_each_rows_own_options(tiny_store, tmp_path):
    ctx = BrowseContext.open(tiny_store, None, tmp_path)
    rid = next(iter(ctx.runs))
    run = ctx.runs[rid]
    options, _ = run.captions("modality")
    texts = run.texts()
    assert ctx.caption_texts(rid, "mubench/modality", 5) == [texts[i] for i in options[5] if i >= 0]
    assert ctx.caption_texts(rid, "fine/bccd", 5) is None
    assert ctx.caption_texts(rid, "mubench/nosuch", 5) is None


def test_a_busy_port_is_one_line_error():
    from mubench_probe.browse.server import bind, url_for

    first = bind("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        assert url_for(first, None) == f"http://127.0.0.1:{port}/"
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
    finally:
        first.close()
