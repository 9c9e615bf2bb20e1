"""The arrays behind the Map page, free of any web code: 2-D projections, their cache, colour codes
with a legend, and box/lasso selections. Everything takes and returns arrays, so the server's
answers can be checked against plain numpy/scikit-learn references.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UsageError

MAP_VERSION = 1  # part of every cache key: a change of how maps are computed invalidates old files
BLOCK_ROWS = 16_384  # PCA reads embeddings this many rows at a time (bounded float64 temporaries)
TOP_CLASSES = 20  # colours past this many classes stop being told apart: the rest is "other"
# Kelly's colours of maximum contrast (white and black left out: the page's background and text)
PALETTE = (
    "#f3c300", "#875692", "#f38400", "#a1caf1", "#be0032", "#c2b280", "#848482", "#008856", "#e68fac", "#0067a5",
    "#f99379", "#604e97", "#f6a600", "#b3446c", "#dcd300", "#882d17", "#8db600", "#654522", "#e25822", "#2b3d26",
)  # fmt: skip
OTHER_COLOUR, MISSING_COLOUR = "#b0b0b0", "#e0e0e0"
MISSING = "(missing)"


# ---- projections ---------------------------------------------------------------------------
def pca_2d(x: np.ndarray) -> np.ndarray:
    """Exact PCA to two axes, (n, 2) float32: the covariance is accumulated in float64 blocks (so a
    million rows never need a float64 copy) and each axis is signed so that its largest-magnitude
    loading is positive (scikit-learn's convention): the same map on every machine and rerun."""
    n, d = x.shape
    out = np.zeros((n, 2), dtype=np.float32)
    if n == 0:
        return out
    mean = np.zeros(d)
    for s in range(0, n, BLOCK_ROWS):
        mean += x[s : s + BLOCK_ROWS].sum(axis=0, dtype=np.float64)
    mean /= n
    cov = np.zeros((d, d))
    for s in range(0, n, BLOCK_ROWS):
        b = x[s : s + BLOCK_ROWS] - mean
        cov += b.T @ b
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues: the last columns are the principal axes
    axes = vecs[:, ::-1][:, : min(2, d)]
    pick = np.argmax(np.abs(axes), axis=0)
    axes = axes * np.sign(axes[pick, np.arange(axes.shape[1])])
    for s in range(0, n, BLOCK_ROWS):
        out[s : s + BLOCK_ROWS, : axes.shape[1]] = (x[s : s + BLOCK_ROWS] - mean) @ axes
    return out


def umap_2d(x: np.ndarray) -> np.ndarray:
    """UMAP to two axes with a fixed seed (umap-learn, the `.[umap]` extra)."""
    import umap

    if len(x) < 3:
        return pca_2d(x)
    reducer = umap.UMAP(n_components=2, random_state=0, n_neighbors=min(15, len(x) - 1))
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)


METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"pca": pca_2d, "umap": umap_2d}
NEEDS: dict[str, str] = {"umap": "umap"}  # method -> module it needs (installed by an extra)


def available_methods() -> list[str]:
    """The projections this installation can compute (PCA always; UMAP with `.[umap]`)."""
    return [m for m in METHODS if m not in NEEDS or importlib.util.find_spec(NEEDS[m]) is not None]


def check_method(method: str) -> None:
    """A usage error (400) for a method that is unknown or needs an extra that is not installed."""
    if method not in available_methods():
        have = ", ".join(available_methods())
        hint = " (pip install 'mubench-probe[umap]')" if method in NEEDS else ""
        raise UsageError(f"unknown or unavailable map method {method!r}{hint}; have: {have}")


def project(x: np.ndarray, valid: np.ndarray, method: str) -> np.ndarray:
    """The (n, 2) map of the valid rows; rows without an embedding get NaN (drawn nowhere)."""
    check_method(method)
    out = np.full((len(x), 2), np.nan, dtype=np.float32)
    rows = np.flatnonzero(valid)
    if len(rows):
        out[rows] = METHODS[method](x[rows] if len(rows) < len(x) else x)
    return out


# ---- cache ---------------------------------------------------------------------------------
def cache_key(identity: dict[str, Any], method: str) -> str:
    """A short hash of what the map depends on: the run's identity, the method and MAP_VERSION."""
    doc = json.dumps({"identity": identity, "method": method, "version": MAP_VERSION}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:20]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


class MapCache:
    """Maps saved as `<cache_dir>/maps/<run>--<method>--<key>.npy`, written atomically (a killed
    server leaves no half file), computed once per key even when requests race (a lock per key).
    A folder that cannot be written costs a recomputation after a restart, never an error."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = Path(cache_dir) / "maps"
        self.notes: list[str] = []
        self._memory: dict[str, np.ndarray] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, run_id: str, method: str, key: str) -> Path:
        return self.root / f"{_safe(run_id)}--{_safe(method)}--{key}.npy"

    def get(self, run_id: str, method: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached map for `key`, else `compute()` saved under it (older keys of the run removed)."""
        name = f"{run_id}\0{method}\0{key}"
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name in self._memory:
                return self._memory[name]
            path = self.path(run_id, method, key)
            coords = self._load(path)
            if coords is None:
                coords = np.ascontiguousarray(compute(), dtype=np.float32)
                self._save(path, coords)
            self._memory[name] = coords
            return coords

    def _load(self, path: Path) -> np.ndarray | None:
        try:
            coords = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.notes.append(f"cached map {path} is unreadable ({type(exc).__name__}): computed again")
            return None
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype != np.float32:
            self.notes.append(f"cached map {path} has shape {coords.shape}: computed again")
            return None
        return coords

    def _save(self, path: Path, coords: np.ndarray) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, coords, allow_pickle=False)
            os.replace(tmp, path)
            stem = path.name.rsplit("--", 1)[0] + "--"
            for old in self.root.glob(f"{stem}*.npy"):
                if old.name != path.name and old.name.startswith(stem):
                    old.unlink(missing_ok=True)
        except OSError as exc:
            self.notes.append(f"could not save the map in {self.root} ({type(exc).__name__}): kept in memory only")
        finally:
            tmp.unlink(missing_ok=True)


def points_bytes(coords: np.ndarray) -> bytes:
    """The points as the page reads them: float32 little-endian, x0 y0 x1 y1 ... (NaN: no point)."""
    return np.ascontiguousarray(coords, dtype="<f4").tobytes()


# ---- colours -------------------------------------------------------------------------------
def _label(v: Any) -> str:
    return MISSING if v is None or (isinstance(v, float) and v != v) else str(v)


def _bins(values: pd.Series, n_bins: int) -> pd.Series:
    """Numeric values with too many distinct values for a palette: equal-count bins, labelled by range."""
    num = pd.to_numeric(values, errors="coerce").astype(float)
    edges = np.unique(np.nanquantile(num.to_numpy(), np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, num.to_numpy(), side="right") - 1, 0, len(edges) - 2)
    names = [f"{edges[i]:.4g} to {edges[i + 1]:.4g}" for i in range(len(edges) - 1)]
    labels = np.array(names, dtype=object)[idx]
    labels[np.isnan(num.to_numpy())] = None
    return pd.Series(labels.tolist(), index=values.index)


def colour_codes(values: pd.Series, top: int = TOP_CLASSES) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(codes uint16 per row, legend): the `top` most frequent values (ties by name) get their own
    colour, the rest share "other", missing values their own grey. Numeric columns with more
    distinct values than colours are binned by quantile (bins keep their order, not frequency)."""
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    binned = numeric and values.nunique(dropna=True) > top
    raw, uniques = pd.factorize(_bins(values, min(top, 10)) if binned else values, use_na_sentinel=True)
    merged: dict[str, int] = {}  # distinct values by their label (hashing, not sorting: fast at 10^6 rows)
    which = np.array([merged.setdefault(_label(u), len(merged)) for u in uniques], dtype=np.int64)
    names = list(merged)
    counts = np.bincount(which[raw[raw >= 0]], minlength=len(names))
    present = [(nm, int(c)) for nm, c in zip(names, counts, strict=True) if nm != MISSING]
    if binned:
        present.sort(key=lambda t: float(t[0].split(" to ")[0]))
    else:
        present.sort(key=lambda t: (-t[1], t[0]))
    kept = present[:top]
    legend = [
        {"code": i, "label": nm, "count": c, "colour": PALETTE[i % len(PALETTE)]} for i, (nm, c) in enumerate(kept)
    ]
    other, missing = len(kept), len(kept) + 1
    lookup = np.full(len(names) + 1, other, dtype=np.uint16)  # the last entry: rows without a value
    for i, (nm, _) in enumerate(kept):
        lookup[merged[nm]] = i
    if MISSING in merged:
        lookup[merged[MISSING]] = missing
    lookup[-1] = missing
    codes = lookup[np.where(raw >= 0, which[np.maximum(raw, 0)] if len(which) else 0, len(names))]
    rest = present[top:]
    if rest:
        n_rest = sum(c for _, c in rest)
        legend.append({"code": other, "label": f"other ({len(rest)} values)", "count": n_rest, "colour": OTHER_COLOUR})
    n_missing = int((codes == missing).sum())
    if n_missing:
        legend.append({"code": missing, "label": MISSING, "count": n_missing, "colour": MISSING_COLOUR})
    return codes, legend


def correctness(preds: pd.DataFrame, n_rows: int) -> pd.Series:
    """Per row of the run: "correct", "wrong", "mixed" (repeats disagree) or None (never predicted)."""
    out = pd.Series([None] * n_rows, dtype=object)
    if len(preds) == 0:
        return out
    ok = (preds["y_true"].astype(str) == preds["y_pred"].astype(str)).to_numpy()
    rows = preds["row"].to_numpy(dtype=np.int64)
    inside = (rows >= 0) & (rows < n_rows)
    rows, ok = rows[inside], ok[inside]
    n_ok = np.bincount(rows, weights=ok, minlength=n_rows)
    n_all = np.bincount(rows, minlength=n_rows)
    lab = np.where(n_ok == n_all, "correct", np.where(n_ok == 0, "wrong", "mixed")).astype(object)
    lab[n_all == 0] = None
    return pd.Series(lab, dtype=object)


# ---- selection -----------------------------------------------------------------------------
def parse_floats(text: str, what: str) -> np.ndarray:
    """Comma-separated finite numbers from a query parameter; anything else is a usage error."""
    try:
        vals = np.array([float(t) for t in text.split(",")], dtype=np.float64)
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers") from None
    if not np.isfinite(vals).all():
        raise UsageError(f"{what} must be finite numbers")
    return vals


def select_box(coords: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Rows (ascending) whose point lies in the box x0,y0,x1,y1 (either corner order, edges included)."""
    if len(box) != 4:
        raise UsageError("box must be x0,y0,x1,y1")
    x0, x1 = sorted(box[[0, 2]])
    y0, y1 = sorted(box[[1, 3]])
    x, y = coords[:, 0], coords[:, 1]
    with np.errstate(invalid="ignore"):
        return np.flatnonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))


MAX_LASSO_VERTICES = 2000


def select_lasso(coords: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Rows (ascending) whose point lies inside the polygon x0,y0,x1,y1,... (even-odd rule, the
    one canvas and matplotlib use), tested only against points inside the polygon's bounding box."""
    if len(polygon) % 2 or not 3 <= len(polygon) // 2 <= MAX_LASSO_VERTICES:
        raise UsageError(f"lasso must be 3 to {MAX_LASSO_VERTICES} points x,y,x,y,...")
    px, py = polygon[0::2], polygon[1::2]
    cand = select_box(coords, np.array([px.min(), py.min(), px.max(), py.max()]))
    x, y = coords[cand, 0].astype(np.float64), coords[cand, 1].astype(np.float64)
    inside = np.zeros(len(cand), dtype=bool)
    for i in range(len(px)):
        xa, ya, xb, yb = px[i - 1], py[i - 1], px[i], py[i]
        crosses = (ya > y) != (yb > y)
        if not crosses.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = xa + (y - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (x < xi)
    return cand[inside]
