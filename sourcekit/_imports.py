"""Naming importable objects: ``"package.module:qualname"`` strings and back.

Saved trajectories name their architecture factory, loss and measurement this way, so
that loading them runs no pickled code.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_object", "importable_name"]


def import_object(spec: str) -> Any:
    """The object named ``"package.module:qualname"``.

    Raises ``LookupError`` with the reason when the string is malformed or the object
    cannot be imported.
    """
    module_name, _, qualname = spec.partition(":")
    if not module_name or not qualname:
        raise LookupError(f"{spec!r} is not of the form 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise LookupError(str(err)) from err
    return obj


def importable_name(obj: Any) -> str | None:
    """``"module:qualname"`` that imports back to ``obj`` itself, or None."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    name = f"{module}:{qualname}"
    try:
        return name if import_object(name) is obj else None
    except LookupError:
        return None
