"""WebDataset shards (written here with tarfile) read by offset, and `probe export` round trips."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import fsspec
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.datasets import load_dataset
from mubench_probe.datasets import wds as wds_module
from mubench_probe.errors import DatasetUnavailableError
from mubench_probe.imaging import get_policy, load_rgb
from mubench_probe.store import EmbeddingStore

from .conftest import TINY

CLASSES = ["platelet", "red blood cell", "white blood cell"]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def shards(tmp_path_factory, sample) -> tuple[Path, list[int]]:
    """Three shards of 10 sample crops each (jpg + cls, every other sample a json too), a sample
    without an image, classnames.txt beside them. Returns the folder and the sample rows used."""
    root = tmp_path_factory.mktemp("wds") / "blood"
    root.mkdir()
    rows = list(range(0, 60, 2))
    names = list(sample.meta["label_name"])
    for s in range(3):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tf:
            for j in range(10):
                r = rows[s * 10 + j]
                key = f"s{s}/{r:05d}"
                _add(tf, f"{key}.jpg", sample.reader.read(r))
                _add(tf, f"{key}.cls", str(CLASSES.index(names[r])).encode())
                if j % 2:
                    _add(tf, f"{key}.json", json.dumps({"stain": "wright", "row": r, "nested": {"x": 1}}).encode())
            _add(tf, f"s{s}/orphan.txt", b"a caption without an image")
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    return root, rows


def test_shards_are_indexed_in_order_and_read_by_offset(shards, sample, monkeypatch):
    root, rows = shards
    ds = load_dataset(str(root / "shard-{000..002}.tar"))
    assert ds.identity["format"] == "webdataset" and len(ds) == 30
    assert list(ds.meta["key"]) == [f"s{r // 20}/{r:05d}" for r in rows]
    assert list(ds.meta["label_name"]) == [sample.meta["label_name"][r] for r in rows], "cls through classnames.txt"
    assert ds.meta["stain"].iloc[1] == "wright" and pd.isna(ds.meta["stain"].iloc[0]) and "nested" not in ds.meta
    # a row is one seek and one read of an open shard: no shard is read whole, handles are reused
    opened = []
    real = fsspec.core.url_to_fs

    def counting(url, **kw):
        opened.append(url)
        return real(url, **kw)

    monkeypatch.setattr(fsspec.core, "url_to_fs", counting)
    wds_module.close_shards()
    for i in (0, 5, 9, 10, 29, 1):
        assert ds.reader.read(i) == sample.reader.read(rows[i])
    assert len(opened) == 3, opened
    url = load_dataset(f"file://{root}/shard-{{000..002}}.tar")  # an fsspec URL reads the same rows
    assert url.reader.read(29) == ds.reader.read(29) and list(url.meta["label_name"]) == list(ds.meta["label_name"])
    limited = load_dataset(str(root / "shard-{000..002}.tar"), limit=12)
    assert len(limited) == 12 and limited.identity["limit"] == "12"


def test_missing_or_broken_shards_are_one_line(shards, tmp_path):
    root, _ = shards
    with pytest.raises(DatasetUnavailableError, match=r"shard-003\.tar does not exist \(and 6 more of 10 shards\)"):
        load_dataset(str(root / "shard-{000..009}.tar"))
    (tmp_path / "bad.tar").write_bytes(b"not a tar file at all" * 40)
    r = CliRunner().invoke(
        app, ["extract", "-d", str(tmp_path / "bad.tar"), "-m", TINY, "--store", str(tmp_path / "s")]
    )
    assert r.exit_code == 1 and "cannot read WebDataset shard" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.slow
def test_webdataset_extraction_with_workers_resumes_byte_identical(shards, sample, tmp_path):
    from mubench_probe.encoders import load_encoder

    root, rows = shards
    spec = str(root / "shard-{000..002}.tar")
    kw = dict(num_workers=2, chunk_rows=8, batch_size=4)
    full = tmp_path / "full.zarr"
    api.extract(TINY, spec, store=full, **kw)
    seen = []

    def killer(n):
        seen.append(n)
        if sum(seen) >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.extract(TINY, spec, store=tmp_path / "cut.zarr", progress=killer, **kw)
    report = api.extract(TINY, spec, store=tmp_path / "cut.zarr", **kw)
    assert report.chunks_skipped >= 1 and report.chunks_skipped + report.chunks_written == 4
    group = "mubench-tiny-vit_random/blood/test"
    for array in ("image_emb", "failure", "done"):
        a, b = (
            {p.relative_to(s).as_posix(): p.read_bytes() for p in (s / group / array / "c").rglob("*") if p.is_file()}
            for s in (full, tmp_path / "cut.zarr")
        )
        assert len(a) == 4 and a == b, array
    enc = load_encoder(TINY, device="cpu")
    imgs = [enc.transform(load_rgb(sample.reader.read(rows[i]), get_policy("percentile"))) for i in (0, 17)]
    ref, _ = enc.encode_images(torch.stack(imgs))
    (run,) = EmbeddingStore(full).runs()
    got = run.image_embeddings(normalize=False)[[0, 17]]
    np.testing.assert_array_equal(got, ref.astype(np.float16).astype(np.float32))
    res = api.evaluate(full, api.EvalConfig(heads=("knn",), folds=2, n_boot=0, ks=(1,)), results_dir=tmp_path / "r")
    assert "fine/blood" in set(res.table["task"])


# ---- exports ------------------------------------------------------------------------------------------


def _h5_column(g: h5py.Group) -> np.ndarray:
    if isinstance(g, h5py.Dataset):
        return g[()]
    cats = np.array([c.decode() for c in g["categories"][()]], dtype=object)
    codes = g["codes"][()]
    return np.array([cats[c] if c >= 0 else None for c in codes], dtype=object)


def test_anndata_export_follows_the_h5ad_layout_and_equals_the_store(tiny_store, tmp_path):
    out = tmp_path / "cells.h5ad"
    r = CliRunner().invoke(app, ["export", str(tiny_store), str(out), "--to", "anndata", "--model", TINY])
    assert r.exit_code == 0 and "exported 450 rows" in r.output, r.output
    (run,) = EmbeddingStore(tiny_store).runs()
    meta = run.meta()
    with h5py.File(out, "r") as f:
        assert f.attrs["encoding-type"] == "anndata" and f["obs"].attrs["encoding-type"] == "dataframe"
        order = [str(c) for c in f["obs"].attrs["column-order"]]
        assert order == ["row", *meta.columns, "failure"]
        assert [i.decode() for i in f["obs"]["_index"][:3]] == ["0", "1", "2"]
        np.testing.assert_array_equal(f["obsm"]["X_image"][()], run.image_embeddings())
        labels = _h5_column(f["obs"]["label_name"])
        assert list(labels) == list(meta["label_name"])
        assert np.isnan(_h5_column(f["obs"]["microns_per_pixel"])).all()
        prov = json.loads(f["uns"]["mubench_probe"]["provenance_json"][()].decode())
        assert prov == json.loads(json.dumps(run.provenance, default=str))
        assert f["var"]["_index"].shape == (0,)
    try:  # anndata itself reads it where it is installed (it needs pandas < 3, so it is no test dependency)
        import anndata
    except ImportError:
        return
    adata = anndata.read_h5ad(out)
    assert adata.n_obs == 450 and list(adata.obs["label_name"]) == list(meta["label_name"])


def test_npy_export_is_clip_retrievals_layout(tiny_store, tmp_path):
    out = tmp_path / "emb"
    api.export(tiny_store, "npy", out, model=TINY)
    x = np.load(out / "img_emb" / "img_emb_0.npy")
    (run,) = EmbeddingStore(tiny_store).runs()
    assert x.dtype == np.float16 and np.array_equal(x, run.image_embeddings().astype(np.float16))
    meta = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    assert list(meta["row"]) == list(range(450)) and list(meta["label_name"]) == list(run.meta()["label_name"])
    assert json.loads((out / "mubench_probe.json").read_text())["model"] == TINY


def test_parquet_export_keeps_every_row_and_the_channels(tmp_path, tiny_store):
    out = tmp_path / "t.parquet"
    api.export(tiny_store, "parquet", out)
    df = pd.read_parquet(out)
    (run,) = EmbeddingStore(tiny_store).runs()
    np.testing.assert_array_equal(np.stack(df["embedding"].to_numpy()), run.image_embeddings())
    assert (df["failure"] == "").all() and list(df["row"]) == list(range(450))


def test_export_of_each_mode_channels_and_failed_rows(tmp_path, real_crops):
    """A folder of OME-TIFFs with one unreadable file: every export keeps its rows apart."""
    import tifffile

    root = tmp_path / "plate"
    for i in range(4):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 4000, size=(2, 20, 24), dtype=np.uint16)
        tifffile.imwrite(root / "ab"[i % 2] / f"w{i}.ome.tif", arr, ome=True, metadata={"axes": "CYX"})
    (root / "a" / "broken.ome.tif").write_bytes(b"II*\x00 truncated")
    store = tmp_path / "s.zarr"
    api.extract(TINY, str(root), store=store, num_workers=0, channels="0,1", channel_mode="each")
    (run,) = EmbeddingStore(store).runs()
    bad = next(iter(run.failures()))
    df = pd.read_parquet(api.export(store, "parquet", tmp_path / "t.parquet").path)
    assert df["failure"][bad] and not np.stack(df["embedding"].to_numpy())[bad].any()
    np.testing.assert_array_equal(np.stack(df["embedding_1"].to_numpy()), run.channel_embeddings(1))
    npy = api.export(store, "npy", tmp_path / "n")
    assert np.load(npy.path / "img_emb" / "img_emb_0.npy").shape == (len(df) - 1, 32)
    with h5py.File(api.export(store, "anndata", tmp_path / "a.h5ad").path, "r") as f:
        assert set(f["obsm"]) == {"X_image", "X_image_0", "X_image_1"}


def test_export_refuses_an_unfinished_or_damaged_run(tiny_store, tmp_path):
    work = tmp_path / "w.zarr"
    shutil.copytree(tiny_store, work)
    (run,) = EmbeddingStore(work).runs()
    run.clear_done(1)
    r = CliRunner().invoke(app, ["export", str(work), str(tmp_path / "o.h5ad")])
    assert r.exit_code == 1 and "not fully extracted" in r.output and not (tmp_path / "o.h5ad").exists(), r.output
    r = CliRunner().invoke(app, ["export", str(tiny_store), str(tmp_path / "o"), "--to", "csv"])
    assert r.exit_code == 2 and "--to must be one of anndata, npy, parquet" in r.output
