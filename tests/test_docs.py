import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.strip() in (ROOT / ".ci" / "run").read_text()


def test_every_command_and_option_in_the_readme_exists():
    """Each `probe CMD --option` in the README's shell blocks is a real command with that option."""
    import shlex

    import typer.main

    from mubench_probe.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    readme = (ROOT / "README.md").read_text()
    lines = [ln for block in re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S) for ln in block.splitlines()]
    lines += re.findall(r"`(probe [^`]+)`", readme)
    checked = 0
    for line in lines:
        for part in re.split(r"&&|\|", line.split("#")[0]):
            words = shlex.split(part.replace("\\", " "), posix=True) if part.strip() else []
            if len(words) < 2 or words[0] != "probe":
                continue
            name = words[1]
            assert name in commands, f"README: unknown command `probe {name}` in: {line.strip()}"
            options = {o for p in commands[name].params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            for w in words[2:]:
                if w.startswith("-") and w not in ("-", "--"):
                    assert w.split("=")[0] in options, f"README: `probe {name}` has no option {w}: {line.strip()}"
            checked += 1
    assert checked > 30, checked  # the README shows many commands: make sure they were all parsed


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
