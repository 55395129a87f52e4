"""Run the Python code blocks of the documentation, to check that they still work.

Every fenced block marked ``python`` in the given Markdown files (by default README.md
and docs/*.md) is executed. The blocks of one file run in order in one namespace, so a
page may build on its earlier blocks; each file runs in a fresh temporary working
directory. Exits with status 1 if a block fails.

    python docs/run_snippets.py
    python docs/run_snippets.py docs/conventions.md
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
# A page whose blocks need optional packages names them on a line of its own,
# <!-- requires: transformers, pytorch_lightning -->, and an example script in a comment,
# # requires: transformers
REQUIRES = re.compile(r"^(?:<!-- |# )requires: ([\w, .]+?)(?: -->)?$", re.MULTILINE)


def required_modules(path: Path) -> list[str]:
    """The modules a page's blocks import that an extra installs (none for most pages)."""
    found = REQUIRES.search(path.read_text())
    return [] if found is None else [m.strip() for m in found.group(1).split(",") if m.strip()]


def missing_modules(path: Path) -> list[str]:
    """The modules ``path`` requires that cannot be imported here."""
    return [m for m in required_modules(path) if importlib.util.find_spec(m) is None]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The (line number, source) of every ```python block in ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def run_file(path: Path) -> bool:
    missing = missing_modules(path)
    if missing:
        print(f"skip   {path.relative_to(ROOT)}: needs {', '.join(missing)}")
        return True
    namespace: dict = {"__name__": "__snippets__"}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            for line, source in python_blocks(path):
                started = time.perf_counter()
                try:
                    exec(compile(source, f"{path}:{line}", "exec"), namespace)
                except Exception:
                    print(f"FAILED {path}, block at line {line}:", file=sys.stderr)
                    traceback.print_exc()
                    return False
                print(
                    f"ok     {path.relative_to(ROOT)}:{line} ({time.perf_counter() - started:.1f} s)"
                )
        finally:
            os.chdir(cwd)
    return True


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]
    results = [run_file(p) for p in paths]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
