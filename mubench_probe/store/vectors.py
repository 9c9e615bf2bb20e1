"""Vector maths and the canonical JSON digest: no Zarr, no store state."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-normalise in float32; zero rows (failed images) stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def normalize_rows(x: np.ndarray) -> None:
    """`l2_normalize` in place, for float32 x (the same values, without a second array)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    ok = n > 0
    np.divide(x, n, out=x, where=ok)
    x[~ok[:, 0]] = 0.0


def digest(obj: Any) -> str:
    """sha256 of canonical JSON: equal content gives an equal digest after any JSON round trip."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
