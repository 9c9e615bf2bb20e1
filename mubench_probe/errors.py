"""One exception hierarchy: the CLI turns any ProbeError into a one-line message and exit code."""

from __future__ import annotations


class ProbeError(Exception):
    """Base class for every error a user can cause (bad path, model, data, store)."""

    exit_code = 1


class UsageError(ProbeError):
    """Arguments that cannot work together or are out of range."""

    exit_code = 2


class ModelUnavailableError(ProbeError):
    """A model spec that names no known backend, or weights that cannot be loaded."""


class DatasetUnavailableError(ProbeError):
    """A dataset spec that cannot be resolved or read."""


class ImageDecodeError(ProbeError):
    """One image could not be decoded; extraction records it and moves on."""


class StoreError(ProbeError):
    """A store that is missing, corrupt, or does not hold what was asked for."""


class ProvenanceMismatchError(StoreError):
    """Extracting into a group built from other weights, preprocessing or data."""


class StoreDamageError(StoreError):
    """Store content that fails an integrity check: damaged metadata, forged provenance, half-created run."""


class CorruptChunkError(StoreDamageError):
    """A chunk that is missing although flagged done, or whose checksum does not match."""


class NotApplicableError(ProbeError):
    """A head needs something this model or dataset does not have (e.g. text for an image-only model)."""


class NothingToEvaluateError(ProbeError):
    """Every task was skipped (or none matched): no number could be computed."""

    exit_code = 3


class LoaderWorkerDiedError(ProbeError):
    """A data loader worker process died (the out-of-memory killer, a crashing decoder): the
    chunks finished before are kept and rerunning the same command resumes."""


class NotFoundError(StoreError):
    """A run or row the store does not hold (`probe browse` answers 404 for it)."""
