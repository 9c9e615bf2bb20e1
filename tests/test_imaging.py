import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from mubench_probe.errors import ImageDecodeError, UsageError
from mubench_probe.imaging import decode_bytes, get_policy, load_rgb, to_rgb

from .conftest import gray16_from


def _tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack")
    return buf.getvalue()


def test_uint8_rgb_passes_through_unchanged(real_crops):
    img = load_rgb(real_crops[0], get_policy("percentile"))
    ref = Image.open(io.BytesIO(real_crops[0])).convert("RGB")
    assert np.array_equal(np.asarray(img), np.asarray(ref))


def test_16bit_gray_tiff_uses_percentile_scaling_not_clipping(real_crops):
    arr = gray16_from(real_crops[0])
    data = _tiff(arr)
    assert decode_bytes(data).dtype == np.uint16
    img = np.asarray(load_rgb(data, get_policy("percentile")))
    lo, hi = np.percentile(arr, [0.5, 99.5])
    expected = np.clip(np.rint((arr - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
    assert img.shape == (*arr.shape, 3)
    assert np.array_equal(img[..., 0], expected) and np.array_equal(img[..., 2], expected)
    # PIL's own conversion saturates these values to white; our policy keeps the contrast.
    assert img.std() > 30


def test_four_channel_tiff_keeps_first_three_channels(real_crops):
    rgb = np.asarray(Image.open(io.BytesIO(real_crops[1])).convert("RGB"))
    four = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 7, np.uint8)], axis=-1)
    chw = np.moveaxis(four, -1, 0)  # microscopy TIFFs are often channel-first
    img = np.asarray(load_rgb(_tiff(chw), get_policy("percentile")))
    assert np.array_equal(img, rgb)


def test_rgba_png_drops_alpha(real_crops):
    rgb = Image.open(io.BytesIO(real_crops[2])).convert("RGB")
    rgba = rgb.copy()
    rgba.putalpha(10)
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert np.array_equal(np.asarray(load_rgb(buf.getvalue(), get_policy("minmax"))), np.asarray(rgb))


def test_policies_differ_and_describe_themselves():
    arr = np.array([[0, 100], [200, 60000]], dtype=np.uint16)
    dt = np.asarray(to_rgb(arr, get_policy("dtype")))[..., 0]
    mm = np.asarray(to_rgb(arr, get_policy("minmax")))[..., 0]
    assert dt[1, 1] == round(60000 / 65535 * 255) and mm[1, 1] == 255 and mm[0, 0] == 0
    assert "percentile" in get_policy("percentile").describe()


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_corrupt_bytes_raise_decode_error(data):
    with pytest.raises(ImageDecodeError):
        load_rgb(data, get_policy("percentile"))


def test_unknown_policy_is_a_usage_error():
    with pytest.raises(UsageError, match="percentile"):
        get_policy("gamma")
