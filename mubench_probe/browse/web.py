"""Helpers every page module shares: JSON answers, strict query parameters, errors as status codes.

Handlers are plain functions (Starlette runs them in its thread pool); a ProbeError they raise
becomes a JSON `{"error": message}` with a status code (404 for what the store does not hold,
400 for a bad parameter), never a traceback.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import NotFoundError, ProbeError, UsageError

# status code per error class (first match in this order: subclasses before their bases)
STATUS: tuple[tuple[type[ProbeError], int], ...] = ((NotFoundError, 404), (UsageError, 400), (ProbeError, 500))


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: they become null (a missing CI, an empty stratum)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class Json(JSONResponse):
    """JSON with NaN as null; `<`, `>` and `&` escaped as \\u00XX so no value can ever read as markup."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(_finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=str)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("utf-8")


def error_response(exc: ProbeError) -> Response:
    status = next(code for cls, code in STATUS if isinstance(exc, cls))
    return Json({"error": str(exc)}, status_code=status)


def endpoint(fn: Callable[[Request], Any]) -> Callable[[Request], Response]:
    """A handler returning data (or a Response); ProbeErrors become JSON errors with status codes."""

    @functools.wraps(fn)
    def wrapper(request: Request) -> Response:
        try:
            out = fn(request)
        except ProbeError as exc:
            return error_response(exc)
        return out if isinstance(out, Response) else Json(out)

    return wrapper


def int_param(request: Request, name: str, default: int | None = None, lo: int = 0, hi: int = 1 << 31) -> int:
    """An integer query or path parameter in [lo, hi]; UsageError (400) otherwise."""
    raw = request.path_params.get(name, request.query_params.get(name))
    if raw is None or raw == "":
        if default is None:
            raise UsageError(f"missing parameter {name}")
        return default
    text = str(raw)
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise UsageError(f"{name} must be a whole number, not {text[:40]!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise UsageError(f"{name} must be in {lo}..{hi}")
    return value


def str_param(request: Request, name: str, default: str | None = None) -> str:
    """A text query parameter (looked up, never used as a path); UsageError (400) when missing."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UsageError(f"missing parameter {name}")
        return default
    return raw
