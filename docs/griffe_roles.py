"""A griffe extension for the API reference: Sphinx roles in docstrings become code spans.

sourcekit's docstrings follow numpydoc and refer to other objects with Sphinx roles
(``:class:`~sourcekit.Trajectory```), which ``help()`` and IDEs show as they are but
Markdown does not know. Before mkdocstrings renders a docstring, each role is replaced
by a code span of its target (the last component when the target starts with ``~``).
Loaded by mkdocs.yml (``extensions:`` of the python handler); not part of the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`<]+?)(?:\s*<([^`>]+)>)?`")


def _code(match: re.Match[str]) -> str:
    short, target, explicit = match.group(1), match.group(2).strip(), match.group(3)
    if explicit:  # :role:`title <target>`
        return f"`{target}`"
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def replace_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by a Markdown code span."""
    return ROLE.sub(_code, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the docstring of every object once it is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = replace_roles(obj.docstring.value)
