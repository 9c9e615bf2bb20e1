"""Extract once: run an encoder over a dataset and write everything the heads need to the store.

Decoding, the intensity policy and preprocessing run in DataLoader worker processes; the model
runs in the main process; finished chunks are written by a background thread, so decode,
forward and write overlap. Batches never straddle a chunk, so a resumed run computes exactly
the batches an uninterrupted run would have, and its bytes are identical.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import LoadedDataset, slug
from .encoders import Encoder
from .errors import ImageDecodeError, UsageError
from .imaging import IntensityPolicy, load_rgb
from .store import EmbeddingStore, Run, RunLayout
from .tasks import DEFAULT_TEMPLATES, derive_tasks, prompt_texts, unique_texts

ProgressFn = Callable[[int], None]
PACKAGES = ("mubench-probe", "torch", "open_clip_torch", "timm", "zarr", "numpy", "datasets", "pillow")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


class ImageRows(Dataset):
    """Row i -> (i, tensor, failure reason); an unreadable image yields zeros and a reason."""

    def __init__(
        self,
        ds: LoadedDataset,
        transform: Callable[[Any], torch.Tensor],
        policy: IntensityPolicy,
        shape: tuple[int, ...],
    ) -> None:
        self.reader, self.transform, self.policy, self.shape = ds.reader, transform, policy, shape

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            img = load_rgb(self.reader.read(i), self.policy)
            return i, self.transform(img), ""
        except (ImageDecodeError, OSError, ValueError) as exc:
            return i, torch.zeros(self.shape), f"{type(exc).__name__}: {exc}"


def _lower_priority(_: int) -> None:
    """Loader workers yield the CPU to the model's threads: decode fills the idle gaps."""
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


def prepare(
    store: EmbeddingStore,
    encoder: Encoder,
    ds: LoadedDataset,
    *,
    policy: IntensityPolicy,
    chunk_rows: int = 256,
    dtype: str = "float16",
    features: bool = False,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    overwrite: bool = False,
) -> Run:
    """Create or reopen the run group for (encoder, dataset) with full provenance."""
    if chunk_rows < 1:
        raise UsageError("--chunk-rows must be at least 1")
    if dtype not in ("float16", "float32"):
        raise UsageError("--dtype must be float16 or float32")
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
        "dataset_spec": ds.spec,
        "dataset_format": ds.identity.get("format"),
        "dataset_id": ds.identity.get("id"),
        "dataset_revision": ds.identity.get("revision"),
        "dataset_fingerprint": ds.identity.get("fingerprint"),
        "dataset_limit": ds.identity.get("limit"),
        "split": ds.split,
        "versions": package_versions(),
    }
    layout = RunLayout(
        len(ds), info.embed_dim, chunk_rows, dtype, (info.feature_dim or info.embed_dim) if features else None
    )
    path = f"{slug(info.spec)}/{ds.key}/{slug(ds.split)}"
    return store.prepare_run(path, provenance, layout, ds.meta, texts, captions, plan, overwrite)


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
    dummy = torch.zeros((2, *rows.shape))
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


def _rows(layout: RunLayout, ci: int) -> int:
    sl = layout.chunk_slice(ci)
    return sl.stop - sl.start


def _fill(
    run: Run,
    encoder: Encoder,
    ds: LoadedDataset,
    policy: IntensityPolicy,
    missing: list[int],
    batch_size: int,
    num_workers: int,
    progress: ProgressFn | None,
    while_workers_start: Callable[[], None],
) -> tuple[int, float]:
    """The hot loop: decode in workers, forward here, write whole chunks in a thread.

    `while_workers_start` (the text encoding) runs after the workers have begun decoding, so
    their start-up and first batches overlap with it. Returns rows done and image-phase seconds.
    """
    layout = run.layout
    features = layout.feature_dim is not None
    dataset = ImageRows(ds, encoder.transform, policy, input_shape(encoder))
    batches = chunk_batches(layout, missing, batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_lower_priority,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    rows_done = 0
    pending: list[Future] = []
    emb_buf: list[np.ndarray] = []
    feat_buf: list[np.ndarray] = []
    fail_buf: list[str] = []
    chunks = iter(missing)
    current = next(chunks)
    threads = cpu_threads_for(encoder, dataset, batches[0][:4], num_workers)
    with ThreadPoolExecutor(max_workers=1) as writer, threads:
        t_start = time.perf_counter()
        batches_iter = iter(loader)
        while_workers_start()
        side = time.perf_counter() - t_start
        for rows, x, reasons in batches_iter:
            emb, feat = encoder.encode_images(x, features)
            bad = [i for i, r in enumerate(reasons) if r]
            emb[bad] = 0.0
            emb_buf.append(emb)
            if feat is not None:
                feat[bad] = 0.0
                feat_buf.append(feat)
            fail_buf += reasons
            rows_done += len(rows)
            if progress:
                progress(len(rows))
            if rows[-1] == layout.chunk_slice(current).stop - 1:
                pending.append(
                    writer.submit(
                        run.write_chunk,
                        current,
                        np.concatenate(emb_buf),
                        fail_buf,
                        np.concatenate(feat_buf) if feat_buf else None,
                    )
                )
                emb_buf, feat_buf, fail_buf = [], [], []
                current = next(chunks, -1)
                for f in [f for f in pending if f.done()]:
                    f.result()  # surface a write error now, not at the end
                    pending.remove(f)
    for f in pending:
        f.result()
    return rows_done, time.perf_counter() - t_start - side


def run_extraction(
    run: Run,
    encoder: Encoder,
    ds: LoadedDataset,
    *,
    policy: IntensityPolicy,
    batch_size: int = 64,
    num_workers: int = 2,
    text_batch_size: int = 256,
    progress: ProgressFn | None = None,
) -> ExtractReport:
    """Fill the missing chunks (and texts) of a prepared run. Safe to interrupt at any point."""
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    t0 = time.perf_counter()
    layout = run.layout
    texts_encoded = 0
    run.set_attrs(status="running")

    def encode_texts() -> None:
        nonlocal texts_encoded
        if encoder.has_text and not run.texts_done:
            texts = run.texts()
            run.write_text_embeddings(encoder.encode_texts(texts, text_batch_size))
            texts_encoded = len(texts)

    missing = run.missing_chunks()
    skipped = layout.n_chunks - len(missing)
    if progress:
        progress(layout.n_rows - sum(_rows(layout, c) for c in missing))
    rows_done, image_seconds = 0, 0.0
    try:
        if missing:
            rows_done, image_seconds = _fill(
                run, encoder, ds, policy, missing, batch_size, num_workers, progress, encode_texts
            )
        else:
            encode_texts()
    except BaseException:
        run.set_attrs(status="interrupted")
        raise
    failures = run.failures()
    run.set_attrs(status="complete" if run.complete else "incomplete")
    return ExtractReport(
        run.path,
        encoder.info.spec,
        rows_done,
        len(missing),
        skipped,
        texts_encoded,
        failures,
        time.perf_counter() - t0,
        image_seconds,
    )
