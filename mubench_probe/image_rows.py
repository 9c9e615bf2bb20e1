"""What a loader worker does for one row: read, decode, perturb (for a perturbed run), apply the
intensity policy and the model's preprocessing; an unreadable image becomes a failed row, not an error."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from . import allocator
from .config import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from .datasets import LoadedDataset, reads_planes, row_source
from .datasets.base import limit_file_size, row_file_name
from .encoders import Encoder
from .errors import ImageDecodeError
from .imaging import IntensityPolicy, PixelSpec, decode_bytes, load_rgb, render, stable_message, to_rgb
from .loader_deaths import WorkerRows
from .perturb import Perturbation, PerturbedPlanes


def row_mpp(ds: LoadedDataset) -> np.ndarray:
    """Each row's physical pixel size in µm (NaN where unknown), from `microns_per_pixel`."""
    if "microns_per_pixel" not in ds.meta.columns:
        return np.full(len(ds), np.nan, dtype=np.float32)
    mpp = pd.to_numeric(ds.meta["microns_per_pixel"], errors="coerce").to_numpy(dtype=np.float32)
    return np.where(mpp > 0, mpp, np.nan).astype(np.float32)


def image_ids(ds: LoadedDataset) -> list[str]:
    """What seeds each row's perturbation: its `image_id`, else its row number (stable across processes)."""
    if "image_id" in ds.meta.columns:
        return [str(v) for v in ds.meta["image_id"]]
    return [str(i) for i in range(len(ds))]


def failure_reason(exc: BaseException, file_name: str | None) -> str:
    """The stored reason of a failed row: the error's type and text (object reprs removed) and
    the row's file when the text does not name it already. The same bytes in every run."""
    text = stable_message(exc)
    if file_name and file_name not in text:
        text += f" (file {file_name})"
    return f"{type(exc).__name__}: {text}"


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
        perturbation: Perturbation | None = None,
    ) -> None:
        self.reader = limit_file_size(ds.reader, max_file_bytes)
        self.transform, self.policy, self.shape = transform, policy, shape
        self.max_pixels = max_pixels
        self.spec = spec or PixelSpec(policy, max_pixels=max_pixels)
        self.k = self.spec.n_images
        self.legacy = self.spec.is_default and not reads_planes(self.reader)
        self.mpp = row_mpp(ds) if self.spec.target_mpp is not None else None
        self.item_shape = (self.k, *shape) if self.spec.channel_mode == "each" else shape
        self.perturbation = perturbation
        if perturbation is not None:  # seeds come from image ids; blur converts µm with the pixel size
            self.ids = image_ids(ds)
            self.row_mpp = row_mpp(ds)

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
        if self.legacy and self.perturbation is None:
            return self.transform(load_rgb(self.reader.read(i), self.policy, self.max_pixels))
        raw = decode_bytes(self.reader.read(i), self.max_pixels) if self.legacy else None
        return self.model_input(i, self.perturbation, raw)

    def model_input(self, i: int, pert: Perturbation | None, raw: np.ndarray | None) -> torch.Tensor:
        """Row i's model input under `pert` (None: clean). `raw` is the decoded image of a single 2-D
        image (perturbed in its own dtype, then the intensity policy: decoded once for a whole sweep);
        None reads the row's planes, each perturbed as it is read, and renders them."""
        if raw is not None:
            img = raw if pert is None else pert(raw, self.ids[i], float(self.row_mpp[i]))
            return self.transform(to_rgb(img, self.policy))
        src: Any = row_source(self.reader, i, self.max_pixels)
        if pert is not None:
            src = PerturbedPlanes(src, pert, self.ids[i], float(self.row_mpp[i]))
        mpp = float(self.mpp[i]) if self.mpp is not None else None
        images = render(src, self.spec, mpp, tuple(self.shape[-2:]))  # type: ignore[arg-type]
        if self.spec.channel_mode == "each":
            return torch.stack([self.transform(im) for im in images])
        return self.transform(images[0])


@contextmanager
def cpu_threads_for(
    encoder: Encoder, rows: ImageRows, sample_rows: Sequence[int], num_workers: int, forwards: int = 1
) -> Iterator[int]:
    """On a CPU, give cores to the decode workers when the model is faster than the loader.

    Torch's intra-op threads and the DataLoader workers share the same cores; idle torch threads
    spin and steal them. Before the loop we time a forward of a few dummy inputs (all threads,
    no workers running yet) and the decode+preprocess of a few real rows in this process: if
    the workers together produce images slower than the model consumes them, the run is
    data-bound and torch keeps only the cores the workers leave free. A model-bound run keeps
    every thread. The previous setting is restored afterwards. `forwards`: model inputs per row
    (a sweep's row is one decode and that many forwards).
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
    per_image_model = (time.perf_counter() - t0) / len(dummy) * forwards
    data_bound = per_image_model < per_image_data / num_workers
    threads = max(1, min(before, cores - num_workers)) if data_bound else before
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


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


def input_shape(encoder: Encoder) -> tuple[int, ...]:
    """The tensor shape the encoder's transform produces (used for failed rows' placeholders)."""
    from PIL import Image

    return tuple(encoder.transform(Image.new("RGB", (32, 32))).shape)
