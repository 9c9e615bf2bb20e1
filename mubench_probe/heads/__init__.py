"""Heads over arrays (no I/O, no models): zero-shot, linear probe, kNN, prototypes, metrics."""

from .knn import KNNHead
from .linear import LinearProbe
from .zeroshot import CosineClassifier, PromptZeroShot, PrototypeHead, caption_choice, ensemble_weights

__all__ = [
    "CosineClassifier",
    "KNNHead",
    "LinearProbe",
    "PromptZeroShot",
    "PrototypeHead",
    "caption_choice",
    "ensemble_weights",
]
