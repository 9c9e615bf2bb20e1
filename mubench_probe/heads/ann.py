"""FAISS indexes over a gallery (array or RowView), and their recall against exact search.

The one place an index is built, trained and filled: the kNN head (`KNNHead(index=...)`) and
the search indexes saved beside the store (`mubench_probe.index`) both call `build`. Factory
strings are parsed and checked in `mubench_probe.faiss_factory` (a leaf the config can import).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import UsageError
from ..faiss_factory import faiss_message, parse_factory, split_factory
from .scoring import RowView, top_k

TRAIN_PER_LIST = 64  # training vectors per IVF list (FAISS wants 30-256)
GATHER_RESERVE = 1 << 16  # galleries smaller than this are added in one block: nothing to reserve
_GPU: list = []

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def build(
    gallery: np.ndarray | RowView,
    spec: str,
    *,
    seed: int = 0,
    device: str | None = None,
    train_per_list: int | None = TRAIN_PER_LIST,
    defaults: bool = True,
) -> Any:
    """An inner-product index over `gallery` (`FACTORY[:PARAMS]`), trained and added block by block.

    IVF indexes are trained on a seeded sample of `train_per_list` vectors per list (None: on
    every row, as for the saved search indexes). `PARAMS` are set for the search; without them,
    `defaults` sets ours (see `faiss_factory.parse_factory`), otherwise FAISS's own stay. With
    `device` cuda and a GPU build of FAISS (faiss-gpu) the index moves to the GPU; otherwise it
    stays on the CPU. A factory FAISS cannot build, or too few vectors to train, is a UsageError.
    """
    import faiss

    view = gallery if isinstance(gallery, RowView) else RowView(np.asarray(gallery, dtype=np.float32))
    factory, params = parse_factory(spec) if defaults else split_factory(spec)
    try:
        index = faiss.index_factory(view.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UsageError(f"FAISS cannot build index {factory!r}: {faiss_message(exc)}") from None
    if not index.is_trained:
        nlist = _nlist(index)
        if len(view) < nlist:
            raise UsageError(f"index {factory!r} needs at least {nlist} vectors to train; have {len(view)}")
        index.train(_training_rows(view, nlist, seed, train_per_list))
    _reserve_lists(index, view)
    for _, block in view.blocks():
        index.add(block)
    if defaults and not params and "IVF" in factory:
        params = f"nprobe={min(_nlist(index), max(8, _nlist(index) // 32))}"
    if params:
        try:
            # faiss's stub declares the (index, str) variant after the (index, int) one without @overload,
            # so mypy sees only the int one; faiss takes the parameter string (the tests set nprobe this way)
            faiss.ParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]
        except RuntimeError as exc:
            raise UsageError(f"FAISS index {factory!r}: cannot set {params!r} ({faiss_message(exc)})") from None
    if device and str(device).startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
        dev = int(str(device).partition(":")[2] or 0)
        _GPU.append(faiss.StandardGpuResources())  # must outlive the index
        index = faiss.index_cpu_to_gpu(_GPU[-1], dev, index)
    return index


def _training_rows(view: RowView, nlist: int, seed: int, per_list: int | None) -> np.ndarray:
    """Every row (`per_list` None), or a seeded sample of `per_list` rows per list (at least 1,000), in row order."""
    n = len(view) if per_list is None else min(len(view), max(per_list * nlist, 1000))
    if n == len(view):
        rows = view.x if view.rows is None else view[np.arange(len(view))]
    else:
        rows = view[np.sort(np.random.default_rng(seed).choice(len(view), size=n, replace=False))]
    return np.ascontiguousarray(rows, dtype=np.float32)


def recall(
    search: SearchFn,
    gallery: np.ndarray | RowView,
    queries: np.ndarray,
    k: int = 10,
    gallery_grid: float | None = None,
) -> float:
    """Mean fraction of the exact top-k (exact scores, `scoring.top_k`) that `search` finds: the
    usual ANN recall@k. `search(queries, k)` -> (scores, ids), e.g. a FAISS index's `search`."""
    k = min(k, len(gallery))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    truth = top_k(gallery, q, k, gallery_grid=gallery_grid)[1]
    found = search(q, k)[1]
    return float(np.mean([len(np.intersect1d(t, f)) / k for t, f in zip(truth, found, strict=True)]))


def _reserve_lists(index: Any, view: RowView) -> None:
    """Give each IVF list its final capacity before adding: lists grown block by block double
    their buffers (std::vector), up to twice the index's size, which at 10^6 rows is gigabytes."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
        lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf.invlists is not None else None
    except RuntimeError:
        return
    if not isinstance(lists, faiss.ArrayInvertedLists) or len(view) <= GATHER_RESERVE:
        return
    counts = np.zeros(ivf.nlist, dtype=np.int64)
    for _, block in view.blocks():
        _, assign = ivf.quantizer.search(block, 1)
        counts += np.bincount(assign[:, 0], minlength=ivf.nlist)
    for lst, n in enumerate(counts.tolist()):
        lists.resize(lst, n)  # allocates exactly n entries ...
        lists.resize(lst, 0)  # ... and keeps that capacity for the adds


def _nlist(index: Any) -> int:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 1
