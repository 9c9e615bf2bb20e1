"""All Zarr I/O: one group per (model, dataset, split) under a store directory.

Modules: `vectors` (row normalisation, canonical JSON digest), `layout` (names, shapes, identity
keys, `Damage`), `integrity` (digests binding bytes to place and record; small file checks),
`arrays` (creating, writing and listing a run's Zarr arrays), `run` (`Run`, `BrokenRun`,
`RunArrays`), `checks` (a run's verify and repair), `commit` (atomic creation of a run),
`embedding_store` (`EmbeddingStore`) and `status` (`probe info` / `probe status` summaries).
Importers use the names re-exported here.

Layout of a run group `MODEL/DATASET/SPLIT`:
  image_emb (N, D)   raw projector output (float16 by default); normalised on read
  features  (N, F)   optional pre-projection features
  channel_emb (N, K, D) with `--channel-mode each`: one embedding per selected channel
  done      (chunks,) one flag per row chunk, set only after that chunk's arrays are written
  failure   (N,)     "" or the reason a row's image could not be used
  row_index (N,)     position of the row in the source dataset
  meta/<column>      label and metadata columns ("" / NaN for missing)
  captions/<key>/options (N, K) indices into texts (-1 = padding), captions/<key>/answer (N,)
  texts (T,), text_emb (T, D) every unique text the heads need (caption options, class prompts)
  chunk_digest (chunks,) per row chunk, digests binding its arrays' values to their position

Integrity. Every chunk is zstd-compressed with a frame checksum and guarded by CRC32C, and every
written chunk has a file (empty chunks are written too), so a chunk flagged done must exist:
its absence is detected from the store's listing, never read as Zarr's fill value. The group
attributes hold the provenance with its sha256 digest and a digest of the text table and prompt
plan; `done/zarr.json` keeps a copy of both, from which a damaged group `zarr.json` is rebuilt.
Checksums prove bytes, not place or meaning: the per-chunk digests, the metadata digest in the
provenance and the caption digests (see `integrity.py`) catch swapped chunks and metadata
rewritten through Zarr; runs written before them verify with a note. When the group's provenance
and its copy disagree, the one that matches the arrays and the reloaded model and dataset wins.
A repair marks each chunk it clears in `chunk_digest` first, so a killed repair stays reported;
temporary `.partial` files of killed writes are reported and removed.
A run is created under `.creating/` and renamed into place, so it appears complete or not at
all. Claims of concurrent writers live in `.claims/` (see `claims.py`); neither is a Zarr node.

Object stores (`s3://...`, any fsspec URL; see `locations.py`) have no rename. There a run is
built in memory, its objects are uploaded under the run's prefix with the two metadata
documents last (`done/zarr.json`, the provenance copy, then the group `zarr.json`), and the group
`zarr.json` is written with a conditional put (`If-None-Match: *`): it is the commit, the first
writer wins and the others join. The upload happens under the run's `create` claim, so two
creators never interleave. A prefix without a committed `zarr.json` is absent while its creator
is alive; afterwards it is a damaged run if its provenance copy made it (repaired from it like a
local run), else an abandoned creation, flagged by verify and removed by the next writer.
Every other guarantee is the same: chunk files are listed (never read as fill values), checked
against their checksums and digests, and repaired the same way.
"""

from .embedding_store import EmbeddingStore
from .integrity import CHUNK_DIGEST, DIGESTS_VERSION
from .layout import (
    CLAIMS,
    CREATING,
    DEFAULT_STORE,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    ROW_ARRAYS,
    Damage,
    RunLayout,
    RunSpec,
    identity_diff,
    repair_hint,
)
from .run import BrokenRun, ChannelArrays, Run, RunArrays
from .status import describe, run_status
from .vectors import digest, l2_normalize, normalize_rows

__all__ = [
    "CHUNK_DIGEST",
    "CLAIMS",
    "CREATING",
    "DEFAULT_STORE",
    "DIGESTS_VERSION",
    "FORMAT_VERSION",
    "IDENTITY_KEYS",
    "ROW_ARRAYS",
    "BrokenRun",
    "ChannelArrays",
    "Damage",
    "EmbeddingStore",
    "Run",
    "RunArrays",
    "RunLayout",
    "RunSpec",
    "describe",
    "digest",
    "identity_diff",
    "l2_normalize",
    "normalize_rows",
    "repair_hint",
    "run_status",
]
