"""All Zarr I/O: one group per (model, dataset, split) under a store directory.

Layout of a run group `MODEL/DATASET/SPLIT`:
  image_emb (N, D)   raw projector output (float16 by default); normalised on read
  features  (N, F)   optional pre-projection features
  done      (chunks,) one flag per row chunk, set only after that chunk's arrays are written
  failure   (N,)     "" or the reason a row's image could not be used
  row_index (N,)     position of the row in the source dataset
  meta/<column>      label and metadata columns ("" / NaN for missing)
  captions/<key>/options (N, K) indices into texts (-1 = padding), captions/<key>/answer (N,)
  texts (T,), text_emb (T, D) every unique text the heads need (caption options, class prompts)
Attributes hold the provenance; every chunk is zstd-compressed with a frame checksum and
guarded by CRC32C, so damaged bytes raise on read instead of returning wrong numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
import zarr.codecs as zc

from .errors import ProvenanceMismatchError, StoreError

FORMAT_VERSION = 1
DEFAULT_STORE = Path("stores") / "default.zarr"
# Keys of the provenance that must agree before new rows join an existing group.
IDENTITY_KEYS = (
    "model_spec",
    "backend",
    "weights_hash",
    "preprocess",
    "intensity_policy",
    "dataset_format",
    "dataset_id",
    "dataset_revision",
    "dataset_fingerprint",
    "dataset_limit",
    "n_rows",
    "embed_dim",
    "dtype",
    "chunk_rows",
    "features",
)


def _compressors() -> list[Any]:
    return [zc.ZstdCodec(level=3, checksum=True), zc.Crc32cCodec()]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-normalise in float32; zero rows (failed images) stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@dataclass(frozen=True)
class RunLayout:
    """Shape decisions fixed when a run group is created."""

    n_rows: int
    embed_dim: int
    chunk_rows: int = 256
    dtype: str = "float16"
    feature_dim: int | None = None

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def chunk_slice(self, ci: int) -> slice:
        return slice(ci * self.chunk_rows, min((ci + 1) * self.chunk_rows, self.n_rows))


_STR = np.dtypes.StringDType()


def _str_array(values: Sequence[Any]) -> np.ndarray:
    """Variable-length strings (Zarr's vlen-utf8); None and NaN become ""."""
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values], dtype=_STR)


def _read_str(arr: zarr.Array) -> np.ndarray:
    return np.array(arr[:].tolist(), dtype=object)


class Run:
    """One (model, dataset, split) group: embeddings, texts, labels and provenance."""

    def __init__(self, group: zarr.Group, store_path: Path) -> None:
        self.group = group
        self.store_path = store_path

    # ---- identity -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.group.path

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.group.attrs.get("provenance", {}))

    @property
    def model_spec(self) -> str:
        return self.provenance.get("model_spec", "")

    @property
    def has_text(self) -> bool:
        return bool(self.provenance.get("has_text"))

    @property
    def layout(self) -> RunLayout:
        p = self.provenance
        return RunLayout(p["n_rows"], p["embed_dim"], p["chunk_rows"], p["dtype"], p.get("feature_dim"))

    def set_attrs(self, **kw: Any) -> None:
        self.group.attrs.update({**kw, "updated": _now()})

    # ---- progress -------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def missing_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    @property
    def texts_done(self) -> bool:
        return bool(self.group.attrs.get("texts_done")) or not self.has_text

    @property
    def complete(self) -> bool:
        return self.texts_done and not self.missing_chunks()

    def write_chunk(
        self, ci: int, emb: np.ndarray, failures: Sequence[str], features: np.ndarray | None = None
    ) -> None:
        """Write one whole row chunk, then flag it done (a crash before the flag redoes it)."""
        sl = self.layout.chunk_slice(ci)
        if emb.shape[0] != sl.stop - sl.start:
            raise StoreError(f"chunk {ci} expects {sl.stop - sl.start} rows, got {emb.shape[0]}")
        self.group["image_emb"][sl] = emb.astype(self.layout.dtype)
        if features is not None and "features" in self.group:
            self.group["features"][sl] = features.astype(self.layout.dtype)
        self.group["failure"][sl] = _str_array(list(failures))
        self.group["done"][ci] = True

    def write_text_embeddings(self, emb: np.ndarray) -> None:
        if emb.shape[0] != self.group["texts"].shape[0]:
            raise StoreError("text embeddings do not match the stored text table")
        self.group["text_emb"][:] = emb.astype(self.layout.dtype)
        self.set_attrs(texts_done=True)

    # ---- reads ----------------------------------------------------------------------------
    def image_embeddings(self, normalize: bool = True) -> np.ndarray:
        x = np.asarray(self.group["image_emb"][:], dtype=np.float32)
        return l2_normalize(x) if normalize else x

    def features(self) -> np.ndarray | None:
        return np.asarray(self.group["features"][:], np.float32) if "features" in self.group else None

    def failures(self) -> dict[int, str]:
        f = _read_str(self.group["failure"])
        return {int(i): str(f[i]) for i in np.flatnonzero(f != "")}

    def valid_mask(self) -> np.ndarray:
        """Rows that were extracted and whose image was readable."""
        ok = _read_str(self.group["failure"]) == ""
        done = np.repeat(self.done_mask(), self.layout.chunk_rows)[: self.layout.n_rows]
        return ok & done

    def texts(self) -> list[str]:
        return [str(t) for t in _read_str(self.group["texts"])]

    def text_embeddings(self, normalize: bool = True) -> np.ndarray:
        if not self.has_text:
            raise StoreError(f"{self.model_spec} is image-only: no text embeddings")
        if not self.texts_done:
            raise StoreError(f"{self.path}: text embeddings are not extracted yet")
        x = np.asarray(self.group["text_emb"][:], dtype=np.float32)
        return l2_normalize(x) if normalize else x

    def meta(self) -> pd.DataFrame:
        g = self.group["meta"]
        cols: dict[str, Any] = {}
        for name in g.attrs.get("columns", []):
            if g[name].dtype == _STR or str(g[name].dtype).startswith("Str"):
                s = pd.Series(_read_str(g[name]), dtype=object)
                cols[name] = s.where(s != "", None)
            else:
                cols[name] = np.asarray(g[name][:])
        return pd.DataFrame(cols)

    def caption_keys(self) -> list[str]:
        return sorted(self.group["captions"].group_keys()) if "captions" in self.group else []

    def captions(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(options (N, K) text indices with -1 padding, answer (N,) with -1 for null entries)."""
        g = self.group["captions"][key]
        return np.asarray(g["options"][:]), np.asarray(g["answer"][:])

    def prompts(self) -> dict[str, Any]:
        return dict(self.group.attrs.get("prompts", {}))

    # ---- integrity ------------------------------------------------------------------------
    def iter_arrays(self) -> Iterator[zarr.Array]:
        return _walk_arrays(self.group)

    def verify(self) -> list[str]:
        """Read every chunk of every array; return one line per chunk that fails its checksum."""
        problems = []
        for arr in self.iter_arrays():
            grid = [range(-(-s // c)) for s, c in zip(arr.shape, arr.chunks, strict=True)]
            for idx in np.ndindex(*[len(g) for g in grid]):
                sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks, strict=True))
                try:
                    arr[sel]
                except Exception as exc:  # a damaged chunk fails in the codec; report, keep going
                    problems.append(f"{arr.path} chunk {'.'.join(map(str, idx))}: {exc}")
        return problems

    def size_bytes(self) -> int:
        root = self.store_path / self.path
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


class RunArrays:
    """A run's arrays, read from the store once and shared by all of that run's units."""

    def __init__(self, run: Run) -> None:
        self.run = run

    @cached_property
    def x(self) -> np.ndarray:
        return self.run.image_embeddings()

    @cached_property
    def valid(self) -> np.ndarray:
        return self.run.valid_mask()

    @cached_property
    def meta(self) -> pd.DataFrame:
        return self.run.meta()

    @cached_property
    def texts(self) -> list[str] | None:
        return self.run.texts() if self.run.has_text else None

    @cached_property
    def text_emb(self) -> np.ndarray | None:
        return self.run.text_embeddings() if self.run.has_text else None


def _walk_arrays(g: zarr.Group) -> Iterator[zarr.Array]:
    for _, arr in g.arrays():
        yield arr
    for _, sub in g.groups():
        yield from _walk_arrays(sub)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), new.get(k)) for k in IDENTITY_KEYS if old.get(k) != new.get(k)}


class EmbeddingStore:
    """A directory of run groups; the only code in the package that touches Zarr."""

    def __init__(self, path: str | Path, create: bool = False) -> None:
        self.path = Path(path)
        marker = self.path / "zarr.json"
        if not marker.exists():
            if not create:
                raise StoreError(f"no store at {self.path} (run `probe extract --store {self.path}`)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
            self.root.attrs.update({"mubench_probe_store": FORMAT_VERSION, "created": _now()})
            return
        try:
            self.root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        except Exception as exc:
            raise StoreError(f"{self.path} is not a readable Zarr v3 store: {exc}") from exc
        if "mubench_probe_store" not in self.root.attrs:
            raise StoreError(f"{self.path} is a Zarr store but not one written by probe extract")

    def runs(self) -> list[Run]:
        out = []
        for _, m in sorted(self.root.groups()):
            for _, d in sorted(m.groups()):
                for _, s in sorted(d.groups()):
                    out.append(Run(s, self.path))
        return out

    def find(self, model: str | None = None, dataset: str | None = None, split: str | None = None) -> list[Run]:
        """Runs matching a model spec or key, a dataset key and a split (None = any)."""
        found = []
        for r in self.runs():
            mk, dk, sk = r.path.split("/")
            if model is not None and model not in (mk, r.model_spec):
                continue
            if dataset is not None and dataset not in (dk, r.provenance.get("dataset_spec")):
                continue
            if split is not None and split != sk:
                continue
            found.append(r)
        return found

    def prepare_run(
        self,
        path: str,
        provenance: dict[str, Any],
        layout: RunLayout,
        meta: pd.DataFrame,
        texts: Sequence[str],
        captions: Mapping[str, tuple[np.ndarray, np.ndarray]],
        prompts: Mapping[str, Any],
        overwrite: bool = False,
    ) -> Run:
        """Create the group, or reopen it if its identity matches; refuse to mix otherwise.

        Texts and captions may change between runs (other prompt templates): they are
        rewritten without touching finished image chunks.
        """
        provenance = {
            **provenance,
            "n_rows": layout.n_rows,
            "embed_dim": layout.embed_dim,
            "dtype": layout.dtype,
            "chunk_rows": layout.chunk_rows,
            "feature_dim": layout.feature_dim,
            "features": layout.feature_dim is not None,
        }
        if path in self.root:
            run = Run(self.root[path], self.path)
            diff = identity_diff(run.provenance, provenance)
            if diff and not overwrite:
                what = "; ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                raise ProvenanceMismatchError(
                    f"{self.path}/{path} was extracted differently ({what}). Use another --store, "
                    "or pass --overwrite to discard it"
                )
            if not diff:
                if run.texts() != list(texts) or run.prompts() != dict(prompts):
                    self._write_texts(run.group, texts, captions, layout)
                    run.set_attrs(prompts=dict(prompts), texts_done=False)
                run.set_attrs(provenance={**provenance, "created": run.provenance.get("created")})
                return run
            del self.root[path]
        g = self.root.require_group(path)
        n, cr = layout.n_rows, layout.chunk_rows
        comp = _compressors()
        g.create_array(
            "image_emb",
            shape=(n, layout.embed_dim),
            chunks=(cr, layout.embed_dim),
            dtype=layout.dtype,
            compressors=comp,
            fill_value=0,
        )
        if layout.feature_dim is not None:
            g.create_array(
                "features",
                shape=(n, layout.feature_dim),
                chunks=(cr, layout.feature_dim),
                dtype=layout.dtype,
                compressors=comp,
                fill_value=0,
            )
        g.create_array("done", shape=(layout.n_chunks,), chunks=(1,), dtype=bool, fill_value=False, compressors=comp)
        g.create_array("failure", shape=(n,), chunks=(cr,), dtype=_STR, compressors=comp, fill_value="")
        g.create_array("row_index", data=np.arange(n, dtype=np.int64), chunks=(max(n, 1),), compressors=comp)
        mg = g.require_group("meta")
        for col in meta.columns:
            values = meta[col].to_numpy()
            if values.dtype.kind in "biuf":
                data = values
            else:
                data = _str_array(list(values))
            mg.create_array(col, data=data, chunks=(max(n, 1),), compressors=comp)
        mg.attrs["columns"] = [str(c) for c in meta.columns]
        self._write_texts(g, texts, captions, layout)
        g.attrs.update(
            {
                "provenance": {**provenance, "created": _now()},
                "prompts": dict(prompts),
                "texts_done": False,
                "status": "new",
                "updated": _now(),
            }
        )
        return Run(g, self.path)

    @staticmethod
    def _write_texts(
        g: zarr.Group, texts: Sequence[str], captions: Mapping[str, tuple[np.ndarray, np.ndarray]], layout: RunLayout
    ) -> None:
        comp = _compressors()
        t = max(len(texts), 1)
        for name in ("texts", "text_emb", "captions"):
            if name in g:
                del g[name]
        g.create_array("texts", data=_str_array(list(texts)), chunks=(t,), compressors=comp)
        g.create_array(
            "text_emb",
            shape=(len(texts), layout.embed_dim),
            chunks=(t, layout.embed_dim),
            dtype=layout.dtype,
            compressors=comp,
            fill_value=0,
        )
        cg = g.require_group("captions")
        for key, (options, answer) in captions.items():
            kg = cg.require_group(key)
            kg.create_array(
                "options",
                data=options.astype(np.int32),
                chunks=(max(options.shape[0], 1), max(options.shape[1], 1)),
                compressors=comp,
            )
            kg.create_array("answer", data=answer.astype(np.int32), chunks=(max(answer.shape[0], 1),), compressors=comp)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def describe(run: Run) -> dict[str, Any]:
    """A JSON-ready summary of a run for `probe info`."""
    p = run.provenance
    done = run.done_mask()
    return {
        "group": run.path,
        "model": p.get("model_spec"),
        "dataset": p.get("dataset_spec"),
        "split": run.path.split("/")[-1],
        "rows": p.get("n_rows"),
        "chunks_done": f"{int(done.sum())}/{done.size}",
        "texts": len(run.texts()) if run.has_text else 0,
        "failed_rows": len(run.failures()),
        "status": run.attrs.get("status"),
        "complete": run.complete,
        "size_bytes": run.size_bytes(),
        "provenance": p,
    }
