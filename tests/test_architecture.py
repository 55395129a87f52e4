"""The package's layers (docs/architecture.md): no import runs back up, no import cycle.

Every module of ``sourcekit`` belongs to a unit (a subpackage, or a top-level module),
and every unit to a layer. A unit may import the units of the layers below its own,
never those above; the side wings (evaluation, the embedded datasets) hang beside the
middle layers and only the top imports them. Imports are read from the source with
``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sourcekit"

# Bottom to top. The text of docs/architecture.md follows this table.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations", {"_validation", "exceptions", "_distributed", "_denormals", "_imports"}),
    ("services", {"objectives", "_memory", "_device", "postprocessing", "plotting"}),
    ("trajectory", {"trajectory"}),
    ("gradients", {"gradients"}),
    ("curvature", {"curvature"}),
    ("scoring", {"scoring"}),
    ("contract", {"base"}),
    ("estimators", {"estimators"}),
    ("top", {"__init__", "cli", "__main__"}),
]
# Beside the middle: they read recorded runs and nothing of the attribution machinery.
SIDE_WINGS: dict[str, set[str]] = {
    "evaluation": {"foundations", "services", "trajectory"},
    "datasets": {"foundations", "services", "trajectory"},
    "integrations": {"foundations", "services", "trajectory"},
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _module(path: Path) -> tuple[str, ...]:
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    return rel[:-1] if rel[-1] == "__init__" else rel


def _imports(path: Path) -> list[tuple[str, ...]]:
    """The sourcekit modules ``path`` imports, as module paths inside the package."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parts[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("sourcekit"):
                    continue
                base = tuple(node.module.split(".")[1:])  # type: ignore[union-attr]
            else:
                up = here[: len(here) - (node.level - 1)]
                base = up + tuple(node.module.split(".") if node.module else ())
            if node.module is None:  # from . import name: modules of a package
                found.extend((*base, alias.name) for alias in node.names)
            else:
                found.append(base)
        elif isinstance(node, ast.Import):
            found.extend(
                tuple(a.name.split(".")[1:]) for a in node.names if a.name.startswith("sourcekit.")
            )
    return found


def _file(module: tuple[str, ...]) -> Path | None:
    path = PACKAGE.joinpath(*module)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None  # a name imported from a module, not a module


FILES = sorted(p for p in PACKAGE.rglob("*.py"))


def _layer(unit: str) -> str:
    for name, units in LAYERS:
        if unit in units:
            return name
    return unit


def test_every_unit_has_a_layer() -> None:
    known = set().union(*(units for _, units in LAYERS)) | set(SIDE_WINGS)
    assert {_unit(p) for p in FILES} <= known


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up(path: Path) -> None:
    unit = _unit(path)
    order = [name for name, _ in LAYERS]
    if unit in SIDE_WINGS:
        allowed = SIDE_WINGS[unit]
    elif _layer(unit) == "top":  # the package's face and the command use everything
        allowed = set(order) | set(SIDE_WINGS)
    else:
        allowed = set(order[: order.index(_layer(unit))])
    for module in _imports(path):
        target = _unit(PACKAGE.joinpath(*module, "x.py")) if module else "__init__"
        if target == unit:
            continue
        assert _layer(target) in allowed or target in allowed, (
            f"{path.relative_to(PACKAGE)} ({_layer(unit)}) imports {'.'.join(module)} "
            f"({_layer(target)})"
        )


def test_no_module_imports_itself_through_others() -> None:
    graph: dict[Path, set[Path]] = {}
    for path in FILES:
        targets = {_file(m) or _file(m[:-1]) for m in _imports(path)}
        graph[path] = {t for t in targets if t is not None and t != path}
    state: dict[Path, int] = {}  # 1: on the current path, 2: finished

    def visit(node: Path, trail: list[Path]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt) :], nxt]
                pytest.fail(
                    "import cycle: " + " -> ".join(str(p.relative_to(PACKAGE)) for p in cycle)
                )
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for path in FILES:
        if path not in state:
            visit(path, [path])
