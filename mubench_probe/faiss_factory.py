"""FAISS factory strings (`FACTORY[:PARAMS]`): parsed, given search defaults, refused up front.

A leaf module (it imports only `errors`; FAISS itself only when a factory is checked), so that
`config.EvalConfig` can refuse a bad `--knn-index` when it is created without importing the
heads or the index cache. Indexes are built in `heads.ann`.
"""

from __future__ import annotations

import re

from .errors import UsageError

EXACT = "Flat"
DEFAULT_PARAMS = {"HNSW": "efSearch=128"}  # FAISS' defaults (nprobe=1, efSearch=16) miss many neighbours
CHECK_DIMS = (768, 512, 1024, 384, 256, 1536, 2048, 1280, 640, 1152, 128, 64)  # common embedding widths
EXAMPLES = "e.g. Flat, IVF4096,Flat, HNSW32 or IVF4096,Flat:nprobe=64"


def faiss_message(exc: BaseException) -> str:
    """FAISS's own words, without the C++ signature and source line it prefixes them with."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", line)


def split_factory(spec: str) -> tuple[str, str]:
    """`FACTORY[:PARAMS]` -> (factory, params) as written, without defaults."""
    factory, _, params = spec.partition(":")
    return factory.strip(), params.strip()


def parse_factory(spec: str) -> tuple[str, str]:
    """`FACTORY[:PARAMS]` -> (factory, params), e.g. "IVF4096,Flat:nprobe=64" or "HNSW32:efSearch=256".

    Without PARAMS an IVF index of nlist lists searches nprobe = max(8, nlist / 32) of them (all of
    them up to 8; 32 of 1024; set once the index is built, see `heads.ann.build`) and HNSW uses
    efSearch=128."""
    factory, params = split_factory(spec)
    if not params:
        params = next((p for prefix, p in DEFAULT_PARAMS.items() if prefix in factory), "")
    return factory, params


def check_factory(spec: str, option: str = "--knn-index") -> None:
    """Refuse a `FACTORY[:PARAMS]` FAISS cannot build, before any work: a typo would otherwise
    surface only once every unit has loaded its data (and then as a skipped head).

    Cheap: it builds empty indexes. The gallery's width is not known yet, so a factory passes if
    FAISS builds it for any common embedding width (one that needs another width, e.g. PQ7, is
    refused later, per unit, by `heads.ann.build`)."""
    factory, params = parse_factory(spec)
    if factory == EXACT and not params:
        return
    import faiss

    index, why = None, ""
    for d in CHECK_DIMS:
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
            break
        except RuntimeError as exc:
            why = why or faiss_message(exc)
            if "could not parse" in why:  # syntax: no width helps
                break
    if index is None:
        raise UsageError(f"{option} {spec!r}: FAISS cannot build this index ({why}); {EXAMPLES}")
    if params:
        try:
            # faiss's stub declares the (index, str) variant after the (index, int) one without @overload
            faiss.ParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]
        except RuntimeError as exc:
            raise UsageError(
                f"{option} {spec!r}: FAISS cannot set {params!r} on {factory} ({faiss_message(exc)}); {EXAMPLES}"
            ) from None
