import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def doc_pages() -> list[Path]:
    """README.md and every page of the documentation site."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci
    assert "ruff check . && ruff format --check ." in ci and "mkdocs build --strict" in ci


def test_every_command_and_option_in_the_docs_exists():
    """Each `probe CMD --option` in the README's and the docs' shell blocks and inline code is real."""
    import shlex

    import typer.main

    from mubench_probe.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    checked: dict[str, int] = {}
    for page in doc_pages():
        text = page.read_text()
        name_of_page = str(page.relative_to(ROOT))
        lines = [ln for block in re.findall(r"```bash\n(.*?)\n```", text, flags=re.S) for ln in block.splitlines()]
        lines += re.findall(r"`(probe [^`]+)`", text)
        checked[name_of_page] = 0
        for line in lines:
            for part in re.split(r"&&|\|", line.split("#")[0]):
                words = shlex.split(part.replace("\\", " "), posix=True) if part.strip() else []
                if len(words) < 2 or words[0] != "probe":
                    continue
                name = words[1]
                assert name in commands, f"{name_of_page}: unknown command `probe {name}` in: {line.strip()}"
                options = {o for p in commands[name].params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
                for w in words[2:]:
                    if w.startswith("-") and w not in ("-", "--"):
                        assert w.split("=")[0] in options, f"{name_of_page}: `probe {name}` has no option {w}: {line}"
                checked[name_of_page] += 1
    # the pages show many commands: make sure they were all parsed (a changed fence or regex would check none)
    assert checked["README.md"] >= 5, checked
    assert sum(checked.values()) > 120, checked
    for page in ("extract", "evaluate", "tasks", "search", "compare", "interpolate", "info-status-verify", "export"):
        assert checked[f"docs/commands/{page}.md"] >= 1, (page, checked)


def test_every_docs_page_is_in_the_site_nav():
    """mkdocs.yml lists every page under docs/ and nothing that is not there."""
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config.split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", nav, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed == pages, (sorted(listed - pages), sorted(pages - listed))


@pytest.mark.slow
def test_docs_python_api_runs(tmp_path, monkeypatch):
    """The Python API page's example block, with the tiny model (same calls, fast)."""
    import mubench_probe as mp

    for name in mp.__all__:
        assert hasattr(mp, name), name
    page = (DOCS / "api.md").read_text()
    block = re.search(r"# Python API.*?```python\n(.*?)\n```", page, flags=re.S).group(1)
    assert "mp.extract(" in block and "mp.evaluate(" in block and "mp.search(" in block
    monkeypatch.chdir(tmp_path)
    code = block.replace("ViT-B-32:random", "mubench-tiny-vit:random")
    namespace: dict = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    assert len(namespace["res"].table) and len(namespace["hits"]) == 5 and namespace["cmp"].report.exists()
