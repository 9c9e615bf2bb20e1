import pytest
from typer.testing import CliRunner

from mubench_probe.cli import app

from .conftest import TINY

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def test_extract_and_info_on_the_sample(tmp_path):
    store = str(tmp_path / "s.zarr")
    r = _run("extract", "--dataset", "sample", "--model", TINY, "--limit", "40", "--store", store, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "2 chunks written" not in r.output and "1 chunks written" in r.output
    r = _run("info", store, "--verify")
    assert r.exit_code == 0, r.output
    assert "model mubench-tiny-vit:random" in r.output and "every chunk matches" in r.output
    r = _run("info", store, "--json")
    assert r.exit_code == 0 and '"complete": true' in r.output
    r = _run("extract", "--dataset", "sample", "--model", TINY, "--limit", "40", "--store", store)
    assert r.exit_code == 0 and "0 chunks written, 1 already done" in r.output


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["extract", "--dataset", "/no/such/folder", "--model", TINY], "cannot tell what dataset", 1),
        (["extract", "--dataset", "sample", "--model", "NoSuchArch:random"], "unknown open_clip architecture", 1),
        (["extract", "--dataset", "sample", "--model", "bogus"], "no backend takes model spec", 1),
        (["extract", "--dataset", "sample", "--model", "ViT-B-32:/no/weights.pt"], "does not exist", 1),
        (["extract", "--dataset", "sample", "--model", "ViT-B-32:laion2b_s34b_b79k"], "ARCH:/path/to/weights", 1),
        (["extract", "--dataset", "sample", "--model", "hf-hub:wisdomik/QuiltNet-B-32"], "could not load weights", 1),
        (["extract", "--dataset", "sample", "--model", TINY, "--intensity", "gamma"], "unknown intensity", 2),
        (["extract", "--dataset", "sample", "--model", TINY, "--device", "cuda"], "no CUDA GPU", 2),
        (["extract", "--dataset", "sample", "--model", TINY, "--templates", "/no/file.txt"], "does not exist", 2),
        (["info", "/no/store.zarr"], "no store at", 1),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, needle, code, tmp_path):
    r = _run(*args, *(["--store", str(tmp_path / "s.zarr")] if args[0] == "extract" else []))
    assert r.exit_code == code, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


def test_verify_reports_damage_with_exit_code(tiny_store_copy):
    chunk = tiny_store_copy / "mubench-tiny-vit_random/sample/test/image_emb/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    r = _run("verify", str(tiny_store_copy))
    assert r.exit_code == 1 and "image_emb chunk 0.0" in r.output and "Traceback" not in r.output


def test_models_and_datasets_list(tmp_path):
    r = _run("models")
    assert r.exit_code == 0 and "hf-hub:microsoft/BiomedCLIP" in r.output and "efficientnet-lite0" in r.output
    r = _run("datasets")
    assert r.exit_code == 0 and "sample" in r.output and "csv" in r.output


def test_ctrl_c_and_os_errors_are_one_line(monkeypatch, tmp_path):
    from mubench_probe import api

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _run("extract", "--dataset", "sample", "--model", TINY, "--limit", "4", "--store", str(blocker / "s.zarr"))
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "extract", interrupted)
    r = _run("extract", "--dataset", "sample", "--model", TINY, "--store", str(tmp_path / "s.zarr"))
    assert r.exit_code == 130 and "rerun the same command to resume" in r.output


def test_tables_never_wrap_and_every_table_has_csv_and_json(tiny_store, tmp_path):
    import io
    import json

    import pandas as pd

    from mubench_probe.store import EmbeddingStore

    (run,) = EmbeddingStore(tiny_store).runs()
    ids = list(run.meta()["image_id"])
    r = _run("search", str(tiny_store), "--row", "5", "-k", "4")  # CliRunner: not a terminal, 80 columns
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if "│" in ln]
    assert len(lines) == 4 and all(any(i in ln for i in ids) for ln in lines), "one line per hit, ids unbroken"
    r = _run("search", str(tiny_store), "--row", "5", "-k", "4", "--format", "csv")
    hits = pd.read_csv(io.StringIO(r.output))
    assert list(hits["rank"]) == [1, 2, 3, 4] and hits["row"].iloc[0] == 5
    r = _run("info", str(tiny_store), "--format", "csv")
    info = pd.read_csv(io.StringIO(r.output))
    assert info["status"].tolist() == ["complete"] and info["rows"].tolist() == [450]
    r = _run("search", str(tiny_store), "--row", "5", "-k", "2", "--format", "json")
    assert json.loads(r.output)["hits"][0]["row"] == 5
    r = _run("info", str(tiny_store), "--format", "xml")
    assert r.exit_code == 2 and "--format" in r.output


def test_progress_lines_when_not_on_a_terminal(monkeypatch):
    from mubench_probe import cli

    lines = []
    monkeypatch.setattr(cli.err, "print", lambda text, **kw: lines.append(text))
    bar = cli.LineProgress(every=0.0)
    with bar:
        t = bar.add_task("ViT-B-32:random", total=1000)
        bar.advance(t, 250)
        bar.advance(t, 250)
    assert lines[0].startswith("ViT-B-32:random: 250/1,000 (25%)") and "img/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].endswith("(done)") and "500/1,000" in lines[-1]


def test_config_options_default_to_the_config_fields():
    """Every option of extract, interpolate, evaluate (and verify) that sets an ExtractConfig or
    EvalConfig field defaults to that field's default, and any default its help shows (`[...]`) is
    the field's: nothing in `--help` is a copy of config.py that could drift from it."""
    import dataclasses
    import re

    import typer.main

    from mubench_probe.cli import app
    from mubench_probe.cli.options import EVAL_OPTIONS, EXTRACT_OPTIONS
    from mubench_probe.config import EvalConfig, ExtractConfig

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    checked = 0
    for command, cls, options in (
        ("extract", ExtractConfig, EXTRACT_OPTIONS),
        ("interpolate", ExtractConfig, EXTRACT_OPTIONS),
        ("verify", ExtractConfig, EXTRACT_OPTIONS),
        ("evaluate", EvalConfig, EVAL_OPTIONS),
    ):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        params = {p.name: p for p in commands[command].params}
        for name, param in params.items():
            if name in fields and name not in options:
                raise AssertionError(f"probe {command} --{name} sets {cls.__name__}.{name} but is no ConfigOption")
            if name not in options:
                continue
            opt = options[name]
            field = fields[opt.field]
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            if opt.unset:  # not given: the field's default (or a preset's), and the help may name it
                assert param.default is None, (command, name, param.default)
            else:
                assert opt.to_config(param.default) == default, (command, name, param.default, default)
            shown = re.findall(r"\[([^\[\]]*)\]\.?$", param.help or "")
            if shown and opt.unset:
                assert shown[0] == opt.show(default), (command, name, param.help, default)
            checked += 1
    assert checked >= 19 + 16 + 3 + 20, checked  # every config option of the four commands was compared
    cfg = ExtractConfig(**{f.field: f.to_config(f.default) for f in EXTRACT_OPTIONS.values() if not f.unset})
    assert cfg == ExtractConfig(), "extract's defaults build the default ExtractConfig"
