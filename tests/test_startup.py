"""Commands that never load a model must not import torch (start-up: ~1 s instead of ~5 s, 130 MB not 1 GB)."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "open_clip", "timm", "matplotlib")


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_evaluation_and_store_paths_do_not_import_torch():
    assert _imported_after("import mubench_probe, mubench_probe.evaluation, mubench_probe.queries") == []


@pytest.mark.slow
def test_store_reading_commands_do_not_import_torch(tiny_store, tmp_path):
    for args in (
        ["export", str(tiny_store), str(tmp_path / "e.parquet"), "--to", "parquet"],
        ["export", str(tiny_store), str(tmp_path / "e.h5ad")],
        ["info", str(tiny_store)],
        ["status", str(tiny_store)],
        ["extract", "--help"],
        ["verify", str(tiny_store)],
        ["evaluate", "--help"],
        ["models"],
        ["datasets"],
        ["search", str(tiny_store), "--row", "3", "-k", "2"],
    ):
        code = (
            "from typer.testing import CliRunner\nfrom mubench_probe.cli import app\n"
            f"r = CliRunner().invoke(app, {args!r})\nassert r.exit_code == 0, r.output"
        )
        assert _imported_after(code) == [], args
