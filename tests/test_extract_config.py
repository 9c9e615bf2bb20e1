"""ExtractConfig.from_provenance: the one way back from a run's provenance to the settings that made it."""

from __future__ import annotations

import dataclasses

import pytest

from mubench_probe import api
from mubench_probe.config import ExtractConfig
from mubench_probe.imaging import PixelSpec
from mubench_probe.store import EmbeddingStore

from .conftest import TINY

# Settings that change no stored value: they come from the config a repair runs with, not the run.
FORWARD_PASS = ("batch_size", "num_workers", "device", "precision", "claim_timeout", "shard", "overwrite")


def _stored(cfg: ExtractConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FORWARD_PASS}


def test_an_extract_config_round_trips_through_a_run_provenance(sample, tmp_path):
    cfg = ExtractConfig(
        num_workers=0,
        batch_size=16,
        chunk_rows=16,
        dtype="float32",
        features=True,
        intensity="minmax",
        templates=("a {} cell.", "a blood smear showing a {}."),
        max_pixels=10_000_000,
        max_file_bytes=1 << 20,
        target_mpp=0.5,
    )
    api.extract(TINY, "sample", store=tmp_path / "s.zarr", config=cfg, limit=24)
    (run,) = EmbeddingStore(tmp_path / "s.zarr").runs()
    back = ExtractConfig.from_provenance(run.provenance, run.prompts()["templates"])
    assert _stored(back) == _stored(cfg)
    base = ExtractConfig(batch_size=3, num_workers=1, device="cpu")
    again = ExtractConfig.from_provenance(run.provenance, run.prompts()["templates"], base)
    assert _stored(again) == _stored(cfg) and (again.batch_size, again.num_workers, again.device) == (3, 1, "cpu")
    assert "--max-file-bytes 1048576" in api.extract_command(tmp_path / "s.zarr", run.record())


@pytest.mark.parametrize(
    "pixels",
    [
        {},
        {"channels": ("0", "2"), "channel_mode": "composite", "z": "max", "t": "index:1", "target_mpp": 0.25},
        {"channels": ("DNA", "Mito", "ER", "RNA"), "channel_mode": "each", "z": "middle"},
    ],
)
def test_the_pixel_settings_round_trip_as_extraction_records_them(pixels):
    """The multi-dimensional settings go through the record `prepare` writes (PixelSpec.provenance)."""
    cfg = ExtractConfig(**pixels)
    provenance = {"chunk_rows": cfg.chunk_rows, "dtype": cfg.dtype, "pixels": PixelSpec.from_config(cfg).provenance()}
    assert ExtractConfig.from_provenance(provenance) == cfg
