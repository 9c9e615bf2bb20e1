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
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from . import allocator
from .claims import HOST, ChunkClaims, ClaimInfo
from .config import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, ExtractConfig, package_versions, shard_of
from .datasets import LoadedDataset, reads_planes, row_source, slug
from .datasets.base import limit_file_size, row_file_name
from .encoders import Encoder
from .errors import ImageDecodeError, LoaderWorkerDiedError
from .imaging import IntensityPolicy, PixelSpec, get_policy, load_rgb, render, stable_message
from .store import EmbeddingStore, Run, RunLayout, l2_normalize
from .tasks import derive_tasks, prompt_texts, unique_texts

ProgressFn = Callable[[int], None]
NotifyFn = Callable[[str], None]
WAIT_POLL_S = 0.25  # how often a writer looks again at chunks other writers hold


def row_mpp(ds: LoadedDataset) -> np.ndarray:
    """Each row's physical pixel size in µm (NaN where unknown), from `microns_per_pixel`."""
    if "microns_per_pixel" not in ds.meta.columns:
        return np.full(len(ds), np.nan, dtype=np.float32)
    mpp = pd.to_numeric(ds.meta["microns_per_pixel"], errors="coerce").to_numpy(dtype=np.float32)
    return np.where(mpp > 0, mpp, np.nan).astype(np.float32)


def failure_reason(exc: BaseException, file_name: str | None) -> str:
    """The stored reason of a failed row: the error's type and text (object reprs removed) and
    the row's file when the text does not name it already. The same bytes in every run."""
    text = stable_message(exc)
    if file_name and file_name not in text:
        text += f" (file {file_name})"
    return f"{type(exc).__name__}: {text}"


class WorkerRows:
    """Which row each loader worker is decoding, in memory shared with the workers: a worker
    killed by the out-of-memory killer says nothing, so the main process looks here to name
    the row it died on."""

    def __init__(self, workers: int) -> None:
        self.pids = multiprocessing.RawArray("q", max(1, workers))
        self.rows = multiprocessing.RawArray("q", max(1, workers))  # row + 1; 0: between rows

    def start(self, i: int) -> None:
        info = get_worker_info()
        if info is not None:
            self.pids[info.id], self.rows[info.id] = os.getpid(), int(i) + 1

    def finish(self) -> None:
        info = get_worker_info()
        if info is not None:
            self.rows[info.id] = 0

    def rows_of(self, pids: set[int]) -> list[int]:
        """The rows the workers with these pids were decoding when they stopped."""
        return sorted(self.rows[w] - 1 for w in range(len(self.pids)) if self.pids[w] in pids and self.rows[w])


class ImageRows(Dataset):
    """Row i -> (i, tensor, failure reason); an unreadable image yields zeros and a reason.

    The tensor is one preprocessed image, or (K, 3, H, W) with `--channel-mode each`. Single 2-D
    images with the default pixel settings take the original bytes -> RGB path; everything else
    (bioio files, channels, stacks, a target pixel size) goes through `imaging.render`. Files
    over `max_file_bytes` (and anything but regular files) are failed rows, never read.
    """

    watch: WorkerRows | None = None  # set by the extraction loop: rows in progress per loader worker

    def __init__(
        self,
        ds: LoadedDataset,
        transform: Callable[[Any], torch.Tensor],
        policy: IntensityPolicy,
        shape: tuple[int, ...],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        spec: PixelSpec | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        self.reader = limit_file_size(ds.reader, max_file_bytes)
        self.transform, self.policy, self.shape = transform, policy, shape
        self.max_pixels = max_pixels
        self.spec = spec or PixelSpec(policy, max_pixels=max_pixels)
        self.k = self.spec.n_images
        self.legacy = self.spec.is_default and not reads_planes(self.reader)
        self.mpp = row_mpp(ds) if self.spec.target_mpp is not None else None
        self.item_shape = (self.k, *shape) if self.spec.channel_mode == "each" else shape

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        if self.watch is not None:
            self.watch.start(i)
        try:
            return i, self._tensor(i), ""
        except (ImageDecodeError, OSError, ValueError) as exc:
            return i, torch.zeros(self.item_shape), failure_reason(exc, row_file_name(self.reader, i))
        finally:
            if self.watch is not None:
                self.watch.finish()

    def _tensor(self, i: int) -> torch.Tensor:
        if self.legacy:
            return self.transform(load_rgb(self.reader.read(i), self.policy, self.max_pixels))
        src = row_source(self.reader, i, self.max_pixels)
        mpp = float(self.mpp[i]) if self.mpp is not None else None
        images = render(src, self.spec, mpp, tuple(self.shape[-2:]))  # type: ignore[arg-type]
        if self.spec.channel_mode == "each":
            return torch.stack([self.transform(im) for im in images])
        return self.transform(images[0])


def _worker_init(worker: int) -> None:
    """Loader workers keep the allocator settings and yield the CPU to the model's threads
    (decode fills the idle gaps)."""
    allocator.worker_init(worker)
    try:
        os.nice(10)
    except OSError:  # not permitted on some systems; priority is an optimisation only
        return


def _collate(items: list[tuple[int, torch.Tensor, str]]) -> tuple[list[int], torch.Tensor, list[str]]:
    rows, xs, reasons = zip(*items, strict=True)
    return list(rows), torch.stack(xs), list(reasons)


def chunk_batches(layout: RunLayout, chunks: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row batches for the given chunks; no batch crosses a chunk boundary."""
    out = []
    for ci in chunks:
        sl = layout.chunk_slice(ci)
        out += [list(range(s, min(s + batch_size, sl.stop))) for s in range(sl.start, sl.stop, batch_size)]
    return out


def input_shape(encoder: Encoder) -> tuple[int, ...]:
    """The tensor shape the encoder's transform produces (used for failed rows' placeholders)."""
    from PIL import Image

    return tuple(encoder.transform(Image.new("RGB", (32, 32))).shape)


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

    @property
    def images_per_second(self) -> float:
        """Throughput of the image phase (loader start to last chunk written)."""
        return 0.0 if self.image_seconds <= 0 else self.rows / self.image_seconds


def caption_tables(ds: LoadedDataset, text_index: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per caption key: (N, K) option text indices (-1 pad) and the answer index (-1 if null)."""
    out = {}
    for key, items in ds.captions.items():
        k = max((len(it.options) for it in items if it is not None), default=1)
        options = np.full((len(items), k), -1, dtype=np.int32)
        answer = np.full(len(items), -1, dtype=np.int32)
        for i, it in enumerate(items):
            if it is None or not 0 <= it.answer_idx < len(it.options):
                continue
            options[i, : len(it.options)] = [text_index[o] for o in it.options]
            answer[i] = it.answer_idx
        out[key] = (options, answer)
    return out


def plan_texts(ds: LoadedDataset, templates: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Every unique text the heads need, and the class-prompt plan (task -> classes)."""
    tasks = derive_tasks(ds.meta)
    options = (it.options for items in ds.captions.values() for it in items if it is not None)
    prompts = (t for task in tasks for row in prompt_texts(task.classes, templates) for t in row)
    texts = unique_texts([prompts, (o for opts in options for o in opts)])
    plan = {"templates": list(templates), "tasks": {t.name: list(t.classes) for t in tasks}}
    return texts, plan


def prepare(store: EmbeddingStore, encoder: Encoder, ds: LoadedDataset, config: ExtractConfig) -> Run:
    """Create or reopen (and repair) the run group for (encoder, dataset) with full provenance.

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
    feature_dim = (info.feature_dim or info.embed_dim) if config.features else None
    channels = spec.n_images if spec.channel_mode == "each" else 0
    layout = RunLayout(len(ds), info.embed_dim, config.chunk_rows, config.dtype, feature_dim, channels)
    path = f"{slug(info.spec)}/{ds.key}/{slug(ds.split)}"
    return store.prepare_run(path, provenance, layout, ds.meta, texts, captions, plan, config.overwrite)


@contextmanager
def cpu_threads_for(encoder: Encoder, rows: ImageRows, sample_rows: Sequence[int], num_workers: int):
    """On a CPU, give cores to the decode workers when the model is faster than the loader.

    Torch's intra-op threads and the DataLoader workers share the same cores; idle torch threads
    spin and steal them. Before the loop we time a forward of a few dummy inputs (all threads,
    no workers running yet) and the decode+preprocess of a few real rows in this process: if
    the workers together produce images slower than the model consumes them, the run is
    data-bound and torch keeps only the cores the workers leave free. A model-bound run keeps
    every thread. The previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    if encoder.device.type != "cpu" or num_workers == 0 or before <= 1 or not sample_rows:
        yield before
        return
    t0 = time.perf_counter()
    for i in sample_rows:
        rows[i]
    per_image_data = (time.perf_counter() - t0) / len(sample_rows)
    dummy = torch.zeros((2, *rows.shape))  # one image each, whatever the channel mode
    encoder.encode_images(dummy[:1])  # warm-up
    t0 = time.perf_counter()
    encoder.encode_images(dummy)
    per_image_model = (time.perf_counter() - t0) / len(dummy)
    data_bound = per_image_model < per_image_data / num_workers
    threads = max(1, min(before, cores - num_workers)) if data_bound else before
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


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


_WORKER_DIED = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (?:is )?([^.\n]*)")


def _dead_workers(exc: RuntimeError) -> tuple[set[int], str] | None:
    """(pids, cause) from torch's report of dead loader workers; None if `exc` is something else."""
    m = _WORKER_DIED.search(str(exc))
    return None if m is None else ({int(p) for p in re.findall(r"\d+", m.group(1))}, m.group(2).strip())


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _worker_death(
    pids: set[int], cause: str, exit_codes: dict[int, int | None], rows: ImageRows, in_flight: list[tuple[int, int]]
) -> str:
    """One line for dead loader workers: how they died, the row each died on and its file, and
    that a rerun resumes. A negative exit code is the signal (torch does not always say)."""
    signals = sorted({-c for p, c in exit_codes.items() if p in pids and c is not None and c < 0})
    if signals:
        cause = "killed by " + ", ".join(_signal_name(n) for n in signals)
    dead = rows.watch.rows_of(pids) if rows.watch is not None else []
    if dead:
        where = ", ".join(
            f"row {r} (file {name})" if (name := row_file_name(rows.reader, r)) else f"row {r}" for r in dead
        )
    elif in_flight:
        where = f"one of rows {in_flight[0][0]}-{in_flight[-1][1]}"
    else:
        where = "a row"
    oom = "the out-of-memory killer sends SIGKILL: fewer --workers or a smaller --batch-size need less memory; "
    return (
        f"a data loader worker (pid {', '.join(map(str, sorted(pids)))}) died ({cause}) while decoding {where}; "
        f"{oom if 'SIGKILL' in cause or 'Killed' in cause else ''}"
        "finished chunks are saved: rerun the same command to resume"
    )


def _stop_workers(batches: Any) -> dict[int, int | None]:
    """Shut a DataLoader's workers down now, and return their exit codes by pid. Torch otherwise
    keeps watching the dead worker until the iterator is collected, and would raise its error
    again at every later child exit (`_shutdown_workers` and `_workers` are torch's own)."""
    stop = getattr(batches, "_shutdown_workers", None)
    if callable(stop):
        try:
            stop()
        except RuntimeError:  # another worker's exit re-reported the dead one; the workers are stopped by now
            pass
    return {w.pid: w.exitcode for w in getattr(batches, "_workers", ())}


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
    dataset = ImageRows(ds, encoder.transform, spec.policy, input_shape(encoder), max_pixels, spec, max_file_bytes)
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
            dead = _dead_workers(exc)
            if dead is None:
                raise
            codes = _stop_workers(batches_iter)
            batches_iter = None
            raise LoaderWorkerDiedError(_worker_death(*dead, codes, dataset, sampler.dispatched[received:])) from None
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
) -> ExtractReport:
    """Fill the missing chunks (and texts) of a prepared run. Safe to interrupt at any point,
    and safe to run in several processes at once: they split the chunks through claims."""
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
    rows_done, image_seconds, written = 0, 0.0, []
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
    interpolate and repair each do once their model is loaded."""
    allocator.tune()  # the forward pass's buffers stay in the heap (see allocator.py)
    run = prepare(store, encoder, ds, config)
    return run_extraction(run, encoder, ds, config, progress=progress, notify=notify)
