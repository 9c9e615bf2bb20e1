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
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .config import DEFAULT_MAX_PIXELS, parse_projection
from .errors import ImageDecodeError, UsageError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
BYTES_PER_PIXEL = 8  # decoded-size budget per allowed pixel: e.g. 4 channels of uint16, or 2 of float32


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9A-Fa-f]+>")


def stable_message(exc: BaseException | str) -> str:
    """An error's text without object reprs: PIL says `cannot identify image file <_io.BytesIO
    object at 0x7f...>`, an address that differs in every process, and failure reasons are
    stored, so two runs of one command must write the same bytes."""
    return _OBJECT_REPR.sub("", str(exc))


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
                f"image has shape {shape} (axes {axes}): a stack; choose a projection with --z / --t "
                "(max, mean, middle, index:K)"
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
        raise ImageDecodeError(f"cannot decode image: {stable_message(exc)}") from exc
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
        f"image has shape {arr.shape} and no axis names in its metadata; use an OME-TIFF or ImageJ "
        "hyperstack (then --z / --t choose a projection), or read it with --dataset bioio:PATH"
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
    if not data:
        raise ImageDecodeError("empty image data")
    if data[:4] not in _TIFF_MAGIC:
        try:
            with _pil_open(data, max_pixels) as im:
                if im.mode in ("RGB", "L"):
                    im.load()
                    return im if im.mode == "RGB" else im.convert("RGB")
        except ImageDecodeError:
            raise
        except Exception as exc:  # unreadable: same error as the general path
            raise ImageDecodeError(f"cannot decode image: {stable_message(exc)}") from exc
    return to_rgb(decode_bytes(data, max_pixels), policy)


# ---- multi-dimensional images: channels, z-stacks, time, physical pixel size -------------------
#
# A row's pixels are a `PlaneSource`: a 5-D (T, C, Z, Y, X) image whose planes are asked for one
# at a time (bioio reads a large scene in bounded blocks). `render` selects and projects planes, applies the
# intensity policy to each channel, resamples to a physical pixel size and maps the channels to
# one RGB image (rgb, composite) or one grayscale RGB image per channel (each).

# Fiji's default composite colours, in order (R, G, B weights); channel i takes colour i mod 7.
COMPOSITE_COLOURS = (
    ("red", (1, 0, 0)),
    ("green", (0, 1, 0)),
    ("blue", (0, 0, 1)),
    ("gray", (1, 1, 1)),
    ("cyan", (0, 1, 1)),
    ("magenta", (1, 0, 1)),
    ("yellow", (1, 1, 0)),
)


class PlaneSource(Protocol):
    """A (T, C, Z, Y, X) image read plane by plane; `shape` and `dtype` come from metadata."""

    shape: tuple[int, int, int, int, int]
    dtype: np.dtype
    channel_names: tuple[str, ...]

    def plane(self, t: int, c: int, z: int) -> np.ndarray: ...


@dataclass
class ArraySource:
    """An image already in memory (PIL formats, plain TIFF), viewed as (T, C, Z, Y, X)."""

    data: np.ndarray
    channel_names: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        t, c, z, y, x = self.data.shape  # 5-D by construction (_from_2d_or_channels_last)
        return t, c, z, y, x

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def plane(self, t: int, c: int, z: int) -> np.ndarray:
        return self.data[t, c, z]


_KNOWN_AXES = set("TCZYX")


def _tczyx(arr: np.ndarray, axes: str) -> np.ndarray | None:
    """View an array with named axes as (T, C, Z, Y, X); None if the axes are not all known."""
    axes = axes.replace("S", "C") if "S" in axes and "C" not in axes else axes
    keep = [i for i, a in enumerate(axes) if a in _KNOWN_AXES or arr.shape[i] != 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if not set(axes) <= _KNOWN_AXES or len(set(axes)) != len(axes) or not {"Y", "X"} <= set(axes):
        return None
    missing = [a for a in "TCZYX" if a not in axes]
    arr = arr.reshape(arr.shape + (1,) * len(missing))
    order = axes + "".join(missing)
    return np.transpose(arr, [order.index(a) for a in "TCZYX"])


def _from_2d_or_channels_last(arr: np.ndarray) -> np.ndarray:
    arr = _channels_last(arr)  # the single-image rule: 2-D, or a small channel axis
    if arr.ndim == 2:
        return arr[None, None, None]
    return np.moveaxis(arr, -1, 0)[None, :, None]


def decode_source(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ArraySource:
    """Bytes to a (T, C, Z, Y, X) source. TIFF axes come from the file's metadata (ImageJ
    hyperstack, OME, shaped); files without them follow the single-image rule."""
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        if data[:4] in _TIFF_MAGIC:
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                shape, axes = tuple(series.shape), series.axes
                spatial = [shape[axes.index(a)] for a in "YX" if a in axes] or sorted(shape, reverse=True)[:2]
                if len(spatial) < 2:
                    spatial = [*spatial, 1]
                check_size(spatial[0], spatial[1], math.prod(shape) * series.dtype.itemsize, max_pixels)
                arr = series.asarray()
            view = _tczyx(arr, axes)
            return ArraySource(view if view is not None else _from_2d_or_channels_last(arr))
        with _pil_open(data, max_pixels) as im:
            im.load()
            arr = _pil_to_array(im)
    except ImageDecodeError:
        raise
    except Exception as exc:  # any decoder failure means one unreadable image, not a crash
        raise ImageDecodeError(f"cannot decode image: {stable_message(exc)}") from exc
    return ArraySource(_from_2d_or_channels_last(np.asarray(arr)))


def _reduce(
    rule: tuple[str, int] | None, n: int, get: Callable[[int], np.ndarray], what: str, dtype: np.dtype
) -> np.ndarray:
    """Project n planes with a rule; max keeps the dtype, mean sums in float32 (integer images are
    rounded back to their type, so the intensity policy sees the same kind of data)."""
    if n == 1:
        return get(0)
    if rule is None:
        option = "--z" if what == "z" else "--t"
        raise ImageDecodeError(
            f"image has {n} {what}-planes; choose a projection with {option} max|mean|middle|index:K"
        )
    kind, k = rule
    if kind == "index":
        if k >= n:
            raise ImageDecodeError(f"{what} index {k} is out of range: the image has {n} {what}-planes")
        return get(k)
    if kind == "middle":
        return get(n // 2)
    acc = np.array(get(0), dtype=dtype if kind == "max" else np.float32, copy=True)
    for i in range(1, n):
        if kind == "max":
            np.maximum(acc, get(i), out=acc)
        else:
            acc += get(i)
    if kind == "max":
        return acc
    acc /= np.float32(n)
    if np.dtype(dtype).kind in "biu":
        return np.rint(acc).astype(dtype)
    return acc


def project(
    src: PlaneSource, chans: list[int], t_rule: tuple[str, int] | None, z_rule: tuple[str, int] | None
) -> np.ndarray:
    """The selected channels as (K, Y, X): z projected within each time point, then t across them.

    Planes are asked for time point by time point, z by z, all channels of a z together, so a
    source that reads blocks (bioio) reads each plane once."""
    n_t, _, n_z = src.shape[:3]
    dtype = src.dtype

    def at_time(t: int) -> np.ndarray:
        return _reduce(z_rule, n_z, lambda z: np.stack([src.plane(t, c, z) for c in chans]), "z", dtype)

    return _reduce(t_rule, n_t, at_time, "t", dtype)


def resolve_channels(tokens: tuple[str, ...] | None, names: tuple[str, ...], n: int) -> list[int]:
    """Channel tokens (digits: index; else a name from the metadata) -> indices; all if None."""
    if tokens is None:
        return list(range(min(n, 3)))  # the single-image rule keeps the first three
    out = []
    for tok in tokens:
        if tok.isdigit():
            if int(tok) >= n:
                raise ImageDecodeError(f"channel {tok} does not exist: the image has {n} channel(s)")
            out.append(int(tok))
            continue
        exact = [i for i, name in enumerate(names) if name == tok]
        loose = [i for i, name in enumerate(names) if name.lower() == tok.lower()]
        found = exact or loose
        if not found:
            have = ", ".join(names) if names else "none in the metadata: use indices"
            raise ImageDecodeError(f"no channel named {tok!r} (channel names: {have})")
        out.append(found[0])
    return out


@dataclass(frozen=True)
class PixelSpec:
    """How a row's planes become model inputs (from ExtractConfig); `describe()` is provenance."""

    policy: IntensityPolicy
    channels: tuple[str, ...] | None = None
    channel_mode: str = "rgb"
    z: str | None = None
    t: str | None = None
    target_mpp: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_config(cls, cfg: Any) -> PixelSpec:
        return cls(
            get_policy(cfg.intensity), cfg.channels, cfg.channel_mode, cfg.z, cfg.t, cfg.target_mpp, cfg.max_pixels
        )

    @property
    def is_default(self) -> bool:
        """Single 2-D images, first three channels: the original fast path (byte-identical stores)."""
        return (self.channels, self.channel_mode, self.z, self.t, self.target_mpp) == (None, "rgb", None, None, None)

    @property
    def n_images(self) -> int:
        """Model inputs per row: one per channel with `each`, else one."""
        return len(self.channels or ()) if self.channel_mode == "each" else 1

    def provenance(self) -> dict[str, Any] | None:
        """None for the defaults (so stores made before these options existed still match)."""
        if self.is_default:
            return None
        return {
            "channels": list(self.channels) if self.channels else None,
            "channel_mode": self.channel_mode,
            "z": self.z,
            "t": self.t,
            "target_mpp": self.target_mpp,
            "rule": self.describe(),
        }

    def describe(self) -> str:
        parts = []
        if self.channels is None:
            parts.append("channels: the single-image rule, scaled together (gray->RGB, 2->RG0, >3->first three)")
        else:
            parts.append(f"channels {','.join(self.channels)} (digits: index; else the metadata's channel name)")
            parts.append("the intensity policy applies to each channel on its own")
            if self.channel_mode == "rgb":
                parts.append("rgb: channels to R, G, B in order (one: gray, two: R, G and an empty B)")
            elif self.channel_mode == "each":
                parts.append(
                    "each: every channel embedded as its own grayscale image; the row embedding is the mean "
                    "of the L2-normalised channel embeddings"
                )
            else:
                colours = ", ".join(name for name, _ in COMPOSITE_COLOURS)
                parts.append(f"composite: channel i coloured {colours} (i mod 7), summed and clipped at 255")
        for axis, rule in (("z", self.z), ("t", self.t)):
            parts.append(
                f"{axis}: {rule} (mean rounded to the image's integer type; middle = plane n // 2)"
                if rule
                else f"{axis}: a single plane required"
            )
        if self.target_mpp is not None:
            parts.append(
                f"resampled to {self.target_mpp:g} um/px (box filter down, bilinear up, after the intensity policy), "
                "then centre-cropped or zero-padded to the model's input size so its resize keeps that scale; "
                "rows without a pixel size are not resampled"
            )
        return "; ".join(parts)


def resample(plane: np.ndarray, factor: float) -> np.ndarray:
    """Scale a uint8 plane by `factor` (new = round(old * factor)): box filter (area average)
    when shrinking, bilinear when enlarging."""
    h, w = plane.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return plane
    method = Image.Resampling.BOX if factor < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize(size, method))


def fit(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop or zero-pad to (height, width): the model's resize then leaves the scale alone."""
    h, w = plane.shape
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    plane = plane[top : top + height, left : left + width]
    if plane.shape == (height, width):
        return plane
    out = np.zeros((height, width), dtype=plane.dtype)
    h, w = plane.shape
    oy, ox = (height - h) // 2, (width - w) // 2
    out[oy : oy + h, ox : ox + w] = plane
    return out


def _merge(planes: list[np.ndarray], mode: str) -> np.ndarray:
    """uint8 planes -> one (H, W, 3) uint8 image (rgb or composite)."""
    if mode == "composite" and len(planes) > 1:
        acc = np.zeros((*planes[0].shape, 3), dtype=np.uint16)
        for i, p in enumerate(planes):
            for j, weight in enumerate(COMPOSITE_COLOURS[i % len(COMPOSITE_COLOURS)][1]):
                if weight:
                    acc[..., j] += p
        return np.minimum(acc, 255).astype(np.uint8)
    if len(planes) == 1:
        return np.repeat(planes[0][..., None], 3, axis=-1)
    zeros = [np.zeros_like(planes[0])] * (3 - len(planes))
    return np.stack([*planes[:3], *zeros], axis=-1)


def render(
    src: PlaneSource, spec: PixelSpec, mpp: float | None = None, size: tuple[int, int] | None = None
) -> list[Image.Image]:
    """A row's model input image(s): select channels, project z/t, scale intensities, resample to
    `spec.target_mpp` (when the row's `mpp` is known) and fit to `size` (H, W), map to RGB.

    The declared size is checked against `max_pixels` before any plane is read."""
    n_c, (height, width) = src.shape[1], src.shape[3:]
    chans = resolve_channels(spec.channels, tuple(src.channel_names), n_c)
    itemsize = max(np.dtype(src.dtype).itemsize, 4 if "mean" in (spec.z, spec.t) else 1)
    check_size(height, width, height * width * max(len(chans), 1) * itemsize, spec.max_pixels)
    t_rule, z_rule = parse_projection(spec.t, "--t"), parse_projection(spec.z, "--z")
    if hasattr(src, "select"):  # sources that read several planes at once (bioio) read these together
        src.select(chans)
    planes = list(project(src, chans, t_rule, z_rule))
    if spec.channels is None:  # the single-image rule: channels scaled together
        arr = planes[0] if len(planes) == 1 else np.stack(planes, axis=-1)
        rgb = np.asarray(to_rgb(arr, spec.policy))
        scaled, mode = [rgb[..., i] for i in range(3)], "rgb"
    else:
        scaled, mode = (
            [spec.policy(p if p.dtype != bool else p.astype(np.uint8) * 255) for p in planes],
            spec.channel_mode,
        )
    if spec.target_mpp is not None and mpp is not None and np.isfinite(mpp) and mpp > 0:
        factor = float(mpp) / spec.target_mpp
        out_h, out_w = max(1, round(height * factor)), max(1, round(width * factor))
        check_size(out_h, out_w, out_h * out_w * len(scaled), spec.max_pixels)
        scaled = [resample(p, factor) for p in scaled]
    if spec.target_mpp is not None and size is not None:
        scaled = [fit(p, *size) for p in scaled]
    if mode == "each":
        return [Image.fromarray(np.ascontiguousarray(_merge([p], "rgb")), mode="RGB") for p in scaled]
    return [Image.fromarray(np.ascontiguousarray(_merge(scaled, mode)), mode="RGB")]
