"""FAISS indexes over a store's embeddings, saved beside the store and rebuilt when stale.

An index file carries its attributes (factory string, metric, rows, a hash of the embeddings
it was built from); an index whose hash no longer matches the store is rebuilt, never used.
Approximate indexes report their recall@10 against exact search on a sample of queries.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError

EXACT = "Flat"


def embeddings_hash(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:24]


@dataclass
class IndexInfo:
    factory: str
    metric: str
    rows: int
    dim: int
    embeddings_hash: str
    built: str
    recall_at_10: float | None = None
    recall_queries: int = 0


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    from .heads.knn import search

    return search(x, q, k)[1]


def ann_recall(index, x: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k found by `index` (the usual ANN recall@k)."""
    k = min(k, len(x))
    truth = exact_topk(x, queries, k)
    _, got = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return float(np.mean([len(np.intersect1d(t, g)) / k for t, g in zip(truth, got, strict=True)]))


def build_index(x: np.ndarray, factory: str = EXACT, recall_sample: int = 1000, seed: int = 0):
    """Inner-product index over normalised vectors; ANN factories are trained and measured."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UsageError(f"FAISS cannot build index {factory!r}: {str(exc).splitlines()[0]}") from None
    if not index.is_trained:
        if len(x) < getattr(index, "nlist", 1):
            raise UsageError(f"index {factory!r} needs at least {index.nlist} vectors to train; have {len(x)}")
        index.train(x)
    index.add(x)
    info = IndexInfo(
        factory,
        "inner_product",
        len(x),
        x.shape[1],
        embeddings_hash(x),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if factory != EXACT:
        rng = np.random.default_rng(seed)
        q = x[rng.choice(len(x), size=min(recall_sample, len(x)), replace=False)]
        info.recall_at_10, info.recall_queries = ann_recall(index, x, q, 10), len(q)
    return index, info


DEFAULT_PARAMS = {"HNSW": "efSearch=128"}  # FAISS' defaults (nprobe=1, efSearch=16) miss many neighbours
_GPU: list = []
TRAIN_PER_LIST = 64  # training vectors per IVF list (FAISS wants 30-256)


def parse_factory(spec: str) -> tuple[str, str]:
    """`FACTORY[:PARAMS]` -> (factory, params), e.g. "IVF4096,Flat:nprobe=64" or "HNSW32:efSearch=256".

    Without PARAMS an IVF index of nlist lists searches nprobe = max(8, nlist / 32) of them (all of
    them up to 8; 32 of 1024) and HNSW uses efSearch=128."""
    factory, _, params = spec.partition(":")
    factory = factory.strip()
    if not params:
        params = next((p for prefix, p in DEFAULT_PARAMS.items() if prefix in factory), "")
    return factory, params.strip()


def ann_index(gallery, spec: str, seed: int = 0, device: str | None = None):
    """An approximate inner-product index over a gallery (array or RowView), added block by block.

    IVF indexes are trained on a seeded sample of TRAIN_PER_LIST vectors per list; `PARAMS`
    (see parse_factory) are set for the search. With `device` cuda and a GPU build of FAISS
    (faiss-gpu) the index moves to the GPU; otherwise it stays on the CPU.
    """
    import faiss

    from .heads.scoring import RowView

    view = gallery if isinstance(gallery, RowView) else RowView(np.asarray(gallery, dtype=np.float32))
    factory, params = parse_factory(spec)
    try:
        index = faiss.index_factory(view.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UsageError(f"FAISS cannot build index {factory!r}: {str(exc).splitlines()[0]}") from None
    if not index.is_trained:
        nlist = _nlist(index)
        if len(view) < nlist:
            raise UsageError(f"index {factory!r} needs at least {nlist} vectors to train; have {len(view)}")
        rng = np.random.default_rng(seed)
        n_train = min(len(view), max(TRAIN_PER_LIST * nlist, 1000))
        sample = np.sort(rng.choice(len(view), size=n_train, replace=False))
        index.train(np.ascontiguousarray(view[sample], dtype=np.float32))
    _reserve_lists(index, view)
    for _, block in view.blocks():
        index.add(block)
    if not params and "IVF" in factory:
        params = f"nprobe={min(_nlist(index), max(8, _nlist(index) // 32))}"
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as exc:
            raise UsageError(f"FAISS index {factory!r}: cannot set {params!r} ({str(exc).splitlines()[0]})") from None
    if device and str(device).startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
        dev = int(str(device).partition(":")[2] or 0)
        _GPU.append(faiss.StandardGpuResources())  # must outlive the index
        index = faiss.index_cpu_to_gpu(_GPU[-1], dev, index)
    return index


def _reserve_lists(index, view) -> None:
    """Give each IVF list its final capacity before adding: lists grown block by block double
    their buffers (std::vector), up to twice the index's size, which at 10^6 rows is gigabytes."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
        lists = faiss.downcast_InvertedLists(ivf.invlists)
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


GATHER_RESERVE = 1 << 16  # galleries smaller than this are added in one block: nothing to reserve


def _nlist(index) -> int:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 1


class IndexCache:
    """`<store>.indexes/<group>--<modality>--<factory>.faiss` with a JSON of its IndexInfo."""

    def __init__(self, store_path: str | Path) -> None:
        from .locations import is_url

        if is_url(store_path):  # an object store: indexes are a local cache ($XDG_CACHE_HOME/mubench_probe)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(store_path))
            cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            self.root = Path(cache) / "mubench_probe" / "indexes" / safe
            return
        p = Path(store_path)
        self.root = p.with_name(p.name + ".indexes")

    def _paths(self, group: str, modality: str, factory: str) -> tuple[Path, Path]:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{group}--{modality}--{factory}")
        return self.root / f"{safe}.faiss", self.root / f"{safe}.json"

    def get(self, group: str, modality: str, x: np.ndarray, factory: str = EXACT):
        """The saved index if it was built from exactly these vectors, else a fresh (saved) one."""
        import faiss

        fpath, jpath = self._paths(group, modality, factory)
        h = embeddings_hash(x)
        if fpath.exists() and jpath.exists():
            info = IndexInfo(**json.loads(jpath.read_text()))
            if info.embeddings_hash == h and info.rows == len(x):
                return faiss.read_index(str(fpath)), info, False
        index, info = build_index(x, factory)
        self.root.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(fpath))
        jpath.write_text(json.dumps(asdict(info), indent=2))
        return index, info, True
