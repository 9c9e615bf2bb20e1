"""`probe export`: one finished run's embeddings for other tools (a registry of exporters).

- anndata: an `.h5ad` file for scanpy users: obs = the metadata, labels and failure reasons,
  obsm["X_image"] = the L2-normalised image embeddings (float32; one `X_image_<channel>` more per
  channel of a `--channel-mode each` run), uns["mubench_probe"] = the provenance. It is written
  with h5py in AnnData's on-disk format (anndata's own writer needs pandas < 3), with no X.
- npy: the layout clip-retrieval writes, which autofaiss and clip-retrieval's back end read:
  `img_emb/img_emb_0.npy` (float16, L2-normalised, readable rows only) and
  `metadata/metadata_0.parquet` (their metadata; `row` is the store row).
- parquet: one table, every row: metadata, `row`, `failure`, `embedding` (a list of float32 per
  row, L2-normalised; zeros for failed rows) and `embedding_<channel>` for `each` runs.

A run that is damaged or not fully extracted is refused in one line, before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import StoreError, UsageError
from .store import EmbeddingStore, Run


@dataclass
class ExportReport:
    path: Path
    rows: int
    files: list[Path] = field(default_factory=list)


@dataclass
class _Data:
    run: Run
    store: Path
    x: np.ndarray  # (N, D) float32, normalised
    channels: dict[str, np.ndarray]  # label -> (N, D)
    meta: pd.DataFrame  # metadata + row + failure
    provenance: dict[str, Any]


def _load(store: str | Path, model: str | None, dataset: str | None) -> _Data:
    from .queries import pick_run

    st = EmbeddingStore(store)
    run = pick_run(st, model, dataset)
    if not run.complete:  # a damaged run raises here, in one line
        raise StoreError(
            f"{st.path}/{run.path} is not fully extracted; rerun `probe extract` for {run.model_spec} before exporting"
        )
    meta = run.meta()
    failures = run.failures()
    meta.insert(0, "row", np.arange(run.layout.n_rows, dtype=np.int64))
    meta["failure"] = [failures.get(i, "") for i in range(run.layout.n_rows)]
    channels = {label: run.channel_embeddings(k) for k, label in enumerate(run.channel_labels)}
    return _Data(run, st.path, run.image_embeddings(), channels, meta, run.provenance)


def _record(d: _Data) -> dict[str, Any]:
    return {
        "store": str(d.store),
        "run": d.run.path,
        "model": d.run.model_spec,
        "channels": list(d.channels),
        "provenance": d.provenance,
    }


# ---- AnnData (.h5ad) in its on-disk format --------------------------------------------------------


def _enc(node: Any, kind: str, version: str) -> None:
    node.attrs["encoding-type"] = kind
    node.attrs["encoding-version"] = version


def _strings(group: Any, name: str, values: list[str]) -> None:
    import h5py

    ds = group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype("utf-8"))
    _enc(ds, "string-array", "0.2.0")


def _column(group: Any, name: str, s: pd.Series) -> None:
    """Numbers and booleans as arrays; everything else as a categorical (missing -> code -1)."""
    values = s.to_numpy()
    if values.dtype.kind in "biuf":
        _enc(group.create_dataset(name, data=values), "array", "0.2.0")
        return
    text = [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in values]
    cats = sorted({t for t in text if t is not None})
    lookup = {c: i for i, c in enumerate(cats)}
    codes = np.array([lookup[t] if t is not None else -1 for t in text], dtype=np.int32)
    g = group.create_group(name)
    _enc(g, "categorical", "0.2.0")
    g.attrs["ordered"] = False
    _strings(g, "categories", cats)
    _enc(g.create_dataset("codes", data=codes), "array", "0.2.0")


def _dataframe(parent: Any, name: str, df: pd.DataFrame, index: list[str]) -> None:
    import h5py

    g = parent.create_group(name)
    _enc(g, "dataframe", "0.2.0")
    g.attrs["_index"] = "_index"
    g.attrs.create("column-order", np.array([str(c) for c in df.columns], dtype=object), dtype=h5py.string_dtype())
    _strings(g, "_index", index)
    for col in df.columns:
        _column(g, str(col), df[col])


def _dict(parent: Any, name: str) -> Any:
    g = parent.create_group(name)
    _enc(g, "dict", "0.1.0")
    return g


def _scalar_string(group: Any, name: str, value: str) -> None:
    import h5py

    ds = group.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
    _enc(ds, "string", "0.2.0")


def to_anndata(d: _Data, out: Path) -> list[Path]:
    try:
        import h5py
    except ImportError:
        raise UsageError("exporting to AnnData needs h5py: pip install h5py") from None
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        _enc(f, "anndata", "0.1.0")
        _dataframe(f, "obs", d.meta, [str(i) for i in d.meta["row"]])
        _dataframe(f, "var", pd.DataFrame(), [])
        obsm = _dict(f, "obsm")
        for key, x in {"X_image": d.x, **{f"X_image_{k}": v for k, v in d.channels.items()}}.items():
            _enc(obsm.create_dataset(key, data=x.astype(np.float32)), "array", "0.2.0")
        for empty in ("varm", "obsp", "varp", "layers"):
            _dict(f, empty)
        uns = _dict(f, "uns")
        info = _dict(uns, "mubench_probe")
        record = _record(d)
        for key in ("store", "run", "model"):
            _scalar_string(info, key, record[key])
        _strings(info, "channels", record["channels"])
        _scalar_string(info, "provenance_json", json.dumps(record["provenance"], sort_keys=True, default=str))
    tmp.replace(out)
    return [out]


# ---- clip-retrieval's npy layout and a plain Parquet table ----------------------------------------


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns as strings (None kept): Parquet needs one type per column."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = [None if v is None else str(v) for v in out[col]]
    return out


def to_npy(d: _Data, out: Path) -> list[Path]:
    keep = (d.meta["failure"] == "").to_numpy()
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    emb, meta = out / "img_emb" / "img_emb_0.npy", out / "metadata" / "metadata_0.parquet"
    np.save(emb, d.x[keep].astype(np.float16))
    _parquet_safe(d.meta[keep].drop(columns=["failure"]).reset_index(drop=True)).to_parquet(meta, index=False)
    info = out / "mubench_probe.json"
    info.write_text(json.dumps(_record(d), indent=2, sort_keys=True, default=str))
    return [emb, meta, info]


def to_parquet(d: _Data, out: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(_parquet_safe(d.meta), preserve_index=False)
    for name, x in {"embedding": d.x, **{f"embedding_{k}": v for k, v in d.channels.items()}}.items():
        values = pa.array(np.ascontiguousarray(x, dtype=np.float32).ravel())
        table = table.append_column(name, pa.FixedSizeListArray.from_arrays(values, x.shape[1]))
    meta = {b"mubench_probe": json.dumps(_record(d), sort_keys=True, default=str).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return [out]


EXPORTERS: dict[str, tuple[str, Callable[[_Data, Path], list[Path]]]] = {
    "anndata": ("an .h5ad file (obs: metadata, obsm: embeddings, uns: provenance)", to_anndata),
    "npy": ("clip-retrieval's layout: DIR/img_emb/img_emb_0.npy + DIR/metadata/metadata_0.parquet", to_npy),
    "parquet": ("one Parquet table: metadata, row, failure, embedding lists", to_parquet),
}


def export_run(
    store: str | Path, to: str, out: str | Path, model: str | None = None, dataset: str | None = None
) -> ExportReport:
    """Export one complete run (`model`, and `dataset` if the model has several) in format `to`."""
    if to not in EXPORTERS:
        raise UsageError(f"--to must be one of {', '.join(EXPORTERS)}, not {to!r}")
    d = _load(store, model, dataset)
    path = Path(out)
    if path.parent != Path():
        path.parent.mkdir(parents=True, exist_ok=True)
    files = EXPORTERS[to][1](d, path)
    return ExportReport(path, len(d.meta), files)
