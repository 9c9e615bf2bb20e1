"""Image perturbations for robustness runs: plain NumPy functions on decoded images, and their registry.

A robustness measure asks how far an embedding moves when the image degrades the way real
microscopy images do (defocus, shot noise, exposure, stain batches, orientation, resolution,
a missing channel, compression). Every function here takes an (H, W) or (H, W, C) array in the
image's own dtype and range (uint8, uint16, float) and returns the same dtype, so it runs on
the decoded image *before* the intensity policy maps it to 8 bits: noise is added to raw
16-bit counts, not to a display rendering. At its identity severity (0 for most, see
`PERTURBATIONS`) a function returns its input unchanged, byte for byte.

Random perturbations (noise, stain) take a seed; `row_seed` derives it from the perturbation's
name and the row's image id with SHA-256 (never Python's salted `hash`), so a row is perturbed
the same way in every process, shard and rerun, and the severities of one sweep share one noise
draw (curves over severity are smooth, not re-sampled at each point).

The functions are usable outside the tool::

    from mubench_probe.perturb import blur, noise
    soft = blur(img, sigma=2.0)           # Gaussian defocus, sigma in pixels
    noisy = noise(img, snr=5.0, seed=0)   # Poisson-Gaussian noise, mean signal / noise std = 5
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UsageError

VERSION = 1  # bump when a function's output changes: stored runs record it in their provenance


# ---- helpers -----------------------------------------------------------------------------------
def intensity_range(image: np.ndarray) -> tuple[float, float]:
    """The range intensities are scaled in: 0-255 for 8-bit and boolean images (their full
    scale), the image's own finite min and max for anything else (a 16-bit image often uses a
    small part of its dtype's range)."""
    if image.dtype in (np.uint8, np.bool_):
        return 0.0, 255.0
    finite = image[np.isfinite(image)] if image.dtype.kind == "f" else image
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


def _as_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.bool_:
        return image.astype(np.float64) * 255.0
    return image.astype(np.float64)


def _restore(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Float results back to the input's dtype: integers rounded and clipped to the dtype's range."""
    if like.dtype == np.bool_:
        return out >= 127.5
    if like.dtype.kind in "ui":
        info = np.iinfo(like.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(like.dtype)
    return out.astype(like.dtype)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"perturbations take an (H, W) or (H, W, C) image, not shape {image.shape}")
    return image


def row_seed(name: str, image_id: object) -> int:
    """A 64-bit seed from a perturbation name and a row's image id, the same in every process."""
    return int.from_bytes(hashlib.sha256(f"{name}\0{image_id}".encode()).digest()[:8], "little")


# ---- the perturbations -------------------------------------------------------------------------
def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian defocus of standard deviation `sigma` pixels (per channel, edges extended).

    Reference: `skimage.filters.gaussian(image, sigma, mode="nearest", truncate=4.0,
    preserve_range=True, channel_axis=-1)`."""
    image = _check_image(image)
    if sigma == 0:
        return image
    from scipy.ndimage import gaussian_filter

    sig = (sigma, sigma, 0) if image.ndim == 3 else (sigma, sigma)
    return _restore(gaussian_filter(_as_float(image), sig, mode="nearest", truncate=4.0), image)


def noise(image: np.ndarray, snr: float, seed: int = 0, poisson_fraction: float = 0.5) -> np.ndarray:
    """Poisson-Gaussian noise at a signal-to-noise ratio `snr` = mean signal / noise std.

    The signal is the intensity above the image's own minimum (`intensity_range`; 0 for 8-bit
    images). At the mean signal S the noise variance S^2 / snr^2 is split: `poisson_fraction`
    of it is signal-dependent shot noise a * Poisson(x / a) (gain a), the rest Gaussian read
    noise. `snr = inf` is the identity."""
    image = _check_image(image)
    if math.isinf(snr):
        return image
    if not snr > 0:
        raise ValueError(f"noise needs an SNR > 0, not {snr}")
    lo, _ = intensity_range(image)
    x = _as_float(image)
    finite = np.isfinite(x)
    signal = np.where(finite, x - lo, 0.0).clip(0, None)
    s = float(signal[finite].mean()) if finite.any() else 0.0
    if s <= 0:
        return image
    var = (s / snr) ** 2
    rng = np.random.default_rng(seed)
    gain = poisson_fraction * var / s  # Var(a * Poisson(x / a)) = a * x = poisson_fraction * var at x = S
    shot = gain * rng.poisson(signal / gain) if poisson_fraction > 0 else signal
    read = rng.normal(0.0, math.sqrt((1 - poisson_fraction) * var), size=x.shape)
    out = np.where(finite, lo + shot + read, x)
    return _restore(out, image)


def gamma(image: np.ndarray, g: float) -> np.ndarray:
    """Gamma curve `lo + (hi - lo) * u ** g` on the intensities normalised to the image's range."""
    image = _check_image(image)
    if g == 1:
        return image
    if not g > 0:
        raise ValueError(f"gamma needs g > 0, not {g}")
    lo, hi = intensity_range(image)
    if hi <= lo:
        return image
    u = ((_as_float(image) - lo) / (hi - lo)).clip(0, 1)
    return _restore(lo + (hi - lo) * u**g, image)


def exposure(image: np.ndarray, stops: float) -> np.ndarray:
    """Exposure change by `stops` (EV): intensities above the range's low end times 2 ** stops,
    saturating at its high end (over-exposure clips, as a sensor does)."""
    image = _check_image(image)
    if stops == 0:
        return image
    lo, hi = intensity_range(image)
    out = (lo + (_as_float(image) - lo) * 2.0**stops).clip(lo, hi)
    return _restore(out, image)


def stain(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """HED stain jitter (Tellez et al. 2018) for brightfield H&E / DAB images: in the
    haematoxylin-eosin-DAB space of `skimage.color.rgb2hed`, each stain's density becomes
    `alpha * d + beta` with alpha ~ U(1 - sigma, 1 + sigma), beta ~ U(-sigma, sigma) * 0.05
    (one draw per image). Needs an (H, W, 3) RGB image."""
    image = _check_image(image)
    if sigma == 0:
        return image
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"stain jitter needs an RGB (H, W, 3) image, not shape {image.shape}")
    from skimage.color import hed2rgb, rgb2hed

    lo, hi = intensity_range(image)
    if hi <= lo:
        return image
    rng = np.random.default_rng(seed)
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=3)
    beta = rng.uniform(-sigma, sigma, size=3) * 0.05
    hed = rgb2hed(((_as_float(image) - lo) / (hi - lo)).clip(0, 1))
    rgb = hed2rgb(hed * alpha + beta).clip(0, 1)
    return _restore(lo + (hi - lo) * rgb, image)


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """Rotation by `angle` degrees counter-clockwise (as displayed, row 0 at the top).

    Multiples of 90 are exact (`np.rot90`; 90 and 270 swap height and width). Other angles keep
    the shape and interpolate linearly about the centre, filling with the nearest edge values
    (`scipy.ndimage.rotate(order=1, mode="nearest", reshape=False)`)."""
    image = _check_image(image)
    turns = angle / 90
    if turns == int(turns):
        return np.ascontiguousarray(np.rot90(image, int(turns) % 4))
    from scipy.ndimage import rotate as nd_rotate

    out = nd_rotate(_as_float(image), angle, axes=(1, 0), reshape=False, order=1, mode="nearest")
    return _restore(out, image)


def flip(image: np.ndarray, axis: int) -> np.ndarray:
    """Mirror: 1 left-right, 2 up-down, 3 both (= a 180 degree rotation), 0 none."""
    image = _check_image(image)
    if axis not in (0, 1, 2, 3):
        raise ValueError(f"flip takes 0 (none), 1 (left-right), 2 (up-down) or 3 (both), not {axis}")
    out = image
    if axis & 1:
        out = out[:, ::-1]
    if axis & 2:
        out = out[::-1]
    return np.ascontiguousarray(out) if axis else image


def scale(image: np.ndarray, factor: float) -> np.ndarray:
    """Resampling by `factor` (0.5 halves the resolution), linear interpolation, anti-aliased when
    shrinking: `skimage.transform.rescale(order=1, anti_aliasing=factor < 1, preserve_range=True)`.
    The model's own preprocessing then resizes to its input, so detail lost here stays lost."""
    image = _check_image(image)
    if factor == 1:
        return image
    if not factor > 0:
        raise ValueError(f"scale needs a factor > 0, not {factor}")
    from skimage.transform import rescale

    out = rescale(
        _as_float(image),
        factor,
        order=1,
        anti_aliasing=factor < 1,
        preserve_range=True,
        channel_axis=-1 if image.ndim == 3 else None,
    )
    return _restore(out, image)


def channel_drop(image: np.ndarray, channel: int) -> np.ndarray:
    """Channel `channel` (1-based; 0 = none) set to the low end of the image's range, as if its
    stain or fluorophore were missing. Needs an (H, W, C) image with at least that many channels."""
    image = _check_image(image)
    if channel == 0:
        return image
    if image.ndim != 3 or not 1 <= channel <= image.shape[-1]:
        n = image.shape[-1] if image.ndim == 3 else 1
        raise ValueError(f"cannot drop channel {channel} of an image with {n} channel(s)")
    lo, _ = intensity_range(image)
    out = image.copy()
    out[..., channel - 1] = lo
    return out


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG compression at `quality` (1-100, PIL's encoder with its default 4:2:0 chroma subsampling;
    0 = none). Images that are not 8-bit are mapped to 8 bits over their own range for the codec
    and back, so they also lose their finer intensity steps."""
    image = _check_image(image)
    if quality == 0:
        return image
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be 1-100 (0: none), not {quality}")
    from PIL import Image

    lo, hi = intensity_range(image)
    channels = image.shape[-1] if image.ndim == 3 else 1
    if image.dtype == np.uint8:
        u8 = image
    else:
        span = hi - lo if hi > lo else 1.0
        u8 = np.clip(np.rint((_as_float(image) - lo) / span * 255), 0, 255).astype(np.uint8)
    planes = [u8] if channels in (1, 3) else [u8[..., c] for c in range(channels)]
    coded = []
    for p in planes:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(p[..., 0] if p.ndim == 3 and p.shape[-1] == 1 else p)).save(
            buf, format="JPEG", quality=int(quality)
        )
        coded.append(np.asarray(Image.open(io.BytesIO(buf.getvalue()))))
    out8 = coded[0] if len(coded) == 1 else np.stack(coded, axis=-1)
    out8 = out8.reshape(image.shape)
    if image.dtype == np.uint8:
        return out8
    return _restore(lo + out8.astype(np.float64) / 255 * (hi - lo), image)


# ---- the registry ------------------------------------------------------------------------------
Apply = Callable[[np.ndarray, float, int, float | None], np.ndarray]  # (image, severity, seed, mpp)


@dataclass(frozen=True)
class PerturbationSpec:
    """One registered perturbation: the function behind it, the unit and meaning of its severity,
    the severity that leaves the image unchanged, and which severities are allowed."""

    name: str
    apply: Apply
    unit: str
    meaning: str
    identity: float = 0.0
    integer: bool = False
    minimum: float = -math.inf
    maximum: float = math.inf
    choices: tuple[float, ...] = ()


def _blur_mpp(image: np.ndarray, sigma: float, seed: int, mpp: float | None) -> np.ndarray:
    px = sigma / mpp if mpp is not None and np.isfinite(mpp) and mpp > 0 else sigma
    return blur(image, px)


def _resample_mpp(image: np.ndarray, target: float, seed: int, mpp: float | None) -> np.ndarray:
    """`scale` to a target pixel size: the factor is the row's µm/px over the target (0: unchanged)."""
    if target == 0:
        return image
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise ValueError("resample needs the image's pixel size (microns_per_pixel), unknown for this row")
    return scale(image, mpp / target)


PERTURBATIONS: dict[str, PerturbationSpec] = {
    p.name: p
    for p in (
        PerturbationSpec(
            "blur",
            _blur_mpp,
            "um",
            "Gaussian defocus sigma: µm where the pixel size is known, else pixels",
            0,
            False,
            0,
        ),
        PerturbationSpec(
            "noise",
            lambda im, s, seed, mpp: noise(im, s, seed),
            "snr",
            "signal-to-noise ratio (mean signal / noise std) of Poisson-Gaussian noise; inf = none",
            math.inf,
            minimum=1e-9,
        ),
        PerturbationSpec("gamma", lambda im, s, seed, mpp: gamma(im, s), "gamma", "gamma exponent", 1.0, minimum=1e-9),
        PerturbationSpec("exposure", lambda im, s, seed, mpp: exposure(im, s), "EV", "exposure change in stops"),
        PerturbationSpec(
            "stain", lambda im, s, seed, mpp: stain(im, s, seed), "sigma", "HED jitter strength", 0, False, 0, 1
        ),
        PerturbationSpec(
            "rotate", lambda im, s, seed, mpp: rotate(im, s), "deg", "rotation angle, counter-clockwise", 0
        ),
        PerturbationSpec(
            "flip",
            lambda im, s, seed, mpp: flip(im, int(s)),
            "axis",
            "1 left-right, 2 up-down, 3 both",
            0,
            True,
            choices=(0, 1, 2, 3),
        ),
        PerturbationSpec(
            "scale", lambda im, s, seed, mpp: scale(im, s), "factor", "resampling factor", 1.0, minimum=1e-3, maximum=16
        ),
        PerturbationSpec(
            "resample",
            _resample_mpp,
            "um/px",
            "target pixel size in µm (needs the row's microns_per_pixel; 0: unchanged)",
            0,
            minimum=0,
            maximum=1e3,
        ),
        PerturbationSpec(
            "channel-drop",
            lambda im, s, seed, mpp: channel_drop(im, int(s)),
            "channel",
            "1-based channel set to background",
            0,
            True,
            0,
        ),
        PerturbationSpec(
            "jpeg", lambda im, s, seed, mpp: jpeg(im, int(s)), "quality", "JPEG quality (0: none)", 0, True, 0, 100
        ),
    )
}


@dataclass(frozen=True)
class Perturbation:
    """One perturbation at one severity: what one perturbed run in the store is keyed by."""

    name: str
    severity: float

    @property
    def spec(self) -> PerturbationSpec:
        return PERTURBATIONS[self.name]

    @property
    def key(self) -> str:
        """The canonical key, e.g. `blur:1`, `noise:inf`, `scale:0.5` (what provenance and paths use)."""
        return f"{self.name}:{self.severity:g}"

    @property
    def is_identity(self) -> bool:
        return self.severity == self.spec.identity

    def seed(self, image_id: object) -> int:
        return row_seed(self.name, image_id)

    def __call__(self, image: np.ndarray, image_id: object = 0, mpp: float | None = None) -> np.ndarray:
        """Perturb one decoded image of the row `image_id` (its pixel size `mpp` in µm, if known)."""
        return self.spec.apply(image, self.severity, self.seed(image_id), mpp)

    def unit(self, mpp: np.ndarray | None = None) -> str:
        """The severity's unit for a dataset with these per-row pixel sizes (blur: µm or pixels)."""
        if self.name != "blur":
            return self.spec.unit
        known = np.isfinite(mpp) & (mpp > 0) if mpp is not None and len(mpp) else np.zeros(1, bool)
        return "um" if known.all() else "px" if not known.any() else "um (px where the pixel size is unknown)"

    def provenance(self, mpp: np.ndarray | None = None) -> dict[str, Any]:
        """The run's `perturbation` provenance entry (part of its identity)."""
        sev: Any = int(self.severity) if self.spec.integer else self.severity
        if isinstance(sev, float) and math.isinf(sev):
            sev = "inf"  # JSON has no infinity
        return {"name": self.name, "severity": sev, "key": self.key, "unit": self.unit(mpp), "version": VERSION}


class PerturbedPlanes:
    """A plane source (see `imaging.PlaneSource`) whose every plane is perturbed as it is read,
    before projection and the intensity policy: multi-dimensional images (channels, stacks, bioio
    files) take this path. Each plane gets its own seed (`IMAGE_ID/t,c,z`); `channel-drop:K`
    blanks the file's channel K (1-based) and leaves the others as they are."""

    def __init__(self, src: Any, perturbation: Perturbation, image_id: object, mpp: float | None) -> None:
        self.src, self.perturbation, self.image_id, self.mpp = src, perturbation, image_id, mpp

    def __getattr__(self, name: str) -> Any:  # shape, dtype, channel_names, select: the source's own
        return getattr(self.src, name)

    def plane(self, t: int, c: int, z: int) -> np.ndarray:
        p = self.src.plane(t, c, z)
        pert = self.perturbation
        if pert.name == "channel-drop":
            if int(pert.severity) != c + 1:
                return p
            return np.full_like(p, intensity_range(np.asarray(p))[0])
        return pert(np.asarray(p), f"{self.image_id}/{t},{c},{z}", self.mpp)


def _severity(name: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--perturb {spec!r}: severity {text!r} of {name} is not a number") from None
    p = PERTURBATIONS[name]
    if math.isnan(value) or (math.isinf(value) and value != p.identity):
        raise UsageError(f"--perturb {spec!r}: severity {text!r} of {name} is not a finite number")
    if p.integer and value != int(value):
        raise UsageError(f"--perturb {spec!r}: {name} takes whole numbers ({p.meaning}), not {text}")
    if p.choices and value not in p.choices:
        raise UsageError(f"--perturb {spec!r}: {name} takes {', '.join(f'{c:g}' for c in p.choices)} ({p.meaning})")
    if value != p.identity and not p.minimum <= value <= p.maximum:
        raise UsageError(f"--perturb {spec!r}: {name} severity must be in [{p.minimum:g}, {p.maximum:g}] ({p.meaning})")
    return value + 0.0  # -0.0 -> 0.0: one key per severity


def parse_perturb(spec: str) -> list[Perturbation]:
    """`NAME:SEVERITY[,SEVERITY...]` -> one Perturbation per severity, in the order given (duplicates dropped)."""
    name, sep, rest = str(spec).strip().partition(":")
    name = name.strip().lower()
    if name not in PERTURBATIONS:
        raise UsageError(f"--perturb {spec!r}: unknown perturbation {name!r}; choose one of {', '.join(PERTURBATIONS)}")
    parts = [s.strip() for s in rest.split(",")] if sep else []
    if not parts or any(not s for s in parts):
        p = PERTURBATIONS[name]
        raise UsageError(f"--perturb {spec!r}: give {name}:SEVERITY[,SEVERITY...] ({p.meaning}, in {p.unit})")
    out: list[Perturbation] = []
    for text in parts:
        pert = Perturbation(name, _severity(name, text, spec))
        if pert not in out:
            out.append(pert)
    return out


def parse_perturbations(specs: Any) -> list[Perturbation]:
    """Every perturbation of repeated `--perturb` specs (strings, or Perturbations as they are)."""
    out: list[Perturbation] = []
    for s in [specs] if isinstance(specs, str | Perturbation) else list(specs or ()):
        for p in [s] if isinstance(s, Perturbation) else parse_perturb(s):
            if p not in out:
                out.append(p)
    return out


def from_key(key: str) -> Perturbation:
    """The perturbation a canonical key (`blur:1`) names."""
    found = parse_perturb(key)
    if len(found) != 1:
        raise UsageError(f"{key!r} names {len(found)} perturbations, not one")
    return found[0]
