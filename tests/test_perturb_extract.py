"""`probe extract --perturb`: perturbed runs with the tiny model and the bundled sample."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.config import ExtractConfig
from mubench_probe.errors import UsageError
from mubench_probe.perturb import PERTURBATIONS, Perturbation, PerturbedPlanes
from mubench_probe.store import EmbeddingStore

TINY = "mubench-tiny-vit:random"
SMALL = {"num_workers": 0, "chunk_rows": 16, "batch_size": 16}
IDENTITIES = [Perturbation(n, s.identity).key for n, s in PERTURBATIONS.items()]
CHANGED = ["blur:1", "noise:5", "rotate:90"]


@pytest.fixture(scope="module")
def small(sample):
    from mubench_probe.datasets import load_dataset

    return load_dataset("sample", limit=32)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, small):
    """The 32-row sample with every perturbation at its identity severity and three that change images."""
    path = tmp_path_factory.mktemp("perturb") / "sweep.zarr"
    report = api.extract(TINY, small, store=path, perturb=[*IDENTITIES, *CHANGED], **SMALL)
    return path, report


def _emb(run) -> bytes:
    return run.image_embeddings(normalize=False).tobytes()


def _twins(path) -> dict:
    st = EmbeddingStore(path)
    (clean,) = st.runs()
    return {"clean": clean, **{t.perturbation: t for t in st.twins(clean)}}


def test_config_and_cli_parse_perturb(tmp_path):
    cfg = ExtractConfig(perturb=("blur:1,2", "noise:inf", "blur:2"))
    assert cfg.perturb == ("blur:1", "blur:2", "noise:inf")
    assert ExtractConfig(perturb="rotate:90").perturb == ("rotate:90",)
    with pytest.raises(UsageError, match="unknown perturbation 'fog'"):
        ExtractConfig(perturb=("fog:1",))
    prov = {"chunk_rows": 16, "dtype": "float16", "perturbation": Perturbation("blur", 1.0).provenance()}
    assert ExtractConfig.from_provenance(prov).perturb == ("blur:1",)
    assert ExtractConfig.from_provenance({"chunk_rows": 16, "dtype": "float16"}).perturb == ()
    r = CliRunner().invoke(app, ["extract", "-m", TINY, "--store", str(tmp_path / "s.zarr"), "--perturb", "blur:-1"])
    assert r.exit_code == 2 and "blur severity must be in" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s.zarr").exists()


def test_plane_sources_are_perturbed_plane_by_plane():
    from mubench_probe.imaging import ArraySource

    rng = np.random.default_rng(0)
    data = rng.integers(100, 4000, (1, 3, 2, 16, 16), dtype=np.uint16)  # T, C, Z, Y, X
    src = ArraySource(data)
    drop = PerturbedPlanes(src, Perturbation("channel-drop", 2.0), "img", None)
    assert drop.shape == src.shape and drop.dtype == src.dtype
    np.testing.assert_array_equal(drop.plane(0, 0, 1), data[0, 0, 1])
    assert (drop.plane(0, 1, 0) == data[0, 1, 0].min()).all()
    noisy = PerturbedPlanes(src, Perturbation("noise", 3.0), "img", None)
    a, b = noisy.plane(0, 0, 0), noisy.plane(0, 0, 0)
    assert a.tobytes() == b.tobytes() and not np.array_equal(a, data[0, 0, 0])
    assert not np.array_equal(a - data[0, 0, 0], noisy.plane(0, 0, 1) - data[0, 0, 1])  # own seed per plane
    same = PerturbedPlanes(src, Perturbation("blur", 0.0), "img", None)
    assert same.plane(0, 2, 1).tobytes() == data[0, 2, 1].tobytes()


@pytest.mark.slow
def test_identity_severities_give_the_clean_embeddings_byte_for_byte(sweep):
    path, report = sweep
    runs = _twins(path)
    assert sorted(runs) == sorted(["clean", *IDENTITIES, *CHANGED])
    assert [r.perturbation for r in report.perturbed] == [*IDENTITIES, *CHANGED]
    clean = runs["clean"]
    for key in IDENTITIES:
        assert _emb(runs[key]) == _emb(clean), key
        assert runs[key].failures_unchecked() == clean.failures_unchecked()
    for key in CHANGED:
        assert _emb(runs[key]) != _emb(clean), key
    # the texts are the clean run's, copied (same bytes)
    twin = runs["blur:1"]
    assert twin.text_embeddings(normalize=False).tobytes() == clean.text_embeddings(normalize=False).tobytes()
    p = twin.provenance["perturbation"]
    assert p == {"name": "blur", "severity": 1.0, "key": "blur:1", "unit": p["unit"], "version": 1}
    assert p["unit"] in ("um", "px", "um (px where the pixel size is unknown)")
    assert twin.path.split("/")[0] == clean.path.split("/")[0] + "~blur_1"
    assert twin.path.split("/")[1:] == clean.path.split("/")[1:]


@pytest.mark.slow
def test_verify_info_and_listing_show_perturbed_runs(sweep):
    path, _ = sweep
    r = CliRunner().invoke(app, ["verify", str(path)])
    assert r.exit_code == 0, r.output
    st = EmbeddingStore(path)
    assert len(st.runs()) == 1 and len(st.runs(perturbed=True)) == 1 + len(IDENTITIES) + len(CHANGED)
    assert st.check(deep=True) == []
    assert len(api.store_info(path)["runs"]) == len(st.runs(perturbed=True))


@pytest.mark.slow
def test_shards_and_resume_give_the_same_bytes_and_reuse_the_clean_run(sweep, small, tmp_path):
    path, _ = sweep
    want = _twins(path)
    store = tmp_path / "sharded.zarr"
    keys = ["blur:1", "noise:5"]
    first = api.extract(TINY, small, store=store, perturb=keys, shard="0/2", **SMALL)
    assert first.chunks_written == 1 and [t.chunks_written for t in first.perturbed] == [1, 1]
    got = _twins(store)
    assert not got["blur:1"].complete  # half done: the other shard's chunks are missing
    api.extract(TINY, small, store=store, perturb=keys, shard="1/2", **SMALL)
    got = _twins(store)
    for key in ("clean", *keys):
        assert _emb(got[key]) == _emb(want[key]), key
    again = api.extract(TINY, small, store=store, perturb=[*keys, "rotate:90"], **SMALL)
    assert again.chunks_written == 0 and [t.chunks_written for t in again.perturbed] == [0, 0, 2]
    assert _emb(_twins(store)["rotate:90"]) == _emb(want["rotate:90"])


@pytest.mark.slow
def test_a_killed_perturbed_run_is_completed_by_a_rerun(sweep, small, tmp_path):
    """A rerun recomputes exactly what is missing: here the done flag of one chunk is gone, as
    if the writer had died before it (chunks are committed by their done flag)."""
    path, _ = sweep
    store = tmp_path / "resume.zarr"
    api.extract(TINY, small, store=store, perturb=["noise:5"], **SMALL)
    twin = _twins(store)["noise:5"]
    twin.clear_done(1)
    twin.reload()
    assert twin.missing_chunks() == [1]
    again = api.extract(TINY, small, store=store, perturb=["noise:5"], **SMALL)
    assert again.chunks_written == 0 and again.perturbed[0].chunks_written == 1
    assert _emb(_twins(store)["noise:5"]) == _emb(_twins(path)["noise:5"])


@pytest.mark.slow
def test_a_rotation_invariant_model_does_not_see_rotate_90(small, tmp_path):
    from mubench_probe.encoders import load_encoder
    from mubench_probe.extraction import extract_into
    from mubench_probe.testing import rotation_invariant

    base = load_encoder(TINY, device="cpu")
    cfg = ExtractConfig(perturb=("rotate:90", "rotate:180"), dtype="float32", **SMALL)

    def cosines(encoder, store):
        extract_into(EmbeddingStore(store, create=True), encoder, small, cfg)
        runs = _twins(store)
        x = runs["clean"].image_embeddings()
        return {k: (x * runs[k].image_embeddings()).sum(axis=1) for k in ("rotate:90", "rotate:180")}

    inv = cosines(rotation_invariant(base), tmp_path / "inv.zarr")
    for key, cos in inv.items():
        assert cos.min() > 1 - 1e-4, (key, cos.min())
    plain = cosines(base, tmp_path / "plain.zarr")  # the control: the plain model does see rotations
    assert plain["rotate:90"].min() < 0.999


@pytest.mark.slow
def test_a_sweep_decodes_each_row_once(small, tmp_path, monkeypatch):
    """Clean + 2 perturbations, nothing stored yet: one decode per row for all three runs, every
    row reported once per run on the progress bar, the reports add up."""
    import mubench_probe.image_rows as image_rows
    import mubench_probe.sweep as sweep

    calls = {"sweep": 0, "alone": 0}

    def counted(key, real):
        def decode(*a, **k):
            calls[key] += 1
            return real(*a, **k)

        return decode

    monkeypatch.setattr(sweep, "decode_bytes", counted("sweep", sweep.decode_bytes))
    monkeypatch.setattr(image_rows, "decode_bytes", counted("alone", image_rows.decode_bytes))
    monkeypatch.setattr(image_rows, "load_rgb", counted("alone", image_rows.load_rgb))
    seen = []
    report = api.extract(
        TINY, small, store=tmp_path / "s.zarr", perturb=["blur:1", "noise:5"], progress=seen.append, **SMALL
    )
    assert calls == {"sweep": len(small), "alone": 0}
    assert sum(seen) == 3 * len(small)
    for r in [report, *report.perturbed]:
        assert (r.rows, r.chunks_written, r.chunks_skipped, r.chunks_by_others) == (len(small), 2, 0, 0)


@pytest.mark.slow
def test_verify_repair_re_extracts_a_damaged_perturbed_run(sweep, small, tmp_path):
    path, _ = sweep
    store = tmp_path / "s.zarr"
    api.extract(TINY, small, store=store, perturb=["noise:5"], **SMALL)
    twin = _twins(store)["noise:5"]
    assert "--perturb noise:5" in api.extract_command(store, twin.record())
    (store / twin.path / "image_emb" / "c" / "0" / "0").unlink()
    assert EmbeddingStore(store).check(deep=True)
    repaired = api.repair_store(store, num_workers=0)
    assert repaired.remaining == [] and not repaired.commands
    assert _emb(_twins(store)["noise:5"]) == _emb(_twins(path)["noise:5"])


@pytest.mark.slow
def test_a_killed_loader_worker_during_a_sweep_is_one_line_and_a_rerun_completes(tmp_path, real_crops, monkeypatch):
    """A sweep's loader worker SIGKILLed (the out-of-memory killer) while decoding row 2: one line
    naming the row and file; the rerun completes every run of the sweep, identical to an uninterrupted one."""
    import os
    import signal

    from torch.utils.data import get_worker_info

    from mubench_probe.datasets.files import PathImageReader
    from mubench_probe.errors import ProbeError

    lines = ["path,label"]
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(real_crops[i])
        lines.append(f"{i}.jpg,{'ab'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    settings = {"num_workers": 1, "batch_size": 2, "chunk_rows": 2, "perturb": ["blur:1", "jpeg:20"]}
    reference = api.extract(TINY, str(tmp_path / "m.csv"), store=tmp_path / "ref.zarr", **settings)
    assert len(reference.perturbed) == 2
    read = PathImageReader.read

    def killed(self, i):
        if int(i) == 2 and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, i)

    monkeypatch.setattr(PathImageReader, "read", killed)
    with pytest.raises(ProbeError, match=r"while decoding row 2 \(file 2\.jpg\).*rerun the same command") as exc:
        api.extract(TINY, str(tmp_path / "m.csv"), store=tmp_path / "s.zarr", **settings)
    assert "\n" not in str(exc.value)
    monkeypatch.setattr(PathImageReader, "read", read)
    api.extract(TINY, str(tmp_path / "m.csv"), store=tmp_path / "s.zarr", **settings)
    want, got = _twins(tmp_path / "ref.zarr"), _twins(tmp_path / "s.zarr")
    assert sorted(got) == sorted(want) == ["blur:1", "clean", "jpeg:20"]
    for key in want:
        assert _emb(got[key]) == _emb(want[key]), key


@pytest.mark.cluster
def test_the_local_launcher_extracts_the_perturbed_runs_too(sweep, tmp_path):
    path, _ = sweep
    store = tmp_path / "launched.zarr"
    args = ["extract", "-m", TINY, "--dataset", "sample", "--limit", "32", "--store", str(store), "--workers", "0"]
    args += ["--chunk-rows", "16", "--batch-size", "16", "--perturb", "blur:1", "--launcher", "local", "--shards", "2"]
    r = CliRunner().invoke(app, [*args, "--log-dir", str(tmp_path / "logs")])
    assert r.exit_code == 0, r.output
    for i in range(2):
        assert f"shard {i}/2 {TINY} ~ blur:1: 1 chunks written" in r.output, r.output
    want, got = _twins(path), _twins(store)
    assert sorted(got) == ["blur:1", "clean"]
    for key in got:
        assert _emb(got[key]) == _emb(want[key]), key
