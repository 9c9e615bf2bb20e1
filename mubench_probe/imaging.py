"""Turn any microscopy image (8/16-bit, float, grayscale, multi-channel, TIFF) into RGB uint8.

PIL silently clips or truncates 16-bit and multi-channel data when converting to RGB, which
can hide the signal of a fluorescence image entirely. Every conversion therefore goes through
an explicit, named intensity policy whose description is recorded in the store's provenance.

A few hundred compressed bytes can declare an image of billions of pixels. Every decoder reads
the header first and refuses an image whose pixel count or decoded size is over the limit
(`--max-pixels`, default PIL's 89.5 Mpx) before any pixel is decoded; scaling runs in float32.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import DEFAULT_MAX_PIXELS
from .errors import ImageDecodeError, UsageError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
BYTES_PER_PIXEL = 8  # decoded-size budget per allowed pixel: e.g. 4 channels of uint16, or 2 of float32


def check_size(height: int, width: int, decoded_bytes: int, max_pixels: int) -> None:
    """Refuse an image over the pixel or decoded-size limit, before it is decoded."""
    pixels = height * width
    if pixels > max_pixels:
        raise ImageDecodeError(
            f"image of {width} x {height} = {pixels:,} pixels is over the limit of {max_pixels:,} "
            "(a decompression bomb, or raise --max-pixels)"
        )
    if decoded_bytes > BYTES_PER_PIXEL * max_pixels:
        raise ImageDecodeError(
            f"image would decode to {decoded_bytes:,} bytes, over the limit of {BYTES_PER_PIXEL * max_pixels:,} "
            f"({BYTES_PER_PIXEL} bytes per allowed pixel; raise --max-pixels)"
        )


@contextlib.contextmanager
def _pil_open(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """Image.open with our limit instead of PIL's global one (checked below, before `load`)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # PIL would warn or refuse by its own global; ours is explicit
    try:
        im = Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = before
    with im:
        bands = len(im.getbands())
        bits = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(im.mode, 8)
        check_size(im.height, im.width, im.width * im.height * bands * bits // 8, max_pixels)
        yield im


def _tiff_array(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode a TIFF's first series after checking its declared shape and dtype."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes
        spatial = [shape[axes.index(a)] for a in "YX" if a in axes]
        if len(spatial) < 2:
            spatial = [*sorted(shape, reverse=True)[:2], 1, 1]
        check_size(spatial[0], spatial[1], math.prod(shape) * series.dtype.itemsize, max_pixels)
        squeezed = [s for s in shape if s != 1]
        if len(squeezed) > 3 or (len(squeezed) == 3 and min(squeezed) > 8):
            raise ImageDecodeError(
                f"image has shape {shape} (axes {axes}); only 2-D images with optional channels are "
                "supported (project z-stacks or time series before extraction)"
            )
        return series.asarray()


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an array (H, W) or (H, W, C) in its native dtype."""
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        if data[:4] in _TIFF_MAGIC:
            arr = _tiff_array(data, max_pixels)
        else:
            with _pil_open(data, max_pixels) as im:
                im.load()
                arr = _pil_to_array(im)
    except ImageDecodeError:
        raise
    except Exception as exc:  # any decoder failure means one unreadable image, not a crash
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return _channels_last(np.asarray(arr))


def _pil_to_array(im: Image.Image) -> np.ndarray:
    # Palette / odd modes become RGB(A) first; 16-bit and float modes keep their full range.
    if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "LA"):
        im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L"):
        return np.array(im, dtype=np.uint16)
    arr = np.array(im)
    if im.mode == "RGBA":
        arr = arr[..., :3]  # alpha is display metadata, not signal
    return arr


def _channels_last(arr: np.ndarray) -> np.ndarray:
    """Squeeze singleton axes and move a small leading channel axis to the end."""
    arr = np.squeeze(arr)
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        if arr.shape[0] <= 8 and arr.shape[0] < min(arr.shape[1:]):
            arr = np.moveaxis(arr, 0, -1)
        return arr
    raise ImageDecodeError(
        f"image has shape {arr.shape}; only 2-D images with optional channels are supported "
        "(project z-stacks or time series before extraction)"
    )


def _to_three_channels(arr: np.ndarray) -> np.ndarray:
    """Grayscale is replicated; 2 channels get an empty blue; >3 channels keep the first three."""
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    c = arr.shape[-1]
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 2:
        return np.concatenate([arr, np.zeros_like(arr[..., :1])], axis=-1)
    return arr[..., :3]


_BLOCK = 1 << 20  # values per float32 block of `_scale`: a 4 MB temporary, whatever the image size


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(arr - lo) / (hi - lo) to 0-255 in float32, a block of rows at a time, so the temporary
    stays a few MB instead of 4-8 bytes per value of the whole image."""
    out = np.zeros(arr.shape, dtype=np.uint8)
    if hi <= lo or arr.size == 0:
        return out
    step = max(1, _BLOCK // max(1, arr[:1].size))
    lo32, span = np.float32(lo), np.float32(hi - lo)
    for i in range(0, arr.shape[0], step):
        block = arr[i : i + step].astype(np.float32)
        block -= lo32
        block /= span
        block *= np.float32(255.0)
        np.rint(block, out=block)
        np.clip(block, 0, 255, out=block)
        out[i : i + step] = block
    return out


@dataclass(frozen=True)
class IntensityPolicy:
    """A named rule mapping raw intensities to uint8; `describe()` is stored as provenance."""

    name: str
    low: float = 0.5
    high: float = 99.5

    def describe(self) -> str:
        rule = _POLICIES[self.name][0]
        return rule.format(low=self.low, high=self.high)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return _POLICIES[self.name][1](self, arr)


def _percentile(p: IntensityPolicy, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [p.low, p.high])
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr, nan=lo)
    return _scale(arr, float(lo), float(hi))


def _minmax(p: IntensityPolicy, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float32))
    return _scale(arr, float(arr.min()), float(arr.max()))


def _dtype_range(p: IntensityPolicy, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "ui":
        info = np.iinfo(arr.dtype)
        return _scale(arr, float(max(info.min, 0)), float(info.max))
    return _scale(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)


_POLICIES: dict[str, tuple[str, Callable[[IntensityPolicy, np.ndarray], np.ndarray]]] = {
    "percentile": (
        "percentile: uint8 unchanged; other dtypes scaled per image from the {low}th to the "
        "{high}th percentile (all channels together) to 0-255; channels: gray->RGB, 2->RG0, "
        ">3->first three, RGBA->RGB",
        _percentile,
    ),
    "minmax": (
        "minmax: uint8 unchanged; other dtypes scaled per image from min to max to 0-255; "
        "channels: gray->RGB, 2->RG0, >3->first three, RGBA->RGB",
        _minmax,
    ),
    "dtype": (
        "dtype: integer images scaled from 0 to the dtype's maximum, floats from 0 to 1; "
        "channels: gray->RGB, 2->RG0, >3->first three, RGBA->RGB",
        _dtype_range,
    ),
}


def get_policy(name: str) -> IntensityPolicy:
    """Look a policy up by name; unknown names are a user error listing the choices."""
    if name not in _POLICIES:
        raise UsageError(f"unknown intensity policy {name!r}; choose one of {', '.join(_POLICIES)}")
    return IntensityPolicy(name)


def to_rgb(arr: np.ndarray, policy: IntensityPolicy) -> Image.Image:
    """Apply the intensity policy, then the channel rule, and return an RGB PIL image."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:  # grayscale: scale once, then replicate the 8-bit result (a third of the memory)
        scaled = policy(arr)
        return Image.fromarray(np.ascontiguousarray(np.repeat(scaled[..., None], 3, axis=-1)), mode="RGB")
    scaled = policy(_to_three_channels(arr))
    return Image.fromarray(np.ascontiguousarray(scaled), mode="RGB")


def load_rgb(data: bytes, policy: IntensityPolicy, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes to RGB image through the policy; raises ImageDecodeError for unreadable data or an
    image over `max_pixels` (checked from the header, before decoding).

    8-bit RGB and grayscale images (most JPEG/PNG files) take a fast path that skips the NumPy
    round trip; every policy leaves uint8 data unchanged, so the result is the same.
    """
    if data[:4] not in _TIFF_MAGIC:
        try:
            with _pil_open(data, max_pixels) as im:
                if im.mode in ("RGB", "L"):
                    im.load()
                    return im if im.mode == "RGB" else im.convert("RGB")
        except ImageDecodeError:
            raise
        except Exception as exc:  # unreadable: same error as the general path
            raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return to_rgb(decode_bytes(data, max_pixels), policy)
