"""The perturbation functions (perturb.py) against plain references, and the store contract of perturbed runs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mubench_probe import perturb as P
from mubench_probe.errors import UsageError
from mubench_probe.store import EmbeddingStore
from mubench_probe.testing import write_run


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (24, 32, 3), dtype=np.uint8),
        rng.integers(1000, 9000, (24, 32), dtype=np.uint16),
        rng.normal(5.0, 2.0, (24, 32, 2)).astype(np.float32),
    ]


@pytest.mark.parametrize("name", list(P.PERTURBATIONS))
def test_identity_severity_is_byte_for_byte(name):
    spec = P.PERTURBATIONS[name]
    for img in _images():
        if name == "stain" and img.ndim != 3:
            continue
        out = P.Perturbation(name, spec.identity)(img, "row-7", 0.5)
        assert out.dtype == img.dtype and out.shape == img.shape
        assert out.tobytes() == img.tobytes(), name


@pytest.mark.parametrize(
    "key", ["blur:1.5", "noise:4", "gamma:2", "exposure:1", "rotate:90", "rotate:30", "flip:3", "scale:0.5", "jpeg:30"]
)
def test_dtype_kept_and_image_changed(key):
    pert = P.from_key(key)
    for img in _images():
        out = pert(img, "img-1")
        assert out.dtype == img.dtype
        assert not np.array_equal(out, img) or out.shape != img.shape, (key, img.dtype)


def test_blur_matches_skimage_and_has_the_sigma_asked():
    from skimage.filters import gaussian

    img = _images()[1]
    got = P.blur(img.astype(np.float64), 2.0)
    want = gaussian(img.astype(np.float64), sigma=2.0, mode="nearest", truncate=4.0, preserve_range=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    rgb = _images()[0].astype(np.float32)
    want_rgb = gaussian(rgb, sigma=1.5, mode="nearest", truncate=4.0, preserve_range=True, channel_axis=-1)
    np.testing.assert_allclose(P.blur(rgb, 1.5), want_rgb, rtol=1e-5, atol=1e-3)
    # a point source spreads to a Gaussian whose second moment is sigma^2 along each axis
    point = np.zeros((81, 81))
    point[40, 40] = 1.0
    psf = P.blur(point, 3.0)
    rows = np.arange(81) - 40.0
    assert psf.sum() == pytest.approx(1.0, abs=1e-9)
    assert (psf.sum(axis=1) * rows**2).sum() == pytest.approx(9.0, rel=1e-3)
    assert (psf.sum(axis=0) * rows**2).sum() == pytest.approx(9.0, rel=1e-3)


def test_blur_sigma_in_microns_when_the_pixel_size_is_known():
    img = _images()[1]
    pert = P.Perturbation("blur", 1.0)
    np.testing.assert_array_equal(pert(img, 0, 0.25), P.blur(img, 4.0))  # 1 µm at 0.25 µm/px = 4 px
    np.testing.assert_array_equal(pert(img, 0, float("nan")), P.blur(img, 1.0))  # unknown: pixels
    assert pert.unit(np.array([0.25, 0.5])) == "um"
    assert pert.unit(np.array([np.nan, np.nan])) == "px"


@pytest.mark.parametrize("dtype,level", [(np.uint16, 20000.0), (np.float32, 3.0), (np.uint8, 120.0)])
@pytest.mark.parametrize("snr", [2.0, 10.0])
def test_noise_has_the_snr_asked(dtype, level, snr):
    img = np.full((400, 400), level, dtype=dtype)  # min is the level itself: measure on a dark border
    img[:, :4] = 0
    out = P.noise(img, snr, seed=3).astype(np.float64)
    region = out[:, 50:]
    signal = level  # intensity above the image's minimum (0)
    mean_signal = img.astype(np.float64).mean()  # S: the mean intensity above the minimum
    want_std = mean_signal / snr  # the noise std at the mean signal, by the definition used
    assert region.mean() == pytest.approx(signal, rel=0.02)
    # at the mean signal the std is exactly S/snr; at level x it is sqrt(a x + b) (half Poisson)
    var = want_std**2
    expected = math.sqrt(0.5 * var / mean_signal * signal + 0.5 * var)
    tol = 0.05 if dtype != np.uint8 or expected > 3 else 0.15
    assert region.std() == pytest.approx(expected, rel=tol)


def test_noise_is_deterministic_per_seed_and_kept_across_severities():
    img = _images()[1]
    a, b = P.noise(img, 5, seed=1), P.noise(img, 5, seed=1)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, P.noise(img, 5, seed=2))
    pert = P.Perturbation("noise", 5.0)
    assert pert.seed("img-3") == P.Perturbation("noise", 2.0).seed("img-3")  # one draw across a sweep
    assert pert.seed("img-3") == P.row_seed("noise", "img-3")
    assert pert.seed("img-3") != pert.seed("img-4")


def test_row_seed_is_a_stable_sha256():
    import hashlib

    want = int.from_bytes(hashlib.sha256(b"noise\0img-3").digest()[:8], "little")
    assert P.row_seed("noise", "img-3") == want


def test_rotate_matches_numpy_and_scipy_references():
    from scipy.ndimage import rotate as nd_rotate
    from skimage.transform import rotate as sk_rotate

    img = _images()[0]
    np.testing.assert_array_equal(P.rotate(img, 90), np.rot90(img, 1))
    np.testing.assert_array_equal(P.rotate(img, -90), np.rot90(img, 3))
    np.testing.assert_array_equal(P.rotate(img, 180), img[::-1, ::-1])
    # counter-clockwise as displayed: skimage's convention (exact for 90 on a square image)
    sq = img[:24, :24].astype(np.float64)
    np.testing.assert_allclose(P.rotate(sq, 90), sk_rotate(sq, 90, preserve_range=True, order=1), atol=1e-9)
    f = img.astype(np.float64)
    want = nd_rotate(f, 30, axes=(1, 0), reshape=False, order=1, mode="nearest")
    np.testing.assert_array_equal(P.rotate(f, 30), want)
    sk = sk_rotate(f, 30, order=1, mode="edge", preserve_range=True)
    np.testing.assert_allclose(P.rotate(f, 30)[8:16, 10:22], sk[8:16, 10:22], atol=1e-6)


def test_resample_scales_to_a_target_pixel_size_and_needs_the_pixel_size():
    g = _images()[1]
    to_one_um = P.Perturbation("resample", 1.0)
    np.testing.assert_array_equal(to_one_um(g, "row-1", 0.5), P.scale(g, 0.5))  # 0.5 µm/px -> 1 µm/px: half
    np.testing.assert_array_equal(to_one_um(g, "row-1", 2.0), P.scale(g, 2.0))
    assert to_one_um(g, "row-1", 1.0).tobytes() == g.tobytes()  # already at the target
    for unknown in (None, float("nan"), 0.0):
        with pytest.raises(ValueError, match="pixel size"):
            to_one_um(g, "row-1", unknown)
    assert [p.key for p in P.parse_perturb("resample:0.25,1")] == ["resample:0.25", "resample:1"]
    with pytest.raises(UsageError):
        P.parse_perturb("resample:-1")


def test_flip_scale_gamma_exposure_channel_drop():
    from skimage.transform import rescale

    img = _images()[0]
    np.testing.assert_array_equal(P.flip(img, 1), img[:, ::-1])
    np.testing.assert_array_equal(P.flip(img, 2), img[::-1])
    np.testing.assert_array_equal(P.flip(img, 3), P.rotate(img, 180))
    g = _images()[1]
    want = rescale(g.astype(np.float64), 0.5, order=1, anti_aliasing=True, preserve_range=True)
    np.testing.assert_array_equal(P.scale(g, 0.5), np.rint(want).astype(np.uint16))
    assert P.scale(g, 2).shape == (48, 64)
    u = np.array([[0, 64, 128, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(P.gamma(u, 2.0), np.rint(255 * (u / 255.0) ** 2).astype(np.uint8))
    np.testing.assert_array_equal(P.exposure(u, 1), [[0, 128, 255, 255]])
    np.testing.assert_array_equal(P.exposure(u, -1), [[0, 32, 64, 128]])
    dropped = P.channel_drop(img, 2)
    assert (dropped[..., 1] == 0).all() and np.array_equal(dropped[..., [0, 2]], img[..., [0, 2]])
    with pytest.raises(ValueError, match="cannot drop channel 4"):
        P.channel_drop(img, 4)


def test_jpeg_and_stain():
    from PIL import Image

    img = _images()[0]
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=40)
    np.testing.assert_array_equal(P.jpeg(img, 40), np.asarray(Image.open(buf)))
    g16 = _images()[1]
    assert P.jpeg(g16, 90).dtype == np.uint16
    s1, s2 = P.stain(img, 0.3, seed=5), P.stain(img, 0.3, seed=5)
    assert s1.tobytes() == s2.tobytes() and not np.array_equal(s1, img)
    with pytest.raises(ValueError, match="RGB"):
        P.stain(g16, 0.3)


def test_parse_perturb():
    got = P.parse_perturb("blur:0,1,2.5")
    assert [p.key for p in got] == ["blur:0", "blur:1", "blur:2.5"]
    assert P.parse_perturb(" Noise:inf,5,5 ") == [P.Perturbation("noise", math.inf), P.Perturbation("noise", 5.0)]
    assert P.parse_perturbations(["rotate:90", "rotate:90,180"]) == [
        P.Perturbation("rotate", 90.0),
        P.Perturbation("rotate", 180.0),
    ]
    assert P.from_key("exposure:-0").key == "exposure:0"
    for bad, msg in [
        ("fog:1", "unknown perturbation 'fog'"),
        ("blur", "give blur:SEVERITY"),
        ("blur:", "give blur:SEVERITY"),
        ("blur:1,,2", "give blur:SEVERITY"),
        ("blur:x", "is not a number"),
        ("blur:-1", "must be in"),
        ("blur:nan", "not a finite number"),
        ("noise:0", "must be in"),
        ("flip:5", "takes 0, 1, 2, 3"),
        ("jpeg:50.5", "whole numbers"),
        ("jpeg:101", "must be in"),
        ("scale:0", "must be in"),
    ]:
        with pytest.raises(UsageError, match=msg):
            P.parse_perturb(bad)


def test_provenance_entry():
    assert P.from_key("blur:1").provenance(np.array([0.5])) == {
        "name": "blur",
        "severity": 1.0,
        "key": "blur:1",
        "unit": "um",
        "version": P.VERSION,
    }
    assert P.from_key("noise:inf").provenance()["severity"] == "inf"
    assert P.from_key("jpeg:30").provenance()["severity"] == 30


def test_store_contract_twins_and_default_listing(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    meta = pd.DataFrame({"label_name": rng.choice(["a", "b"], 40), "dataset": "synth"})
    clean = write_run(tmp_path / "s.zarr", x, meta)
    other = write_run(tmp_path / "s.zarr", x, meta, model="synthetic:other")
    for key in ["noise:inf", "blur:2", "blur:1", "noise:5"]:
        twin = write_run(tmp_path / "s.zarr", x + 1, meta, perturbation=key)
        assert twin.path == f"synthetic_random~{key.replace(':', '_')}/synth/test"
        assert twin.perturbation == key
    write_run(tmp_path / "s.zarr", x, meta, model="synthetic:other", perturbation="rotate:90")
    st = EmbeddingStore(tmp_path / "s.zarr")
    assert sorted(r.path for r in st.runs()) == sorted([clean.path, other.path])
    assert sorted(r.path for r in st.find()) == sorted([clean.path, other.path])
    assert clean.perturbation is None
    assert [r.perturbation for r in st.twins(clean)] == ["blur:1", "blur:2", "noise:5", "noise:inf"]
    assert [r.perturbation for r in st.twins(other)] == ["rotate:90"]
    assert len(st.runs(perturbed=True)) == 7
    assert len(st.scan()) == 7 and st.check(deep=True) == []
    twin = st.twins(clean)[0]
    assert twin.provenance["perturbation"] == {
        "name": "blur",
        "severity": 1.0,
        "key": "blur:1",
        "unit": "px",
        "version": 1,
    }
    np.testing.assert_array_equal(twin.image_embeddings(normalize=False), x + 1)
