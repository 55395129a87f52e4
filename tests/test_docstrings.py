"""Every public class and function has a numpydoc docstring with a runnable Examples section.

The public API is what ``sourcekit.__all__`` and the ``__all__`` of each public subpackage
list. The examples themselves run as doctests (``--doctest-modules`` over sourcekit/).
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

PUBLIC_MODULES = [
    "sourcekit",
    "sourcekit.trajectory",
    "sourcekit.curvature",
    "sourcekit.gradients",
    "sourcekit.objectives",
    "sourcekit.scoring",
    "sourcekit.estimators",
    "sourcekit.postprocessing",
    "sourcekit.plotting",
    "sourcekit.evaluation",
    "sourcekit.datasets",
    "sourcekit.exceptions",
]

# A numpydoc section header: the title alone on a line, underlined with dashes.
EXAMPLES_SECTION = re.compile(r"^[ \t]*Examples[ \t]*\n[ \t]*-{3,}[ \t]*$", re.MULTILINE)


def _public_callables() -> list[tuple[str, object]]:
    found = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found.append((f"{module_name}.{name}", obj))
    return found


PUBLIC = _public_callables()


def examples_section(doc: str | None) -> str | None:
    """The text of the Examples section of ``doc`` (up to the end), or None."""
    if not doc:
        return None
    match = EXAMPLES_SECTION.search(doc)
    return None if match is None else doc[match.end() :]


def test_the_public_api_is_found() -> None:
    names = {name for name, _ in PUBLIC}
    assert "sourcekit.SourceAttributor" in names
    assert "sourcekit.evaluation.linear_datamodeling_score" in names
    assert len(PUBLIC) > 60


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_object_has_a_docstring_with_examples(name: str, obj: object) -> None:
    # The object's own docstring: classes do not inherit __doc__, and a dataclass
    # without one gets only its generated signature, which has no Examples section.
    doc = obj.__doc__
    assert doc and doc.strip(), f"{name} has no docstring"
    section = examples_section(doc)
    assert section is not None, f"the docstring of {name} has no 'Examples' section"
    assert re.search(r"^[ \t]*>>> ", section, re.MULTILINE), (
        f"the Examples section of {name} has no '>>>' line"
    )


def test_the_check_recognises_a_missing_section() -> None:
    assert examples_section("Summary.\n\nParameters\n----------\nx : int\n") is None
    assert examples_section("Summary.\n\n    Examples\n    --------\n    >>> 1\n    1\n")
    # the class named Examples in prose is not a section
    assert examples_section("Wraps :class:`Examples` objects.\nExamples are tensors.") is None
