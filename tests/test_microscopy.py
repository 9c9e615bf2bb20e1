"""Microscopy inputs: real OME-TIFF / OME-Zarr / ImageJ TIFF files written here, read with bioio;
channels, z/t projections and pixel-size resampling checked against NumPy references; the
per-channel store array under the integrity checks; the pixel-size stratum."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.datasets import bioio as bioio_module
from mubench_probe.datasets import load_dataset, row_source
from mubench_probe.errors import DatasetUnavailableError, ImageDecodeError, ProvenanceMismatchError, UsageError
from mubench_probe.evaluation import pixel_size_bins
from mubench_probe.extraction import ImageRows, combine_channels, input_shape
from mubench_probe.imaging import PixelSpec, fit, get_policy, render, resample
from mubench_probe.store import EmbeddingStore, l2_normalize

from .conftest import TINY, gray16_from

NAMES = ["DNA", "ER", "RNA", "AGP", "Mito"]
GROUP = "mubench-tiny-vit_random/plate/test"


def _stack(seed: int, crop: bytes, z: int = 3) -> np.ndarray:
    """A 5-channel 16-bit z-stack (Z, C, Y, X) built from a real crop: each channel a different
    transform of it, each plane a different noise draw, so projections differ."""
    small = Image.open(io.BytesIO(crop)).convert("L").resize((48, 40))
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    base = gray16_from(buf.getvalue()).astype(np.int64)
    rng = np.random.default_rng(seed)
    chans = [base, base[::-1], 4000 - base // 2, np.roll(base, 7, axis=1), base // 3 + 900]
    planes = [[np.clip(c + rng.integers(0, 300, c.shape), 0, 65535) for c in chans] for _ in range(z)]
    return np.array(planes, dtype=np.uint16)


def _ome_tiff(path: Path, arr: np.ndarray, mpp: float = 0.65) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path,
        arr,
        ome=True,
        photometric="minisblack",
        metadata={"axes": "ZCYX", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "Channel": {"Name": NAMES}},
    )


@pytest.fixture(scope="session")
def plate(tmp_path_factory, real_crops) -> Path:
    """A Cell Painting-like folder: ROOT/<class>/<well>.ome.tif, 5 channels, 3 z-planes, 16-bit."""
    root = tmp_path_factory.mktemp("micro") / "plate"
    for i in range(8):
        cls = ("ctrl", "drug")[i % 2]
        _ome_tiff(root / cls / f"w{i}.ome.tif", _stack(i, real_crops[i % 4 + 4 * (i % 2)]))
    return root


@pytest.fixture(scope="session")
def plate_store(tmp_path_factory, plate) -> Path:
    """The plate extracted with --channels DNA,2,Mito --channel-mode each --z max (read-only)."""
    path = tmp_path_factory.mktemp("micro") / "each.zarr"
    api.extract(TINY, str(plate), store=path, **EACH)
    return path


EACH = dict(num_workers=0, chunk_rows=4, batch_size=4, channels="DNA,2,Mito", channel_mode="each", z="max")


def _percentile(p: np.ndarray) -> np.ndarray:
    return get_policy("percentile")(p)


def _rgb(planes: list[np.ndarray]) -> np.ndarray:
    planes = planes + [np.zeros_like(planes[0])] * (3 - len(planes))
    return np.stack(planes[:3], axis=-1)


# ---- reading: rows, scenes, metadata ----------------------------------------------------------------


def test_ome_tiff_folder_is_read_with_bioio_one_row_per_scene(plate, tmp_path, real_crops):
    ds = load_dataset(str(plate))
    assert ds.identity["format"] == "bioio-folder" and len(ds) == 8
    assert list(ds.meta["label_name"]) == ["ctrl"] * 4 + ["drug"] * 4
    assert np.allclose(ds.meta["microns_per_pixel"].astype(float), 0.65)
    assert set(ds.meta["channel_names"]) == {"|".join(NAMES)}
    # a multi-scene file: one row per scene, each with its own pixel size; --scene keeps one
    root = tmp_path / "ms"
    (root / "a").mkdir(parents=True)
    arr = _stack(0, real_crops[0], z=1)[0]
    with tifffile.TiffWriter(root / "a" / "two.ome.tif", ome=True) as tw:
        tw.write(arr, photometric="minisblack", metadata={"axes": "CYX", "PhysicalSizeX": 0.5})
        tw.write(arr[:2], photometric="minisblack", metadata={"axes": "CYX", "PhysicalSizeX": 0.25})
    shutil.copy(plate / "drug" / "w1.ome.tif", root / "a" / "one.ome.tif")
    ms = load_dataset(str(root))
    assert list(ms.meta["scene_index"]) == [0, 0, 1] and list(ms.meta["microns_per_pixel"]) == [0.65, 0.5, 0.25]
    src = row_source(ms.reader, 2, 10**7)
    assert src.shape == (1, 2, 1, 40, 48) and np.array_equal(src.plane(0, 1, 0), arr[1])
    one = load_dataset(str(root), scene="1")
    assert len(one) == 1 and one.identity["scene"] == "1" and one.meta["scene"][0] == "Image:1"
    with pytest.raises(DatasetUnavailableError, match="no scene"):
        load_dataset(str(root), scene="7")
    with pytest.raises(DatasetUnavailableError, match="no scenes"):
        load_dataset("sample", scene="0")


def test_csv_manifest_pixel_size_column_wins_over_metadata(plate, tmp_path):
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "microns_per_pixel"])
        w.writerow([plate / "ctrl" / "w0.ome.tif", "ctrl", "0.3"])
        w.writerow([plate / "drug" / "w1.ome.tif", "drug", ""])
    ds = load_dataset(str(manifest))
    assert ds.identity["format"] == "bioio-csv" and ds.identity["manifest_sha256"]
    assert list(ds.meta["microns_per_pixel"]) == [0.3, 0.65]


def test_ome_zarr_planes_in_the_metadata_order(tmp_path, real_crops):
    from bioio_ome_zarr.writers import Channel, OMEZarrWriter

    arr = np.stack([np.moveaxis(_stack(s, real_crops[s]), 0, 1) for s in (1, 2)])  # T, C, Z, Y, X
    (tmp_path / "z" / "a").mkdir(parents=True)
    writer = OMEZarrWriter(
        str(tmp_path / "z" / "a" / "well.ome.zarr"),
        level_shapes=arr.shape,
        dtype=arr.dtype,
        channels=[Channel(label=n, color="FFFFFF") for n in NAMES],
        axes_names=["t", "c", "z", "y", "x"],
        axes_types=["time", "channel", "space", "space", "space"],
        axes_units=[None, None, "micrometer", "micrometer", "micrometer"],
        physical_pixel_size=[1.0, 1.0, 2.0, 0.4, 0.4],
    )
    writer.write_full_volume(arr)
    ds = load_dataset(str(tmp_path / "z"))
    assert ds.meta["microns_per_pixel"][0] == 0.4 and ds.meta["channel_names"][0] == "|".join(NAMES)
    src = row_source(ds.reader, 0, 10**7)
    assert src.shape == arr.shape and tuple(src.channel_names) == tuple(NAMES)
    spec = PixelSpec(get_policy("dtype"), channels=("Mito", "0"), t="index:1", z="middle")
    (img,) = render(src, spec)
    want = _rgb([get_policy("dtype")(arr[1, 4, 1]), get_policy("dtype")(arr[1, 0, 1])])
    assert np.array_equal(np.asarray(img), want)
    with pytest.raises(ImageDecodeError, match="5 channel"):
        render(src, PixelSpec(get_policy("dtype"), channels=("5",), t="max", z="max"))
    with pytest.raises(ImageDecodeError, match="2 t-planes; choose a projection with --t"):
        render(src, PixelSpec(get_policy("dtype"), channels=("0",), z="max"))


# ---- pixels: channels, projections, modes, resampling against NumPy ----------------------------------


@pytest.mark.parametrize("z", ["max", "mean", "middle", "index:2"])
def test_channels_and_projections_match_numpy(plate, z):
    arr = tifffile.imread(plate / "ctrl" / "w0.ome.tif")  # Z, C, Y, X
    proj = {
        "max": arr.max(axis=0),
        "mean": np.rint(arr.astype(np.float32).mean(axis=0)).astype(np.uint16),
        "middle": arr[1],
        "index:2": arr[2],
    }[z]
    src = row_source(load_dataset(str(plate)).reader, 0, 10**7)
    spec = PixelSpec(get_policy("percentile"), channels=("Mito", "0", "RNA"), channel_mode="rgb", z=z)
    (img,) = render(src, spec)
    want = _rgb([_percentile(proj[4]), _percentile(proj[0]), _percentile(proj[2])])
    assert np.array_equal(np.asarray(img), want)
    each = render(src, PixelSpec(get_policy("percentile"), channels=("1", "AGP"), channel_mode="each", z=z))
    assert [np.asarray(i).tolist() for i in each] == [_rgb([_percentile(proj[c])] * 3).tolist() for c in (1, 3)]


@pytest.mark.parametrize("z", ["max", "mean", "index:1"])
def test_large_scenes_are_read_in_blocks_with_the_same_result(plate, monkeypatch, z):
    """Over BLOCK_BYTES a scene is read in dask blocks of the selected channels and consecutive z,
    each plane once; the result equals the whole-scene read."""
    spec = PixelSpec(get_policy("percentile"), channels=("Mito", "0"), channel_mode="each", z=z)
    ds = load_dataset(str(plate))
    whole = [np.asarray(i) for i in render(row_source(ds.reader, 2, 10**7), spec)]
    plane = 40 * 48 * 2
    monkeypatch.setattr(bioio_module, "BLOCK_BYTES", 2 * plane * 2)  # two z of the two selected channels
    reads = []
    real = bioio_module.BioioSource.read_planes
    monkeypatch.setattr(bioio_module.BioioSource, "read_planes", lambda self, *a: reads.append(a[1:]) or real(self, *a))
    blocks = [np.asarray(i) for i in render(row_source(ds.reader, 2, 10**7), spec)]
    assert all(np.array_equal(a, b) for a, b in zip(whole, blocks, strict=True))
    want = [((4, 0), 1, 3)] if z == "index:1" else [((4, 0), 0, 2), ((4, 0), 2, 3)]
    assert reads == want, reads


def test_composite_colours_and_the_default_rule(plate):
    arr = tifffile.imread(plate / "ctrl" / "w0.ome.tif").max(axis=0)
    src = row_source(load_dataset(str(plate)).reader, 0, 10**7)
    (img,) = render(src, PixelSpec(get_policy("percentile"), channels=tuple(NAMES), channel_mode="composite", z="max"))
    s = [_percentile(arr[c]).astype(np.int64) for c in range(5)]
    # Fiji's order: red, green, blue, gray, cyan; summed, clipped at 255
    want = np.stack([s[0] + s[3], s[1] + s[3] + s[4], s[2] + s[3] + s[4]], axis=-1).clip(0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(img), want)
    # no --channels: the single-image rule (first three channels, scaled together)
    (default,) = render(src, PixelSpec(get_policy("percentile"), z="max"))
    lo, hi = np.percentile(arr[:3], [0.5, 99.5])
    together = np.clip(np.rint((np.moveaxis(arr[:3], 0, -1) - lo) / (hi - lo) * 255), 0, 255)
    assert np.abs(np.asarray(default).astype(int) - together).max() <= 1


def _bilinear(a: np.ndarray, f: float) -> np.ndarray:
    h, w = a.shape
    ys = np.clip((np.arange(round(h * f)) + 0.5) / f - 0.5, 0, h - 1)
    xs = np.clip((np.arange(round(w * f)) + 0.5) / f - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx, a = (ys - y0)[:, None], (xs - x0)[None, :], a.astype(np.float64)
    top = a[y0][:, x0] * (1 - wx) + a[y0][:, x1] * wx
    bottom = a[y1][:, x0] * (1 - wx) + a[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def test_resampling_to_a_pixel_size_matches_numpy():
    p = np.random.default_rng(0).integers(0, 256, size=(40, 48), dtype=np.uint8)
    # shrinking by 2 is an area average: rows then columns, each rounded half up (PIL's two passes)
    rows = np.floor(p.reshape(40, 24, 2).astype(np.float64).mean(axis=2) + 0.5)
    assert np.array_equal(resample(p, 0.5), np.floor(rows.reshape(20, 2, 24).mean(axis=1) + 0.5).astype(np.uint8))
    up = resample(p, 2.0)
    assert up.shape == (80, 96) and np.abs(up - _bilinear(p, 2.0)).max() <= 1
    padded = fit(p, 50, 40)
    assert padded.shape == (50, 40) and np.array_equal(padded[5:45], p[:, 4:44]) and not padded[:5].any()


def test_target_mpp_resamples_then_fits_the_models_input(plate):
    arr = tifffile.imread(plate / "drug" / "w1.ome.tif").max(axis=0)
    src = row_source(load_dataset(str(plate)).reader, 4, 10**7)
    spec = PixelSpec(get_policy("percentile"), channels=("DNA",), z="max", target_mpp=1.3)  # 0.65 um/px: shrink 2x
    (img,) = render(src, spec, mpp=0.65, size=(32, 32))
    half = resample(_percentile(arr[0]), 0.5)  # 20 x 24
    assert np.array_equal(np.asarray(img)[..., 0], fit(half, 32, 32))
    (unknown,) = render(src, spec, mpp=float("nan"), size=(32, 32))  # no pixel size: fitted only
    assert np.array_equal(np.asarray(unknown)[..., 0], fit(_percentile(arr[0]), 32, 32))


def test_sizes_are_checked_from_metadata_before_any_plane_is_read(plate, monkeypatch):
    src = row_source(load_dataset(str(plate)).reader, 0, 10**7)
    monkeypatch.setattr(type(src), "plane", lambda *a: pytest.fail("a plane was read"))
    with pytest.raises(ImageDecodeError, match="over the limit"):
        render(src, PixelSpec(get_policy("percentile"), channels=("0",), z="max", max_pixels=1000))
    big = PixelSpec(get_policy("percentile"), channels=("0",), z="max", target_mpp=0.001, max_pixels=10**6)
    monkeypatch.undo()
    with pytest.raises(ImageDecodeError, match="over the limit"):  # a resampled size over the limit, too
        render(src, big, mpp=0.65)


def test_imagej_hyperstack_axes_come_from_the_tiff(tmp_path, real_crops):
    """A plain (non-OME) TIFF in a plain folder: the bytes path reads ImageJ's axes, no guessing."""
    arr = _stack(3, real_crops[3])  # Z, C, Y, X
    (tmp_path / "f" / "a").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "f" / "a" / "s.tif", arr, imagej=True, metadata={"axes": "ZCYX"})
    ds = load_dataset(str(tmp_path / "f"))
    assert ds.identity["format"] == "folder"
    src = row_source(ds.reader, 0, 10**7)
    assert src.shape == (1, 5, 3, 40, 48)
    (img,) = render(src, PixelSpec(get_policy("minmax"), channels=("4",), z="max"))
    assert np.array_equal(np.asarray(img)[..., 1], get_policy("minmax")(arr[:, 4].max(axis=0)))
    with pytest.raises(ImageDecodeError, match="3 z-planes; choose a projection with --z"):
        render(src, PixelSpec(get_policy("minmax")))
    with pytest.raises(ImageDecodeError, match="no channel named 'DNA'"):
        render(src, PixelSpec(get_policy("minmax"), channels=("DNA",), z="max"))


def test_a_missing_plugin_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    (tmp_path / "c" / "a").mkdir(parents=True)
    (tmp_path / "c" / "a" / "x.czi").write_bytes(b"ZISRAWFILE")
    real = bioio_module.importlib.import_module

    def no_czi(name, *a):
        if name == "bioio_czi":
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(bioio_module.importlib, "import_module", no_czi)
    r = CliRunner().invoke(app, ["extract", "-d", str(tmp_path / "c"), "-m", TINY, "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "needs the bioio plugin bioio-czi: pip install 'mubench-probe[formats]'" in r.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--channels", "0,1,2,3"], "at most three"),
        (["--channel-mode", "each"], "needs --channels"),
        (["--z", "top"], "--z must be max, mean, middle or index:K"),
        (["--t", "index:-1"], "--t must be"),
        (["--channel-mode", "stack", "--channels", "0"], "--channel-mode must be one of"),
    ],
)
def test_bad_pixel_options_are_usage_errors(args, needle, tmp_path):
    r = CliRunner().invoke(app, ["extract", "-d", "sample", "-m", TINY, "--store", str(tmp_path / "s"), *args])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    with pytest.raises(UsageError):
        api.ExtractConfig(**{"channels": "0,1,2,3"})


# ---- extraction end to end: each channel stored, combined, scored, resumed, repaired -------------------


def test_each_mode_stores_every_channel_and_their_mean(plate_store, plate):
    from mubench_probe.encoders import load_encoder

    (run,) = EmbeddingStore(plate_store).runs()
    assert run.channel_labels == ["DNA", "2", "Mito"] and run.complete and not run.failures()
    p = run.provenance
    assert p["pixels"]["channels"] == ["DNA", "2", "Mito"] and p["pixels"]["z"] == "max" and p["channel_emb"] == 3
    enc = load_encoder(TINY, device="cpu")
    arr = tifffile.imread(plate / "ctrl" / "w0.ome.tif").max(axis=0)
    images = [Image.fromarray(_rgb([_percentile(arr[c])] * 3)) for c in (0, 2, 4)]
    ref, _ = enc.encode_images(torch.stack([enc.transform(im) for im in images]))
    raw = np.asarray(run.group["channel_emb"][0], dtype=np.float32)
    np.testing.assert_array_equal(raw, ref.astype(np.float16).astype(np.float32))
    chans = np.asarray(run.group["channel_emb"][:], dtype=np.float32)
    want = combine_channels(chans).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(run.image_embeddings(normalize=False), want, atol=2e-3)
    np.testing.assert_allclose(run.channel_embeddings(1), l2_normalize(chans[:, 1]), atol=1e-6)


def _chunk_files(store: Path, array: str) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of every chunk file of one array of the run, sorted."""
    files = (p for p in (store / GROUP / array / "c").rglob("*") if p.is_file())
    return sorted((p.relative_to(store).as_posix(), p.read_bytes()) for p in files)


@pytest.mark.slow
def test_each_mode_resumes_byte_identical_and_refuses_other_channels(plate_store, plate, tmp_path):
    store = tmp_path / "cut.zarr"
    seen = []

    def killer(n):
        seen.append(n)
        if sum(seen) >= 6:  # inside the second chunk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.extract(TINY, str(plate), store=store, progress=killer, **EACH)
    report = api.extract(TINY, str(plate), store=store, **EACH)
    assert (report.chunks_skipped, report.chunks_written) == (1, 1)
    for array in ("channel_emb", "image_emb", "failure", "done"):
        a, b = (_chunk_files(s, array) for s in (store, plate_store))
        assert len(a) == 2 and a == b, array
    with pytest.raises(ProvenanceMismatchError, match="pixels"):
        api.extract(TINY, str(plate), store=store, **{**EACH, "channels": "DNA,Mito"})
    with pytest.raises(ProvenanceMismatchError, match="pixels"):
        api.extract(TINY, str(plate), store=store, **{**EACH, "z": "mean"})


def test_damaged_channel_chunk_is_named_refused_and_repaired(plate_store, tmp_path):
    work = tmp_path / "d.zarr"
    shutil.copytree(plate_store, work)
    (work / GROUP / "channel_emb" / "c" / "1" / "0" / "0").unlink()
    r = CliRunner().invoke(app, ["verify", str(work)])
    assert r.exit_code == 1 and "channel_emb chunk 1.0.0 (file channel_emb/c/1/0/0) is missing" in r.output, r.output
    r = CliRunner().invoke(app, ["export", str(work), str(tmp_path / "x.parquet"), "--to", "parquet"])
    assert r.exit_code == 1 and "probe verify --repair" in r.output and not (tmp_path / "x.parquet").exists()
    r = CliRunner().invoke(app, ["verify", str(work), "--repair", "--workers", "0"])
    assert r.exit_code == 0, r.output
    files = [
        {p.relative_to(s).as_posix(): p.read_bytes() for p in (s / GROUP / "channel_emb").rglob("*") if p.is_file()}
        for s in (work, plate_store)
    ]
    assert files[0] == files[1]


def test_evaluate_scores_each_channel_and_all_together(plate_store, tmp_path):
    res = api.evaluate(plate_store, api.EvalConfig(heads=("knn",), folds=2, n_boot=0, ks=(1,)), results_dir=tmp_path)
    models = set(res.table["model"])
    assert models == {TINY, *(f"{TINY}#channel={c}" for c in ("DNA", "2", "Mito"))}
    knn = res.table[(res.table["metric"] == "accuracy") & (res.table["stratum"] == "all")]
    assert len(knn.groupby("model")) == 4 and knn["value"].notna().all()
    strata = set(res.table["stratum"])
    assert "pixel_size=0.5-1 um/px" in strata, strata


def test_pixel_size_bins_are_powers_of_two():
    meta = pd.DataFrame({"microns_per_pixel": [0.25, 0.3, 0.65, 1.0, None, "n/a", 7.9]})
    assert [None if pd.isna(v) else v for v in pixel_size_bins(meta)["pixel_size"]] == [
        "0.25-0.5 um/px",
        "0.25-0.5 um/px",
        "0.5-1 um/px",
        "1-2 um/px",
        None,
        None,
        "4-8 um/px",
    ]
    assert "pixel_size" not in pixel_size_bins(pd.DataFrame({"microns_per_pixel": [None]}))


@pytest.mark.slow
def test_target_mpp_on_a_csv_with_missing_sizes_notes_them(tmp_path, real_crops):
    """μ-Bench-style rows (PNG crops with a microns_per_pixel column, some empty), rgb images."""
    rows = []
    for i, data in enumerate(real_crops[:4]):
        p = tmp_path / f"c{i}.jpg"
        p.write_bytes(data)
        rows.append([p.name, "ab"[i % 2], "" if i == 3 else str(0.5 * (i + 1))])
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "microns_per_pixel"], *rows])
    report = api.extract(TINY, str(tmp_path / "m.csv"), store=tmp_path / "s.zarr", num_workers=0, target_mpp=1.0)
    assert report.notes and report.notes[0].startswith("1 of 4 rows have no pixel size")
    from mubench_probe.encoders import load_encoder

    enc = load_encoder(TINY, device="cpu")
    ds = load_dataset(str(tmp_path / "m.csv"))
    rows_ = ImageRows(ds, enc.transform, get_policy("percentile"), input_shape(enc), spec=_spec(target_mpp=1.0))
    _, x, reason = rows_[1]  # 1.0 um/px already: only fitted to the model's input (64 x 64)
    rgb = np.asarray(Image.open(io.BytesIO(real_crops[1])).convert("RGB"))
    h, w = input_shape(enc)[-2:]
    want = np.stack([fit(rgb[..., c], h, w) for c in range(3)], axis=-1)
    assert reason == "" and torch.equal(x, enc.transform(Image.fromarray(want)))
    (run,) = EmbeddingStore(tmp_path / "s.zarr").runs()
    assert run.provenance["pixels"]["target_mpp"] == 1.0 and run.provenance["pixels"]["channels"] is None


def _spec(**kw) -> PixelSpec:
    return PixelSpec(get_policy("percentile"), **kw)


@pytest.mark.slow
def test_shards_and_worker_processes_handle_per_channel_runs(plate_store, plate, tmp_path):
    """--channel-mode each meets the scale-out: two shards fill the per-channel arrays byte for
    byte as one process did, and units of each channel computed in worker processes equal serial ones."""
    store = tmp_path / "sharded.zarr"
    for i in (1, 0):  # either order
        api.extract(TINY, str(plate), store=store, shard=f"{i}/2", **EACH)
    for array in ("channel_emb", "image_emb", "failure", "done"):  # chunk files (done/zarr.json holds times)
        a, b = (_chunk_files(s, array) for s in (store, plate_store))
        assert a and a == b, array
    cfg = api.EvalConfig(heads=("knn", "proto"), folds=2, n_boot=0, ks=(1, 3))
    serial = api.evaluate(store, cfg, results_dir=tmp_path / "r1")
    procs = api.evaluate(store, cfg, results_dir=tmp_path / "r2", jobs=2)
    assert {f"{TINY}#channel=Mito", TINY} <= set(procs.table["model"])
    cols = ["model", "task", "head", "metric", "stratum", "value", "unit"]
    a, b = (r.table[cols].sort_values(cols[:5]).reset_index(drop=True) for r in (serial, procs))
    pd.testing.assert_frame_equal(a, b)


def test_features_in_each_mode_are_the_mean_of_the_channel_features(plate, tmp_path):
    """--features with --channel-mode each: a row's pre-projection features are its channels' mean."""
    from mubench_probe.encoders import load_encoder

    api.extract(TINY, str(plate), store=tmp_path / "f.zarr", features=True, dtype="float32", **EACH)
    (run,) = EmbeddingStore(tmp_path / "f.zarr").runs()
    enc = load_encoder(TINY, device="cpu")
    feats = run.features()
    assert feats.shape == (8, enc.info.feature_dim)
    for row, path in ((0, plate / "ctrl" / "w0.ome.tif"), (7, plate / "drug" / "w7.ome.tif")):
        arr = tifffile.imread(path).max(axis=0)
        images = [Image.fromarray(_rgb([_percentile(arr[c])] * 3)) for c in (0, 2, 4)]
        _, ref = enc.encode_images(torch.stack([enc.transform(im) for im in images]), features=True)
        np.testing.assert_allclose(feats[row], ref.mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_interpolate_takes_the_pixel_options_of_extract(plate, plate_store, tmp_path):
    """`probe interpolate` renders images as `probe extract` does: alpha 0 is the base model's run."""
    import open_clip

    from mubench_probe.encoders.interpolate import parse_interp

    torch.manual_seed(2)
    torch.save(open_clip.create_model("mubench-tiny-vit").state_dict(), tmp_path / "ft.pt")
    store = tmp_path / "i.zarr"
    api.interpolate(TINY, f"mubench-tiny-vit:{tmp_path / 'ft.pt'}", [0.0, 1.0], str(plate), store=store, **EACH)
    runs = {parse_interp(r.model_spec).alpha: r for r in EmbeddingStore(store).runs()}
    (base,) = EmbeddingStore(plate_store).runs()
    assert runs[0.0].channel_labels == ["DNA", "2", "Mito"]
    assert runs[0.0].provenance["pixels"] == base.provenance["pixels"]
    np.testing.assert_array_equal(runs[0.0].group["channel_emb"][:], base.group["channel_emb"][:])
    assert not np.array_equal(runs[1.0].group["channel_emb"][:], base.group["channel_emb"][:])
