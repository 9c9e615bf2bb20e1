"""The Map page's API (`probe browse`), server level: projections against numpy/scikit-learn,
the cache, the binary payloads, colours and legends, selections against plain references."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient

from mubench_probe.browse import mapdata
from mubench_probe.browse.context import BrowseContext, run_id_for
from mubench_probe.testing import write_run

HOSTILE = "<script>alert(1)</script>"
N = 300


def _meta(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    labels = np.array(["lymphocyte", "neutrophil", HOSTILE, "platelet"])[rng.integers(0, 4, n)]
    return pd.DataFrame(
        {
            "label_name": labels,
            "dataset": np.where(np.arange(n) < n // 3, "plate_a", "plate_b"),
            "focus": rng.normal(size=n).round(4),
            "image_id": [f"img{i}" for i in range(n)],
        }
    )


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Two runs over the same 300 rows (two 'models'), rows 5 and 77 failed in the first."""
    path = tmp_path_factory.mktemp("maps") / "synth.zarr"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 24)).astype(np.float32) * np.linspace(3, 0.2, 24, dtype=np.float32)
    fails = [""] * N
    fails[5] = fails[77] = "unreadable image"
    meta = _meta(N)
    a = write_run(path, x, meta, model="synthetic:a", failures=fails)
    b = write_run(path, rng.normal(size=(N, 8)).astype(np.float32), meta, model="synthetic:b")
    return path, run_id_for(a.path), run_id_for(b.path), x, fails


@pytest.fixture
def ctx(synth, tmp_path):
    return BrowseContext.open(synth[0], cache_dir=tmp_path / "cache")


def client(ctx: BrowseContext) -> TestClient:
    from mubench_probe.browse.app import create_app

    return TestClient(create_app(ctx))


def _unit_valid(x: np.ndarray, fails: list[str]) -> tuple[np.ndarray, np.ndarray]:
    valid = np.array([f == "" for f in fails])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return xn, valid


def _points(resp) -> np.ndarray:
    return np.frombuffer(resp.content, dtype="<f4").reshape(-1, 2)


# ---- projections ---------------------------------------------------------------------------
def test_pca_equals_sklearn_with_its_sign_convention(monkeypatch):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(500, 12)) * np.arange(12, 0, -1)).astype(np.float32) + 5.0
    ref = PCA(n_components=2, svd_solver="full").fit_transform(x.astype(np.float64))
    got = mapdata.pca_2d(x)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    monkeypatch.setattr(mapdata, "BLOCK_ROWS", 7)  # blocked accumulation: the same map
    np.testing.assert_allclose(mapdata.pca_2d(x), got, rtol=0, atol=1e-5)
    # the sign convention: the largest-magnitude loading of each axis is positive, whatever the row order
    perm = rng.permutation(len(x))
    np.testing.assert_allclose(mapdata.pca_2d(x[perm]), got[perm], rtol=0, atol=1e-4)


def test_pca_degenerate_inputs():
    assert mapdata.pca_2d(np.zeros((0, 5), np.float32)).shape == (0, 2)
    one_d = mapdata.pca_2d(np.arange(6, dtype=np.float32)[:, None])
    np.testing.assert_allclose(one_d[:, 0], np.arange(6) - 2.5)
    assert (one_d[:, 1] == 0).all()


def test_points_endpoint_is_the_pca_of_valid_rows_as_float32(ctx, synth):
    _, rid, _, x, fails = synth
    resp = client(ctx).get(f"/api/map/{rid}/points")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/octet-stream"
    assert len(resp.content) == N * 2 * 4 and resp.headers["x-rows"] == str(N)
    pts = _points(resp)
    xn, valid = _unit_valid(x, fails)
    from sklearn.decomposition import PCA

    ref = PCA(n_components=2, svd_solver="full").fit_transform(xn[valid].astype(np.float64))
    np.testing.assert_allclose(pts[valid], ref, atol=1e-4)
    assert np.isnan(pts[~valid]).all()
    bounds = [float(v) for v in resp.headers["x-bounds"].split(",")]
    assert bounds == pytest.approx([*np.nanmin(pts, axis=0), *np.nanmax(pts, axis=0)])


def test_map_is_computed_once_and_reused_after_a_restart(ctx, synth, monkeypatch, tmp_path):
    rid = synth[1]
    calls = []
    real = mapdata.METHODS["pca"]
    monkeypatch.setitem(mapdata.METHODS, "pca", lambda x: calls.append(len(x)) or real(x))
    first = client(ctx).get(f"/api/map/{rid}/points").content
    assert client(ctx).get(f"/api/map/{rid}/points").content == first
    assert client(ctx).get(f"/api/map/{rid}/select?box=-9,-9,9,9").status_code == 200
    assert calls == [N - 2]
    files = list((tmp_path / "cache" / "maps").glob("*.npy"))
    assert len(files) == 1 and not list((tmp_path / "cache" / "maps").glob(".*"))  # no temporary left
    mtime = files[0].stat().st_mtime_ns
    again = BrowseContext.open(synth[0], cache_dir=tmp_path / "cache")  # a new server over the same cache
    assert client(again).get(f"/api/map/{rid}/points").content == first
    assert calls == [N - 2] and files[0].stat().st_mtime_ns == mtime
    other = client(again).get(f"/api/map/{synth[2]}/points")  # the other run: its own map
    assert other.status_code == 200 and calls == [N - 2, N]


def test_damaged_cache_file_is_recomputed(ctx, synth, tmp_path):
    rid = synth[1]
    first = client(ctx).get(f"/api/map/{rid}/points").content
    (f,) = (tmp_path / "cache" / "maps").glob("*.npy")
    f.write_bytes(b"not a numpy file")
    again = BrowseContext.open(synth[0], cache_dir=tmp_path / "cache")
    assert client(again).get(f"/api/map/{rid}/points").content == first


def test_cache_key_follows_identity_and_method():
    ident = {"path": "m/d/test", "provenance": "ab", "rows": 3, "valid": "cd"}
    assert mapdata.cache_key(ident, "pca") == mapdata.cache_key(dict(ident), "pca")
    assert mapdata.cache_key(ident, "pca") != mapdata.cache_key(ident, "umap")
    assert mapdata.cache_key(ident, "pca") != mapdata.cache_key({**ident, "valid": "ce"}, "pca")


def test_bad_requests_are_one_line_errors(ctx, synth):
    c, rid = client(ctx), synth[1]
    assert c.get("/api/map/nope/points").status_code == 404
    r = c.get(f"/api/map/{rid}/points?method=tsne")
    assert r.status_code == 400 and "tsne" in r.json()["error"]
    if "umap" not in mapdata.available_methods():  # without the extra: a 400 that names it
        r = c.get(f"/api/map/{rid}/points?method=umap")
        assert r.status_code == 400 and "mubench-probe[umap]" in r.json()["error"]
    assert c.get(f"/api/map/{rid}/select?box=1,2,3").status_code == 400
    assert c.get(f"/api/map/{rid}/select?box=a,b,c,d").status_code == 400
    assert c.get(f"/api/map/{rid}/select?box=0,0,nan,1").status_code == 400
    assert c.get(f"/api/map/{rid}/select?lasso=0,0,1,1").status_code == 400
    assert c.get(f"/api/map/{rid}/select").status_code == 400
    assert c.get(f"/api/map/{rid}/legend?kind=meta&column=nope").status_code == 400
    assert c.get(f"/api/map/{rid}/legend?kind=evil").status_code == 400
    assert c.get(f"/api/map/{rid}/legend?kind=correct&task=label_name&head=linear").status_code == 400


# ---- colours -------------------------------------------------------------------------------
def test_colour_codes_and_legend_by_label(ctx, synth):
    c, rid = client(ctx), synth[1]
    meta = _meta(N)
    resp = c.get(f"/api/map/{rid}/legend", params={"kind": "meta", "column": "label_name"})
    assert resp.status_code == 200
    assert b"<script>" not in resp.content  # markup in a label never leaves the server as markup
    legend = resp.json()["legend"]
    assert {e["label"]: e["count"] for e in legend} == meta["label_name"].value_counts().to_dict()
    counts = [e["count"] for e in legend]
    assert counts == sorted(counts, reverse=True)
    codes = np.frombuffer(c.get(f"/api/map/{rid}/codes?kind=meta&column=label_name").content, dtype="<u2")
    names = {e["code"]: e["label"] for e in legend}
    assert [names[int(k)] for k in codes] == list(meta["label_name"])
    assert len({e["colour"] for e in legend}) == len(legend)


def test_many_classes_keep_the_top_and_share_other():
    values = pd.Series([f"class {i:02d}" for i in range(60) for _ in range(60 - i)] + [None] * 3)
    codes, legend = mapdata.colour_codes(values)
    assert len(legend) == mapdata.TOP_CLASSES + 2
    assert [e["label"] for e in legend[:3]] == ["class 00", "class 01", "class 02"]
    assert legend[-2]["label"] == "other (40 values)" and legend[-2]["count"] == sum(range(1, 41))
    assert legend[-1]["label"] == mapdata.MISSING and legend[-1]["count"] == 3
    assert sum(e["count"] for e in legend) == len(values)
    assert len({e["colour"] for e in legend}) == len(legend)  # every kept class its own colour
    assert (codes[:60] == 0).all() and codes[-1] == mapdata.TOP_CLASSES + 1
    tie = mapdata.colour_codes(pd.Series(["b", "a", "b", "a"]))[1]  # ties by name: deterministic
    assert [e["label"] for e in tie] == ["a", "b"]


def test_numeric_columns_are_binned_in_order():
    values = pd.Series(np.arange(1000, dtype=float))
    codes, legend = mapdata.colour_codes(values)
    assert len(legend) == 10 and all(e["count"] == 100 for e in legend)
    assert (np.diff(codes.astype(int)) >= 0).all() and codes[0] == 0 and codes[-1] == 9
    with_gaps = pd.Series([*np.arange(100.0), np.nan, np.nan])
    codes, legend = mapdata.colour_codes(with_gaps)
    assert legend[-1] == {"code": 11, "label": mapdata.MISSING, "count": 2, "colour": mapdata.MISSING_COLOUR}
    assert (codes[-2:] == 11).all() and sum(e["count"] for e in legend) == 102


def test_colour_by_batch_and_correctness(ctx, synth):
    c, rid = client(ctx), synth[1]
    batch = c.get(f"/api/map/{rid}/legend?kind=batch").json()
    assert batch["title"] == "batch (dataset)"
    assert {e["label"]: e["count"] for e in batch["legend"]} == {"plate_a": N // 3, "plate_b": N - N // 3}
    run = ctx.run(rid)
    rows = np.arange(0, N, 2)
    y_true = rows % 3
    y_pred = np.where(rows % 4 == 0, y_true, (y_true + 1) % 3)
    ctx.predictions = pd.DataFrame(
        {
            "model": run.model_spec,
            "dataset": ctx.dataset_key(rid),
            "task": "label_name",
            "head": "linear",
            "row": rows,
            "y_true": y_true,
            "y_pred": y_pred,
            "unit": "u",
        }
    )
    info = c.get(f"/api/map/{rid}").json()
    assert {"kind": "correct", "task": "label_name", "head": "linear"} in [o["params"] for o in info["colour_by"]]
    q = "kind=correct&task=label_name&head=linear"
    legend = {e["label"]: e for e in c.get(f"/api/map/{rid}/legend?{q}").json()["legend"]}
    codes = np.frombuffer(c.get(f"/api/map/{rid}/codes?{q}").content, dtype="<u2")
    assert legend["correct"]["count"] == int((rows % 4 == 0).sum())
    assert legend["wrong"]["count"] == int((rows % 4 != 0).sum())
    assert legend[mapdata.MISSING]["count"] == N - len(rows)
    assert (codes[rows[rows % 4 == 0]] == legend["correct"]["code"]).all()
    assert (codes[1::2] == legend[mapdata.MISSING]["code"]).all()


def test_correctness_marks_disagreeing_repeats_mixed():
    preds = pd.DataFrame({"row": [0, 0, 1, 1, 2], "y_true": [1, 1, 0, 0, 2], "y_pred": [1, 0, 0, 0, 1]})
    assert list(mapdata.correctness(preds, 4)) == ["mixed", "correct", "wrong", None]


def test_info_lists_partners_methods_and_options(ctx, synth):
    _, a, b, _, _ = synth
    info = client(ctx).get(f"/api/map/{a}").json()
    assert info["partners"] == [b] and info["rows"] == N and "pca" in info["methods"]
    assert [o["label"] for o in info["colour_by"]][:3] == ["label_name", "dataset", "focus"]
    runs = client(ctx).get("/api/map/runs").json()["runs"]
    assert sorted(r["run_id"] for r in runs) == sorted([a, b])


# ---- selection -----------------------------------------------------------------------------
def test_box_selection_equals_numpy_reference(ctx, synth):
    c, rid = client(ctx), synth[1]
    pts = _points(c.get(f"/api/map/{rid}/points"))
    x0, x1 = np.nanpercentile(pts[:, 0], [20, 70])
    y0, y1 = np.nanpercentile(pts[:, 1], [10, 60])
    with np.errstate(invalid="ignore"):
        ref = np.flatnonzero((pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1))
    box = ",".join(repr(float(v)) for v in (x1, y1, x0, y0))  # corners in either order
    sel = c.get(f"/api/map/{rid}/select", params={"box": box, "limit": 10}).json()
    assert sel["count"] == len(ref) > 10
    assert [i["row"] for i in sel["items"]] == list(ref[:10])
    meta = _meta(N)
    first = sel["items"][0]
    assert first["meta"]["label_name"] == meta["label_name"][ref[0]]
    assert first["meta"]["focus"] == pytest.approx(meta["focus"][ref[0]])
    assert first["thumb"] == f"/thumb/{rid}/{ref[0]}.png"
    everything = c.get(f"/api/map/{rid}/select", params={"box": "-1e9,-1e9,1e9,1e9", "limit": 500}).json()
    assert everything["count"] == N - 2 and 5 not in [i["row"] for i in everything["items"]]  # failed rows: no point


def test_lasso_selection_equals_matplotlib(ctx, synth):
    from matplotlib.path import Path as MplPath

    c, rid = client(ctx), synth[1]
    pts = _points(c.get(f"/api/map/{rid}/points"))
    cx, cy = np.nanmedian(pts, axis=0)
    r = np.nanstd(pts[:, 0])
    angles = np.linspace(0, 2 * np.pi, 9)[:-1]
    radius = r * np.where(np.arange(8) % 2, 0.4, 1.0)  # a star: not convex
    poly = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    ok = np.isfinite(pts).all(axis=1)
    ref = np.flatnonzero(ok & MplPath(poly).contains_points(np.nan_to_num(pts)))
    text = ",".join(repr(float(v)) for v in poly.ravel())
    sel = c.get(f"/api/map/{rid}/select", params={"lasso": text, "limit": 500}).json()
    assert sel["count"] == len(ref) > 5
    assert [i["row"] for i in sel["items"]] == list(ref)


def test_lasso_function_on_a_square():
    pts = np.array([[0.5, 0.5], [2, 2], [0.1, 0.9], [np.nan, 0.5], [-0.1, 0.5]], np.float32)
    rows = mapdata.select_lasso(pts, np.array([0, 0, 1, 0, 1, 1, 0, 1], float))
    assert list(rows) == [0, 2]


def test_hostile_label_in_selection_json_is_escaped(ctx, synth):
    c, rid = client(ctx), synth[1]
    resp = c.get(f"/api/map/{rid}/select", params={"box": "-1e9,-1e9,1e9,1e9", "limit": 500})
    assert b"<script>" not in resp.content and b"\\u003cscript\\u003e" in resp.content
    assert HOSTILE in [i["meta"]["label_name"] for i in json.loads(resp.content)["items"]]
