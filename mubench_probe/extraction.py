"""Extract once: run an encoder over a dataset and write everything the heads need to the store.

Decoding, the intensity policy and preprocessing run in DataLoader worker processes; the model
runs in the main process; finished chunks are written by a background thread, so decode,
forward and write overlap. Batches never straddle a chunk, so a resumed run computes exactly
the batches an uninterrupted run would have, and its bytes are identical.

Several writers may extract the same run at once (processes on one machine, or machines sharing
the store): each claims a chunk right before its first batch is dispatched and skips chunks
claimed by a live writer, so every chunk is computed once; at the end it waits for the chunks
other writers hold, taking over those whose writer died (see `claims.py`).

Sharding (`ExtractConfig.shard = (I, N)`): a process computes only the chunks of shard I (chunk
ci belongs to shard ci mod N, `config.shard_of`), and shard 0 also encodes the text table. N
processes on any machines then fill one store; two processes of the same shard split its chunks
through the claims, so a shard can be rerun, killed or run twice without harm. Every chunk is
computed exactly as a single process computes it, so the store is byte-identical.

Perturbed runs (`ExtractConfig.perturb`, see perturb.py) are runs of their own beside the clean
one (`prepare(..., perturbation)`); a sweep of them is filled with one decode per row (sweep.py),
then each run goes through `run_extraction` like any run (what is left, texts, report).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from . import allocator
from .claims import HOST, ChunkClaims, ClaimInfo
from .config import DEFAULT_MAX_FILE_BYTES, ExtractConfig, package_versions, shard_of
from .datasets import LoadedDataset, slug
from .encoders import Encoder
from .errors import LoaderWorkerDiedError
from .image_rows import ImageRows, _collate, _worker_init, cpu_threads_for, input_shape, row_mpp
from .imaging import PixelSpec, get_policy
from .loader_deaths import WorkerRows, dead_workers, stop_workers, worker_death
from .perturb import Perturbation, parse_perturbations
from .store import EmbeddingStore, Run, RunLayout, l2_normalize
from .store.layout import model_dir
from .sweep import extract_sweep
from .text_plan import caption_tables, plan_texts

ProgressFn = Callable[[int], None]
NotifyFn = Callable[[str], None]
WAIT_POLL_S = 0.25  # how often a writer looks again at chunks other writers hold


def chunk_batches(layout: RunLayout, chunks: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row batches for the given chunks; no batch crosses a chunk boundary."""
    out = []
    for ci in chunks:
        sl = layout.chunk_slice(ci)
        out += [list(range(s, min(s + batch_size, sl.stop))) for s in range(sl.start, sl.stop, batch_size)]
    return out


class ClaimingBatches:
    """A batch sampler that claims each chunk right before dispatching its first batch.

    The DataLoader pulls batches from it a few ahead of the model, so a chunk is claimed only
    when its decoding starts; chunks a live writer holds (or that are done by now) are skipped.
    """

    def __init__(self, run: Run, claims: ChunkClaims, chunks: Sequence[int], batch_size: int) -> None:
        self.run, self.claims, self.chunks, self.batch_size = run, claims, list(chunks), batch_size
        self.claimed: list[int] = []
        self.dispatched: list[tuple[int, int]] = []  # (first, last) row of every batch handed to the loader

    def __iter__(self) -> Iterator[list[int]]:
        layout = self.run.layout
        for ci in self.chunks:
            if not self.claims.try_claim(ci):
                continue
            if self.run.chunk_done(ci):  # another writer finished it since we listed the missing chunks
                self.claims.release(ci)
                continue
            self.claimed.append(ci)
            for batch in chunk_batches(layout, [ci], self.batch_size):
                self.dispatched.append((batch[0], batch[-1]))
                yield batch


@dataclass
class ExtractReport:
    run_path: str
    model: str
    rows: int
    chunks_written: int
    chunks_skipped: int
    texts_encoded: int
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    image_seconds: float = 0.0
    chunks_by_others: int = 0  # written by concurrent writers while this one ran
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. rows without a pixel size under --target-mpp
    shard: tuple[int, int] | None = None
    perturbation: str | None = None  # the key of a perturbed run (None: clean)
    perturbed: list[ExtractReport] = field(default_factory=list)  # the clean run's perturbed twins, extracted after it

    @property
    def images_per_second(self) -> float:
        """Throughput of the image phase (loader start to last chunk written)."""
        return 0.0 if self.image_seconds <= 0 else self.rows / self.image_seconds


def prepare(
    store: EmbeddingStore,
    encoder: Encoder,
    ds: LoadedDataset,
    config: ExtractConfig,
    perturbation: Perturbation | None = None,
) -> Run:
    """Create or reopen (and repair) the run group for (encoder, dataset) with full provenance;
    with a `perturbation`, its perturbed twin (`MODEL~KEY/DATASET/SPLIT`, keyed in provenance).

    `max_pixels` is provenance and identity: it does not change any image under the limit, but
    rows over it are failed rows, so runs made with different limits must not be mixed. So is
    `max_file_bytes`, recorded only when not the default (stores made before it existed match).
    """
    templates, max_pixels, policy = config.templates, config.max_pixels, get_policy(config.intensity)
    spec = PixelSpec.from_config(config)
    info = encoder.info
    texts, plan = plan_texts(ds, templates) if encoder.has_text else ([], {})
    index = {t: i for i, t in enumerate(texts)}
    captions = caption_tables(ds, index) if encoder.has_text else {}
    provenance = {
        "model_spec": info.spec,
        "backend": info.backend,
        "weights_hash": info.weights_hash,
        "preprocess": info.preprocess,
        "tokenizer": info.tokenizer,
        "context_length": info.context_length,
        "has_text": info.has_text,
        "intensity_policy": policy.describe(),
        "max_pixels": int(max_pixels),
        **({"max_file_bytes": config.max_file_bytes} if config.max_file_bytes != DEFAULT_MAX_FILE_BYTES else {}),
        "dataset_spec": ds.spec,
        "dataset_format": ds.identity.get("format"),
        "dataset_id": ds.identity.get("id"),
        "dataset_revision": ds.identity.get("revision"),
        "dataset_fingerprint": ds.identity.get("fingerprint"),
        "dataset_limit": ds.identity.get("limit"),
        "dataset_manifest_sha256": ds.identity.get("manifest_sha256"),
        "dataset_scene": ds.identity.get("scene"),
        "pixels": spec.provenance(),
        "split": ds.split,
        "versions": package_versions(),
        "allocator": allocator.describe(),
        "memory_format": str(encoder.memory_format).removeprefix("torch."),
    }
    if perturbation is not None:  # absent in clean runs, so they (and stores made before) stay as they were
        provenance["perturbation"] = perturbation.provenance(row_mpp(ds))
    feature_dim = (info.feature_dim or info.embed_dim) if config.features else None
    channels = spec.n_images if spec.channel_mode == "each" else 0
    layout = RunLayout(len(ds), info.embed_dim, config.chunk_rows, config.dtype, feature_dim, channels)
    path = f"{model_dir(slug(info.spec), slug(perturbation.key) if perturbation else None)}/{ds.key}/{slug(ds.split)}"
    return store.prepare_run(path, provenance, layout, ds.meta, texts, captions, plan, config.overwrite)


def shard_chunks(n_chunks: int, shard: tuple[int, int] | None) -> list[int]:
    """The row chunks a shard computes (all of them without sharding)."""
    return list(range(n_chunks)) if shard is None else [c for c in range(n_chunks) if shard_of(c, shard[1]) == shard[0]]


def shard_rows(n_rows: int, chunk_rows: int, shard: tuple[int, int] | None) -> int:
    """How many rows a shard computes (for progress bars)."""
    layout = RunLayout(n_rows, 1, chunk_rows)
    return sum(_rows(layout, c) for c in shard_chunks(layout.n_chunks, shard))


def _rows(layout: RunLayout, ci: int) -> int:
    sl = layout.chunk_slice(ci)
    return sl.stop - sl.start


def combine_channels(emb: np.ndarray) -> np.ndarray:
    """(B, K, D) channel embeddings -> (B, D) row embeddings: the mean of the L2-normalised
    channel embeddings, so every channel counts the same whatever its norm."""
    b, k, d = emb.shape
    return l2_normalize(emb.reshape(b * k, d)).reshape(b, k, d).mean(axis=1)


def _fill(
    run: Run,
    encoder: Encoder,
    ds: LoadedDataset,
    spec: PixelSpec,
    chunks: list[int],
    batch_size: int,
    num_workers: int,
    progress: ProgressFn | None,
    while_workers_start: Callable[[], None],
    claims: ChunkClaims,
    max_pixels: int,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    perturbation: Perturbation | None = None,
) -> tuple[int, list[int], float]:
    """The hot loop: decode in workers, forward here, write whole chunks in a thread.

    Chunks are claimed lazily by the batch sampler; a chunk is written only while its claim is
    still ours, then its claim is released. `while_workers_start` (the text encoding) runs after
    the workers have begun decoding, so their start-up overlaps with it. Returns rows done,
    chunks written and image-phase seconds. A loader worker that dies (the out-of-memory killer)
    is a LoaderWorkerDiedError naming its row, raised once the chunks finished before are written.
    """
    layout = run.layout
    features = layout.feature_dim is not None
    shape = input_shape(encoder)
    dataset = ImageRows(ds, encoder.transform, spec.policy, shape, max_pixels, spec, max_file_bytes, perturbation)
    if num_workers > 0:
        dataset.watch = WorkerRows(num_workers)
    sampler = ClaimingBatches(run, claims, chunks, batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    rows_done = 0
    written: list[int] = []
    pending: list[Future] = []
    emb_buf: list[np.ndarray] = []
    feat_buf: list[np.ndarray] = []
    chan_buf: list[np.ndarray] = []
    fail_buf: list[str] = []
    each = dataset.k if spec.channel_mode == "each" else 0

    def write(ci: int, emb: np.ndarray, reasons: list[str], feat: np.ndarray | None, chan: np.ndarray | None) -> None:
        if not claims.owns(ci):  # our claim was taken over (we looked dead): the new owner writes it
            return
        run.write_chunk(ci, emb, reasons, feat, chan)
        claims.record_written(ci)
        written.append(ci)
        claims.release(ci)

    first = layout.chunk_slice(chunks[0])
    threads = cpu_threads_for(encoder, dataset, list(range(first.start, first.stop))[:4], num_workers)
    received = 0
    with ThreadPoolExecutor(max_workers=1) as writer, threads:
        t_start = time.perf_counter()
        batches_iter: Any = None
        try:
            batches_iter = iter(loader)
            while_workers_start()
            side = time.perf_counter() - t_start
            for rows, x, reasons in batches_iter:
                received += 1
                ci = rows[0] // layout.chunk_rows
                bad = [i for i, r in enumerate(reasons) if r]
                if each:  # (B, K, 3, H, W): every channel image through the model, K per row
                    emb_k, feat_k = encoder.encode_images(x.reshape(-1, *x.shape[2:]), features)
                    emb_k = emb_k.reshape(len(rows), each, -1)
                    emb_k[bad] = 0.0
                    chan_buf.append(emb_k)
                    emb = combine_channels(emb_k)
                    feat = feat_k.reshape(len(rows), each, -1).mean(axis=1) if feat_k is not None else None
                else:
                    emb, feat = encoder.encode_images(x, features)
                emb[bad] = 0.0
                emb_buf.append(emb)
                if feat is not None:
                    feat[bad] = 0.0
                    feat_buf.append(feat)
                fail_buf += reasons
                rows_done += len(rows)
                if progress:
                    progress(len(rows))
                if rows[-1] == layout.chunk_slice(ci).stop - 1:
                    chunk_feat = np.concatenate(feat_buf) if feat_buf else None
                    chunk_chan = np.concatenate(chan_buf) if chan_buf else None
                    pending.append(writer.submit(write, ci, np.concatenate(emb_buf), fail_buf, chunk_feat, chunk_chan))
                    emb_buf, feat_buf, chan_buf, fail_buf = [], [], [], []
                    for f in [f for f in pending if f.done()]:
                        f.result()  # surface a write error now, not at the end
                        pending.remove(f)
        except RuntimeError as exc:  # torch's report of a dead worker (from its SIGCHLD handler, or polling)
            dead = dead_workers(exc)
            if dead is None:
                raise
            codes = stop_workers(batches_iter)
            batches_iter = None
            raise LoaderWorkerDiedError(worker_death(*dead, codes, dataset, sampler.dispatched[received:])) from None
    for f in pending:
        f.result()
    return rows_done, written, time.perf_counter() - t_start - side


def _waiting_message(held: dict[Any, ClaimInfo], timeout: float) -> str:
    """One line naming the chunks other live writers hold, grouped by writer."""
    owners: dict[tuple[str, int], tuple[ClaimInfo, list[str]]] = {}
    for key, info in sorted(held.items(), key=lambda kv: str(kv[0])):
        owners.setdefault((info.host, info.pid), (info, []))[1].append(str(key))
    parts = []
    for info, keys in owners.values():
        shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts.append(f"chunk(s) {shown} held by live writer {info.describe()}")
    remote = any(host != HOST for host, _ in owners)
    note = f"; a writer on another host silent for {timeout:.0f} s is taken over (--claim-timeout)" if remote else ""
    return "waiting for other writers: " + "; ".join(parts) + note


def run_extraction(
    run: Run,
    encoder: Encoder,
    ds: LoadedDataset,
    config: ExtractConfig,
    *,
    text_batch_size: int = 256,
    progress: ProgressFn | None = None,
    claims: ChunkClaims | None = None,
    notify: NotifyFn | None = None,
    perturbation: Perturbation | None = None,
    texts_from: Run | None = None,
) -> ExtractReport:
    """Fill the missing chunks (and texts) of a prepared run. Safe to interrupt at any point,
    and safe to run in several processes at once: they split the chunks through claims.

    A perturbed run (`perturbation`, the one `prepare` keyed it by) perturbs each decoded image;
    its text embeddings are the same as its clean twin's, copied from `texts_from` when that run
    has them (the text encoder is not run again)."""
    spec, batch_size, num_workers, max_pixels = (
        PixelSpec.from_config(config),
        config.batch_size,
        config.num_workers,
        config.max_pixels,
    )
    t0 = time.perf_counter()
    layout = run.layout
    claims = claims or run.claims(config.claim_timeout)
    texts_encoded = 0
    mine = set(shard_chunks(layout.n_chunks, config.shard))
    does_texts = encoder.has_text and (config.shard is None or config.shard[0] == 0)
    if config.shard is not None:
        claims.note_shards(config.shard[1])

    def encode_texts() -> None:
        nonlocal texts_encoded
        if not does_texts or run.texts_done or not claims.try_claim("texts"):
            return
        try:
            run.reload()
            if not run.texts_done:
                texts = run.texts_unchecked()
                if texts_from is not None and texts_from.texts_done and texts_from.texts_unchecked() == texts:
                    emb = texts_from.text_embeddings(normalize=False)
                else:
                    emb = encoder.encode_texts(texts, text_batch_size)
                if claims.owns("texts"):
                    run.write_text_embeddings(emb)
                    claims.record_written("texts")
                    texts_encoded = len(texts)
        finally:
            claims.release("texts")

    missing = [c for c in run.missing_chunks() if c in mine]
    skipped = len(mine) - len(missing)
    reported = sum(_rows(layout, c) for c in mine) - sum(_rows(layout, c) for c in missing)
    if progress:
        progress(reported)
    rows_done, image_seconds = 0, 0.0
    written: list[int] = []
    said: set[frozenset] = set()
    with claims:
        todo = missing
        while True:
            if todo:
                n, w, secs = _fill(
                    run,
                    encoder,
                    ds,
                    spec,
                    todo,
                    batch_size,
                    num_workers,
                    progress,
                    encode_texts,
                    claims,
                    max_pixels,
                    config.max_file_bytes,
                    perturbation,
                )
                rows_done, image_seconds, written = rows_done + n, image_seconds + secs, written + w
            else:
                encode_texts()
            run.reload()
            remaining = [c for c in run.missing_chunks() if c in mine]
            texts_pending = does_texts and not run.texts_done
            if not remaining and not texts_pending:
                break
            held = {k: c for k, c in claims.owners().items() if c.live}
            todo = [c for c in remaining if c not in held]
            if todo or (texts_pending and "texts" not in held):
                continue
            seen = frozenset((k, c.host, c.pid) for k, c in held.items())
            if notify and seen not in said:
                said.add(seen)
                notify(_waiting_message(held, claims.timeout))
            time.sleep(WAIT_POLL_S)
    if progress:
        progress(sum(_rows(layout, c) for c in mine) - reported - rows_done)  # rows other writers extracted meanwhile
    notes = []
    if spec.target_mpp is not None:
        unknown = int(np.isnan(row_mpp(ds)).sum())
        if unknown:
            notes.append(
                f"{unknown} of {len(ds)} rows have no pixel size (no microns_per_pixel in the metadata or the "
                f"files): they were not resampled to {spec.target_mpp:g} um/px, only fitted to the model's input"
            )
    return ExtractReport(
        run.path,
        encoder.info.spec,
        rows_done,
        len(written),
        skipped,
        texts_encoded,
        run.failures_unchecked(),
        time.perf_counter() - t0,
        image_seconds,
        chunks_by_others=len(mine) - skipped - len(written),
        repaired=list(run.repairs),
        notes=notes,
        shard=config.shard,
        perturbation=perturbation.key if perturbation is not None else None,
    )


def extract_into(
    store: EmbeddingStore,
    encoder: Encoder,
    ds: LoadedDataset,
    config: ExtractConfig,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> ExtractReport:
    """Create or reopen the run for (encoder, dataset) and fill its missing chunks: what extract,
    interpolate and repair each do once their model is loaded. With `config.perturb`, each
    perturbation is then its own run, filled the same way; the clean run comes first and is only
    extracted where it is missing (its report holds theirs in `perturbed`)."""
    allocator.tune()  # the forward pass's buffers stay in the heap (see allocator.py)
    run = prepare(store, encoder, ds, config)
    perts = parse_perturbations(config.perturb)
    if not perts:
        return run_extraction(run, encoder, ds, config, progress=progress, notify=notify)
    runs, targets = [run, *(prepare(store, encoder, ds, config, p) for p in perts)], [None, *perts]
    mine = set(shard_chunks(run.layout.n_chunks, config.shard))
    shared = extract_sweep(runs, targets, encoder, ds, PixelSpec.from_config(config), config, mine, progress)
    reports = []
    for i, (r, pert) in enumerate(zip(runs, targets, strict=True)):
        chunks, secs = shared.get(i, ([], 0.0))
        rows = sum(_rows(r.layout, c) for c in chunks)
        rep = run_extraction(
            r,
            encoder,
            ds,
            config,
            progress=_after(progress, rows),
            notify=notify,
            perturbation=pert,
            texts_from=run if pert else None,
        )
        rep.rows, rep.chunks_written, rep.chunks_skipped = (
            rep.rows + rows,
            rep.chunks_written + len(chunks),
            rep.chunks_skipped - len(chunks),
        )
        rep.image_seconds, rep.seconds = rep.image_seconds + secs, rep.seconds + secs
        reports.append(rep)
    reports[0].perturbed = reports[1:]
    return reports[0]


def _after(progress: ProgressFn | None, n: int) -> ProgressFn | None:
    """`progress` without its first n rows (reported already, by the sweep that filled them)."""
    if progress is None or n == 0:
        return progress
    left = [n]

    def advance(k: int) -> None:
        skip = min(left[0], k)
        left[0] -= skip
        if k > skip:
            progress(k - skip)

    return advance
