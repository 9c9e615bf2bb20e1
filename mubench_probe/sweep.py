"""A perturbation sweep with one decode per row: the runs of `--perturb` (and the clean run when it
is missing too) filled together.

Extracting each perturbed run on its own reads and decodes every image once per run. Here a
loader worker reads and decodes a row once and returns the model input of every run of the
sweep; the main process then runs the model over each run's batch *separately*, with the same
rows per batch as a single run's extraction, so every stored byte is the one `run_extraction`
alone would write (a resumed or sharded run mixes the two paths freely). Chunks are claimed in
every run of the sweep before their first batch; one that any run cannot claim (another writer
holds it) is left to the per-run extraction that follows, which also waits for other writers,
encodes or copies the texts and reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np
import torch
from torch.utils.data import DataLoader

from .claims import ChunkClaims
from .config import ExtractConfig
from .datasets import LoadedDataset
from .datasets.base import row_file_name
from .encoders import Encoder
from .errors import ImageDecodeError, LoaderWorkerDiedError
from .image_rows import ImageRows, _worker_init, cpu_threads_for, failure_reason, image_ids, input_shape, row_mpp
from .imaging import PixelSpec, decode_bytes
from .loader_deaths import WorkerRows, dead_workers, stop_workers, worker_death
from .perturb import Perturbation
from .store import Run, RunLayout

MAX_SWEEP = 8  # runs decoded together at most: a batch in flight holds this many model inputs per row


class SweepRows(ImageRows):
    """Row i -> (i, (G, 3, H, W) model inputs, G failure reasons), one per target (None: clean)."""

    def __init__(self, rows: ImageRows, targets: Sequence[Perturbation | None], ds: LoadedDataset) -> None:
        self.__dict__.update(rows.__dict__)
        self.targets = list(targets)
        self.ids, self.row_mpp = image_ids(ds), row_mpp(ds)
        self.item_shape = (len(self.targets), *rows.shape)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, tuple[str, ...]]:  # type: ignore[override]
        if self.watch is not None:
            self.watch.start(i)
        try:
            try:
                raw = decode_bytes(self.reader.read(i), self.max_pixels) if self.legacy else None
            except (ImageDecodeError, OSError, ValueError) as exc:
                reason = failure_reason(exc, row_file_name(self.reader, i))
                return i, torch.zeros(self.item_shape), (reason,) * len(self.targets)
            outs, reasons = [], []
            for pert in self.targets:
                try:
                    outs.append(self.model_input(i, pert, raw))
                    reasons.append("")
                except (ImageDecodeError, OSError, ValueError) as exc:
                    outs.append(torch.zeros(self.shape))
                    reasons.append(failure_reason(exc, row_file_name(self.reader, i)))
            return i, torch.stack(outs), tuple(reasons)
        finally:
            if self.watch is not None:
                self.watch.finish()


def _collate(items: list) -> tuple[list[int], torch.Tensor, list[tuple[str, ...]]]:
    rows, xs, reasons = zip(*items, strict=True)
    return list(rows), torch.stack(xs), list(reasons)


class SweepBatches:
    """Batches of the chunks every run of the sweep could claim (each claimed right before dispatch)."""

    def __init__(self, runs: Sequence[Run], claims: Sequence[ChunkClaims], chunks: Sequence[int], batch_size: int):
        self.runs, self.claims, self.chunks, self.batch_size = list(runs), list(claims), list(chunks), batch_size
        self.dispatched: list[tuple[int, int]] = []

    def _claim_all(self, ci: int) -> bool:
        taken: list[ChunkClaims] = []
        for run, claims in zip(self.runs, self.claims, strict=True):
            if not claims.try_claim(ci) or run.chunk_done(ci):
                if claims.owns(ci):
                    claims.release(ci)
                for c in taken:
                    c.release(ci)
                return False
            taken.append(claims)
        return True

    def __iter__(self) -> Iterator[list[int]]:
        layout = self.runs[0].layout
        for ci in self.chunks:
            if not self._claim_all(ci):
                continue
            sl = layout.chunk_slice(ci)
            for s in range(sl.start, sl.stop, self.batch_size):
                batch = list(range(s, min(s + self.batch_size, sl.stop)))
                self.dispatched.append((batch[0], batch[-1]))
                yield batch


def sweep_groups(runs: Sequence[Run], mine: set[int], each: bool) -> list[list[int]]:
    """Indices of runs to fill together: those missing the same chunks of this shard (at most
    MAX_SWEEP at a time, two or more). `--channel-mode each` runs are filled one by one."""
    if each:
        return []
    by_missing: dict[tuple[int, ...], list[int]] = {}
    for i, run in enumerate(runs):
        missing = tuple(c for c in run.missing_chunks() if c in mine)
        if missing:
            by_missing.setdefault(missing, []).append(i)
    groups = []
    for members in by_missing.values():
        groups += [members[k : k + MAX_SWEEP] for k in range(0, len(members), MAX_SWEEP)]
    return [g for g in groups if len(g) > 1]


def fill_sweep(
    runs: Sequence[Run],
    targets: Sequence[Perturbation | None],
    claims: Sequence[ChunkClaims],
    encoder: Encoder,
    ds: LoadedDataset,
    spec: PixelSpec,
    chunks: list[int],
    batch_size: int,
    num_workers: int,
    max_file_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], float]:
    """Fill `chunks` of every run, one decode per row: returns the chunks written per run and the
    image-phase seconds. The loop of `extraction._fill`, with G model inputs per row."""
    layout: RunLayout = runs[0].layout
    features = layout.feature_dim is not None
    g = len(runs)
    base = ImageRows(ds, encoder.transform, spec.policy, input_shape(encoder), spec.max_pixels, spec, max_file_bytes)
    dataset = SweepRows(base, targets, ds)
    if num_workers > 0:
        dataset.watch = WorkerRows(num_workers)
    sampler = SweepBatches(runs, claims, chunks, batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=max(2, 8 // g) if num_workers > 0 else None,
    )
    written: list[list[int]] = [[] for _ in range(g)]
    bufs: list[tuple[list[np.ndarray], list[np.ndarray], list[str]]] = [([], [], []) for _ in range(g)]
    pending: list[Future] = []

    def write(k: int, ci: int, emb: np.ndarray, reasons: list[str], feat: np.ndarray | None) -> None:
        if not claims[k].owns(ci):  # taken over (we looked dead): the new owner writes it
            return
        runs[k].write_chunk(ci, emb, reasons, feat, None)
        claims[k].record_written(ci)
        written[k].append(ci)
        claims[k].release(ci)

    received = 0
    first = layout.chunk_slice(chunks[0])
    threads = cpu_threads_for(encoder, dataset, list(range(first.start, first.stop))[:2], num_workers, g)
    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as writer, threads:
        batches_iter = None
        try:
            batches_iter = iter(loader)
            for rows, x, reasons in batches_iter:
                received += 1
                ci = rows[0] // layout.chunk_rows
                last = rows[-1] == layout.chunk_slice(ci).stop - 1
                for k in range(g):  # each run's batch through the model on its own: the same bytes as alone
                    emb, feat = encoder.encode_images(x[:, k].contiguous(), features)
                    bad = [i for i, r in enumerate(reasons) if r[k]]
                    emb[bad] = 0.0
                    embs, feats, fails = bufs[k]
                    embs.append(emb)
                    if feat is not None:
                        feat[bad] = 0.0
                        feats.append(feat)
                    fails += [r[k] for r in reasons]
                    if last:
                        chunk_feat = np.concatenate(feats) if feats else None
                        pending.append(writer.submit(write, k, ci, np.concatenate(embs), fails, chunk_feat))
                        bufs[k] = ([], [], [])
                if progress:
                    progress(len(rows) * g)
                for f in [f for f in pending if f.done()]:
                    f.result()  # surface a write error now, not at the end
                    pending.remove(f)
        except RuntimeError as exc:  # torch's report of a dead worker
            dead = dead_workers(exc)
            if dead is None:
                raise
            codes = stop_workers(batches_iter)
            raise LoaderWorkerDiedError(worker_death(*dead, codes, dataset, sampler.dispatched[received:])) from None
        for f in pending:
            f.result()
    return written, time.perf_counter() - t_start


def extract_sweep(
    runs: Sequence[Run],
    targets: Sequence[Perturbation | None],
    encoder: Encoder,
    ds: LoadedDataset,
    spec: PixelSpec,
    config: ExtractConfig,
    mine: set[int],
    progress: Callable[[int], None] | None = None,
) -> dict[int, tuple[list[int], float]]:
    """Fill the runs that miss the same chunks together (`sweep_groups`); returns, per run index,
    the chunks written and its share of the image-phase seconds."""
    out: dict[int, tuple[list[int], float]] = {}
    for group in sweep_groups(runs, mine, spec.channel_mode == "each"):
        members = [runs[i] for i in group]
        chunks = [c for c in members[0].missing_chunks() if c in mine]
        with ExitStack() as stack:
            claims = [stack.enter_context(r.claims(config.claim_timeout)) for r in members]
            if config.shard is not None:
                for c in claims:
                    c.note_shards(config.shard[1])
            written, secs = fill_sweep(
                members,
                [targets[i] for i in group],
                claims,
                encoder,
                ds,
                spec,
                chunks,
                config.batch_size,
                config.num_workers,
                config.max_file_bytes,
                progress,
            )
        for i, w in zip(group, written, strict=True):
            out[i] = (w, secs / len(group))
    return out
