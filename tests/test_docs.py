import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.strip() in (ROOT / ".ci" / "run").read_text()


def test_readme_has_no_unfilled_placeholders():
    assert "_TABLE" not in (ROOT / "README.md").read_text()


def test_readme_python_api_runs(tmp_path, monkeypatch):
    """The README's Python API block, with the tiny model (same calls, fast)."""
    import mubench_probe as mp

    for name in mp.__all__:
        assert hasattr(mp, name), name
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)\n```", readme, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    code = block.replace("ViT-B-32:random", "mubench-tiny-vit:random")
    namespace: dict = {}
    exec(compile(code, "README", "exec"), namespace)
    assert len(namespace["res"].table) and len(namespace["hits"]) == 5 and namespace["cmp"].report.exists()
