"""The encoder interface every backend implements, plus device and precision selection."""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import NotApplicableError, UsageError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def select_device(name: str | None = None) -> torch.device:
    """`auto` (default) picks cuda, then mps, then cpu; anything else is passed to torch.

    Under torchrun (LOCAL_RANK set), `auto` gives each rank its own GPU, cuda:LOCAL_RANK (modulo the
    GPUs visible), so `torchrun --nproc_per_node K ... --shard auto` runs one shard per device."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            rank = os.environ.get("LOCAL_RANK", "")
            if rank.isdigit():
                return torch.device("cuda", int(rank) % max(torch.cuda.device_count(), 1))
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("fp16 is for GPUs; use fp32 (or bf16) on the CPU")


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over parameter and buffer names and bytes: identifies the weights, not the file."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def memory_format_for(module: torch.nn.Module) -> torch.memory_format:
    """channels_last for convolutional networks, the default layout otherwise.

    oneDNN's NHWC convolutions ran EfficientNet-Lite0 1.32x faster on a 2-core CPU (same float32
    math, rounding-level differences; `benchmarks/forward_limit.py`); a ViT has one convolution
    (its patch embedding) and gained nothing, so transformers keep the default layout.
    """
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    return torch.channels_last if convs > 1 else torch.contiguous_format


@dataclass
class EncoderInfo:
    """Provenance recorded in the store; two runs mix only if these agree."""

    spec: str
    backend: str
    has_text: bool
    embed_dim: int
    weights_hash: str
    preprocess: str
    tokenizer: str | None = None
    context_length: int | None = None
    feature_dim: int | None = None


class Encoder(ABC):
    """An image (and maybe text) encoder that runs batches on one device."""

    info: EncoderInfo
    transform: Callable[[Any], torch.Tensor]
    device: torch.device
    precision: str = "fp32"
    memory_format: torch.memory_format = torch.contiguous_format  # set by backends (memory_format_for)

    @property
    def has_text(self) -> bool:
        return self.info.has_text

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    @abstractmethod
    def _images(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw projector output (N, D) and, when asked, pre-projection features."""

    def encode_images(self, x: torch.Tensor, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Embed a batch of preprocessed images; returns float32 arrays (not normalised)."""
        with torch.inference_mode(), self._autocast():
            emb, feat = self._images(x.to(self.device, non_blocking=True, memory_format=self.memory_format), features)
        out = emb.float().cpu().numpy()
        return out, (feat.float().cpu().numpy() if feat is not None else None)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Embed texts (raw projector output, float32); image-only encoders raise."""
        raise NotApplicableError(f"{self.info.spec} is image-only: it has no text encoder")
