"""The documentation's code blocks and the examples run as written."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = runpy.run_path(str(ROOT / "docs" / "run_snippets.py"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documentation_code_blocks_run(page: Path) -> None:
    for module in SNIPPETS["required_modules"](page):  # a page for an optional extra
        pytest.importorskip(module, reason=f"{page.name} needs {module}")
    assert SNIPPETS["run_file"](page), f"a code block of {page.name} failed (see the output)"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_run(example: Path, tmp_path: Path) -> None:
    for module in SNIPPETS["required_modules"](example):  # an example for an optional extra
        pytest.importorskip(module, reason=f"{example.name} needs {module}")
    work, temporary = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    temporary.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.pop("SOURCEKIT_TRAJECTORY", None)
    env["TMPDIR"] = str(temporary)  # where the examples' temporary files go
    result = subprocess.run(
        [sys.executable, str(example)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example should print what it found"
    # Figures may be written where the example runs; a saved run (a directory with a
    # manifest) may not be left behind, there or in the temporary directory (the
    # distributed example saves one for its ranks).
    assert not list(work.rglob("manifest.json"))
    assert not list(temporary.rglob("manifest.json"))


def test_documentation_site_builds_strictly(tmp_path: Path) -> None:
    """The MkDocs site builds with warnings as errors.

    Strict mode fails on a broken link or anchor, a page missing from the navigation,
    and an API-reference directive or docstring that mkdocstrings cannot render.
    """
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip(
        "mkdocstrings_handlers.python",
        reason="mkdocstrings[python] is not installed (pip install -e '.[docs]')",
    )
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (site / "api" / "estimators" / "index.html").is_file()


def test_the_lds_figure_reads_the_benchmarks_table() -> None:
    plot_lds = runpy.run_path(str(ROOT / "benchmarks" / "plot_lds.py"))
    rows = plot_lds["parse_lds_table"]((ROOT / "docs" / "benchmarks.md").read_text())
    assert {r.recipe for r in rows} == {"standard", "early", "two_stage", "adamw"}
    assert len(rows) == 4 * 9  # four recipes, nine methods
    assert all(r.low <= r.lds <= r.high for r in rows)
    assert (ROOT / "docs" / "img" / "lds.png").is_file()
    assert "](img/lds.png)" in (ROOT / "docs" / "benchmarks.md").read_text()


def test_the_readme_demo_command_installs_what_the_demo_needs() -> None:
    # The demo draws a figure with matplotlib: the command the README shows installs the
    # extra that holds it (and getting-started shows the same command).
    commands = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.endswith("&& sourcekit demo")
    ]
    assert len(commands) == 1
    installed = re.findall(r'pip install "\.\[(\w+)\]"', commands[0])
    assert installed
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib needs Python 3.11)
    extra = re.search(rf"^{installed[0]} = \[(.*)\]$", pyproject, re.MULTILINE)
    assert extra is not None and '"matplotlib' in extra.group(1)
    assert commands[0] in (ROOT / "docs" / "getting-started.md").read_text()
