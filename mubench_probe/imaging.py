"""Turn any microscopy image (8/16-bit, float, grayscale, multi-channel, TIFF) into RGB uint8.

PIL silently clips or truncates 16-bit and multi-channel data when converting to RGB, which
can hide the signal of a fluorescence image entirely. Every conversion therefore goes through
an explicit, named intensity policy whose description is recorded in the store's provenance.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import ImageDecodeError, UsageError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def decode_bytes(data: bytes) -> np.ndarray:
    """Decode image bytes to an array (H, W) or (H, W, C) in its native dtype."""
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        if data[:4] in _TIFF_MAGIC:
            import tifffile

            arr = tifffile.imread(io.BytesIO(data))
        else:
            with Image.open(io.BytesIO(data)) as im:
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


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    arr = arr.astype(np.float64)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (arr - lo) / (hi - lo)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


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
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [p.low, p.high])
    return _scale(np.nan_to_num(arr, nan=lo), float(lo), float(hi))


def _minmax(p: IntensityPolicy, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    arr = np.nan_to_num(arr.astype(np.float64))
    return _scale(arr, float(arr.min()), float(arr.max()))


def _dtype_range(p: IntensityPolicy, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "ui":
        info = np.iinfo(arr.dtype)
        return _scale(arr, float(max(info.min, 0)), float(info.max))
    return _scale(np.nan_to_num(arr), 0.0, 1.0)


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

POLICY_NAMES = tuple(_POLICIES)


def get_policy(name: str) -> IntensityPolicy:
    """Look a policy up by name; unknown names are a user error listing the choices."""
    if name not in _POLICIES:
        raise UsageError(f"unknown intensity policy {name!r}; choose one of {', '.join(_POLICIES)}")
    return IntensityPolicy(name)


def to_rgb(arr: np.ndarray, policy: IntensityPolicy) -> Image.Image:
    """Apply the intensity policy, then the channel rule, and return an RGB PIL image."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    scaled = policy(_to_three_channels(arr))
    return Image.fromarray(np.ascontiguousarray(scaled), mode="RGB")


def load_rgb(data: bytes, policy: IntensityPolicy) -> Image.Image:
    """Bytes to RGB image through the policy; raises ImageDecodeError for unreadable data.

    8-bit RGB and grayscale images (most JPEG/PNG files) take a fast path that skips the NumPy
    round trip; every policy leaves uint8 data unchanged, so the result is the same.
    """
    if data[:4] not in _TIFF_MAGIC:
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.mode in ("RGB", "L"):
                    im.load()
                    return im if im.mode == "RGB" else im.convert("RGB")
        except Exception as exc:  # unreadable: same error as the general path
            raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return to_rgb(decode_bytes(data), policy)
