"""FAISS indexes over a store's embeddings, saved beside the store and rebuilt when stale.

An index file carries its attributes (factory string, metric, rows, a hash of the embeddings
it was built from); an index whose hash no longer matches the store is rebuilt, never used.
Approximate indexes report their recall@10 against exact search on a sample of queries.
The indexes themselves are built by `heads.ann` (the one place FAISS indexes are made).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from .faiss_factory import EXACT, faiss_message
from .heads import ann


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


def build_index(x: np.ndarray, factory: str = EXACT, recall_sample: int = 1000, seed: int = 0) -> tuple[Any, IndexInfo]:
    """Inner-product index over normalised vectors (built by `heads.ann.build`, trained on every
    row, FAISS's search defaults); an ANN factory's recall@10 is measured on a seeded sample."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = ann.build(x, factory, seed=seed, train_per_list=None, defaults=False)
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
        info.recall_at_10, info.recall_queries = ann.recall(index.search, x, q, 10), len(q)
    return index, info


class IndexCache:
    """`<store>.indexes/<group>--<modality>--<factory>.faiss` with a JSON of its IndexInfo."""

    def __init__(self, store_path: str | Path) -> None:
        from .locations import is_url

        self.notes: list[str] = []  # what `get` had to repair (an unreadable cached index, ...)

        if is_url(store_path):  # an object store: indexes are a local cache (~/.cache/mubench_probe on Linux)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(store_path))
            self.root = Path(platformdirs.user_cache_dir("mubench_probe", appauthor=False)) / "indexes" / safe
            return
        p = Path(store_path)
        self.root = p.with_name(p.name + ".indexes")

    def paths(self, group: str, modality: str, factory: str) -> tuple[Path, Path]:
        """The index file and its attributes file for one gallery (where `get` reads and saves them)."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{group}--{modality}--{factory}")
        return self.root / f"{safe}.faiss", self.root / f"{safe}.json"

    def get(self, group: str, modality: str, x: np.ndarray, factory: str = EXACT):
        """The saved index if it was built from exactly these vectors, else a fresh (saved) one.

        The files are a cache: one that cannot be read (damaged, truncated, another gallery's) is
        rebuilt with a note in `notes`, never an error; a folder that cannot be written costs a
        note and a rebuild next time, nothing else."""
        fpath, jpath = self.paths(group, modality, factory)
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
