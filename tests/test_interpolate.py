"""Weight interpolation between two tiny random models of one architecture."""

import json

import numpy as np
import open_clip
import pytest
import torch
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.encoders import load_encoder
from mubench_probe.encoders.interpolate import Interpolator, parse_interp
from mubench_probe.errors import ModelUnavailableError
from mubench_probe.store import EmbeddingStore


def _checkpoint(path, seed, arch="mubench-tiny-vit"):
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(arch).state_dict(), path)
    return f"{arch}:{path}"


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return _checkpoint(d / "base.pt", 1), _checkpoint(d / "ft.pt", 2)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    return torch.randn(3, 3, 64, 64)  # mubench-tiny-vit takes 64 px


@pytest.mark.slow
def test_alpha_0_and_1_reproduce_the_parents(parents, batch):
    base, ft = parents
    interp = Interpolator(base, ft, torch.device("cpu"))
    texts = ["a micrograph of a platelet.", "a microscopy image of red blood cell."]
    for alpha, parent in ((0.0, base), (1.0, ft)):
        enc = interp.encoder(alpha)
        ref = load_encoder(parent, device="cpu")
        assert enc.info.weights_hash == ref.info.weights_hash
        assert np.array_equal(enc.encode_images(batch)[0], ref.encode_images(batch)[0])
        assert np.array_equal(enc.encode_texts(texts), ref.encode_texts(texts))
    assert parse_interp(enc.info.spec).alpha == 1.0 and enc.info.backend == "interpolate"


def test_alpha_half_is_the_hand_computed_average(parents):
    base, ft = parents
    a, b = torch.load(base.split(":", 1)[1]), torch.load(ft.split(":", 1)[1])
    enc = Interpolator(base, ft, torch.device("cpu")).encoder(0.5)
    got = enc.model.state_dict()
    for name, t in a.items():
        if t.is_floating_point():
            assert torch.equal(got[name], (a[name] + b[name]) / 2), name
        else:
            assert torch.equal(got[name], a[name]), name


@pytest.mark.slow
def test_registry_spec_and_saved_checkpoint_agree(parents, tmp_path):
    base, ft = parents
    spec = f"interp({base}, {ft}, 0.25)"
    enc = load_encoder(spec, device="cpu")
    interp = Interpolator(base, ft, torch.device("cpu"))
    assert interp.encoder(0.25).info.weights_hash == enc.info.weights_hash
    saved = interp.save(str(tmp_path / "a25.pt"))
    assert load_encoder(f"mubench-tiny-vit:{saved}", device="cpu").info.weights_hash == enc.info.weights_hash


def test_extrapolation_warns(parents):
    interp = Interpolator(*parents, torch.device("cpu"))
    with pytest.warns(UserWarning, match="outside"):
        interp.encoder(1.5)


def test_incompatible_models_are_refused_before_any_work(parents, tmp_path):
    cfg = json.loads(json.dumps(open_clip.get_model_config("mubench-tiny-vit")))
    cfg["vision_cfg"]["width"] = 96
    (tmp_path / "mubench-tiny-wide.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mubench-tiny-wide.json")
    other = _checkpoint(tmp_path / "wide.pt", 3, "mubench-tiny-wide")
    with pytest.raises(ModelUnavailableError, match="parameter shapes differ"):
        Interpolator(parents[0], other, torch.device("cpu"))
    store = tmp_path / "s.zarr"
    r = CliRunner().invoke(
        app,
        [
            "interpolate",
            "--base",
            parents[0],
            "--finetuned",
            other,
            "--dataset",
            "sample",
            "--limit",
            "8",
            "--store",
            str(store),
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 1 and "cannot interpolate" in r.output and "Traceback" not in r.output
    assert not (store / "zarr.json").exists() or not EmbeddingStore(store).runs()


@pytest.mark.slow
def test_alpha_sweep_end_to_end_with_curve(parents, tmp_path):
    base, ft = parents
    store = tmp_path / "s.zarr"
    r = CliRunner().invoke(
        app,
        [
            "interpolate",
            "--base",
            base,
            "--finetuned",
            ft,
            "--alphas",
            "0,0.5,1",
            "--dataset",
            "sample",
            "--limit",
            "60",
            "--store",
            str(store),
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    runs = EmbeddingStore(store).runs()
    assert sorted(parse_interp(r.model_spec).alpha for r in runs) == [0.0, 0.5, 1.0]
    cfg = api.EvalConfig(n_boot=50, shots=(1,), fewshot_seeds=1, folds=3)
    api.evaluate(store, cfg, results_dir=tmp_path / "res")
    res = api.compare(tmp_path / "res", report=tmp_path / "report.html", n_boot=50)
    assert {"alpha_curve.png", "text_cka.png"} <= {p.name for p in res.figures}
    assert res.text_cka.shape == (3, 3) and np.allclose(np.diag(res.text_cka), 1.0)
    assert "Weight interpolation" in (tmp_path / "report.html").read_text()
