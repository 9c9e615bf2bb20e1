"""FAISS indexes over a store's embeddings, saved beside the store and rebuilt when stale.

An index file carries its attributes (factory string, metric, rows, a hash of the embeddings
it was built from); an index whose hash no longer matches the store is rebuilt, never used.
Approximate indexes report their recall@10 against exact search on a sample of queries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError

EXACT = "Flat"


def faiss_message(exc: BaseException) -> str:
    """FAISS's own words, without the C++ signature and source line it prefixes them with."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", line)


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
        raise UsageError(f"FAISS cannot build index {factory!r}: {faiss_message(exc)}") from None
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


CHECK_DIMS = (768, 512, 1024, 384, 256, 1536, 2048, 1280, 640, 1152, 128, 64)  # common embedding widths


def check_factory(spec: str, option: str = "--knn-index") -> None:
    """Refuse a `FACTORY[:PARAMS]` FAISS cannot build, before any work: a typo would otherwise
    surface only once every unit has loaded its data (and then as a skipped head).

    Cheap: it builds empty indexes. The gallery's width is not known yet, so a factory passes if
    FAISS builds it for any common embedding width (one that needs another width, e.g. PQ7, is
    refused later, per unit, by `ann_index`)."""
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
    examples = "e.g. Flat, IVF4096,Flat, HNSW32 or IVF4096,Flat:nprobe=64"
    if index is None:
        raise UsageError(f"{option} {spec!r}: FAISS cannot build this index ({why}); {examples}")
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as exc:
            raise UsageError(
                f"{option} {spec!r}: FAISS cannot set {params!r} on {factory} ({faiss_message(exc)}); {examples}"
            ) from None


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
        raise UsageError(f"FAISS cannot build index {factory!r}: {faiss_message(exc)}") from None
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
            raise UsageError(f"FAISS index {factory!r}: cannot set {params!r} ({faiss_message(exc)})") from None
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

        self.notes: list[str] = []  # what `get` had to repair (an unreadable cached index, ...)

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
        """The saved index if it was built from exactly these vectors, else a fresh (saved) one.

        The files are a cache: one that cannot be read (damaged, truncated, another gallery's) is
        rebuilt with a note in `notes`, never an error; a folder that cannot be written costs a
        note and a rebuild next time, nothing else."""
        fpath, jpath = self._paths(group, modality, factory)
        if fpath.exists() or jpath.exists():
            cached = self._load(fpath, jpath, x)
            if cached is not None:
                return (*cached, False)
        index, info = build_index(x, factory)
        self._save(index, info, fpath, jpath)
        return index, info, True

    def _load(self, fpath: Path, jpath: Path, x: np.ndarray):
        """(index, info) if the saved pair is readable and was built from `x`; None to rebuild."""
        import faiss

        try:
            info = IndexInfo(**json.loads(jpath.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            self.notes.append(f"cached index attributes {jpath} are unreadable ({_why(exc)}): index rebuilt")
            return None
        if info.embeddings_hash != embeddings_hash(x) or info.rows != len(x):
            return None  # stale: built from other vectors
        try:
            index = faiss.read_index(str(fpath))
        except (RuntimeError, OSError) as exc:  # FAISS reports a damaged file as a RuntimeError
            self.notes.append(f"cached index {fpath} is unreadable ({_why(exc)}): index rebuilt")
            return None
        if index.ntotal != len(x) or index.d != x.shape[1]:
            self.notes.append(
                f"cached index {fpath} holds {index.ntotal} vectors of width {index.d}, not the "
                f"{len(x)} of width {x.shape[1]} its attributes promise: index rebuilt"
            )
            return None
        return index, info

    def _save(self, index, info: IndexInfo, fpath: Path, jpath: Path) -> None:
        """Write both files atomically (a killed search leaves no half-written index); best effort."""
        import faiss

        tmp = [p.with_name(f".{p.name}.{os.getpid()}.{os.urandom(4).hex()}") for p in (fpath, jpath)]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            faiss.write_index(index, str(tmp[0]))
            tmp[1].write_text(json.dumps(asdict(info), indent=2))
            os.replace(tmp[0], fpath)
            os.replace(tmp[1], jpath)
        except (OSError, RuntimeError) as exc:
            self.notes.append(f"could not save the index in {self.root} ({_why(exc)}): it is rebuilt for each query")
        finally:
            for p in tmp:
                p.unlink(missing_ok=True)


def _why(exc: BaseException) -> str:
    return faiss_message(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
