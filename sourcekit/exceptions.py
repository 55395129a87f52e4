"""Exceptions raised by sourcekit.

Every exception subclasses a builtin so that callers who catch ``ValueError`` or
``AttributeError`` keep working; the sourcekit class lets them be more precise.
"""

from __future__ import annotations

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

__all__ = [
    "NonFiniteError",
    "NotFittedError",
    "TrajectoryError",
    "UnsupportedModuleError",
]


class NotFittedError(_SklearnNotFittedError):
    """An attributor was used before ``fit``.

    Subclasses scikit-learn's ``NotFittedError`` (itself a ``ValueError`` and an
    ``AttributeError``), so scikit-learn's own checks recognise it.
    """


class TrajectoryError(ValueError):
    """A recorded training run is incomplete, inconsistent or corrupt."""


class UnsupportedModuleError(TypeError):
    """A layer with parameters that the chosen method cannot handle."""


class NonFiniteError(FloatingPointError):
    """NaN or infinity appeared in gradients, curvature or scores."""
