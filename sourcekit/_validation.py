"""Declarative parameter constraints and the shared wording of input errors.

Estimators declare the values each constructor parameter may take once, as data
(``_parameter_constraints``); ``validate_parameters`` checks them at the top of
``fit``. Errors always name the parameter, the value, what is allowed and a fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "InstanceOf",
    "Interval",
    "Options",
    "bad_value",
    "validate_parameters",
]


def bad_value(
    name: str, value: Any, allowed: str, fix: str | None = None, *, owner: str = ""
) -> str:
    """Return the standard message for a value outside what is allowed."""
    where = f" of {owner}" if owner else ""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    message = f"The {name!r} parameter{where} must be {allowed}; got {shown}."
    if fix:
        message += f" {fix}"
    return message


@dataclass(frozen=True)
class Interval:
    """A real (or integer) interval constraint, e.g. ``Interval(float, 0, None)``.

    A bound of None is open: the interval holds finite numbers only (``[0, inf)``
    does not hold ``inf``), and never NaN.

    Examples
    --------
    >>> from sourcekit._validation import Interval
    >>> damping = Interval(float, 0, None)
    >>> damping.accepts(1e-3), damping.accepts(-1.0), damping.accepts(float("inf"))
    (True, False, False)
    >>> damping.describe()
    'a float in [0, inf)'
    """

    kind: type
    low: float | None
    high: float | None
    closed: str = "both"  # "both", "left", "right", "neither"

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Real):
            return False
        value = float(value)
        if not math.isfinite(value):
            return False
        if self.low is not None:
            if value < self.low or (value == self.low and self.closed in ("right", "neither")):
                return False
        if self.high is not None:
            if value > self.high or (value == self.high and self.closed in ("left", "neither")):
                return False
        return True

    def describe(self) -> str:
        noun = "an int" if self.kind is int else "a float"
        left = "[" if self.closed in ("both", "left") and self.low is not None else "("
        right = "]" if self.closed in ("both", "right") and self.high is not None else ")"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{noun} in {left}{low}, {high}{right}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (usually strings)."""

    values: tuple

    def __init__(self, *values: Any) -> None:
        object.__setattr__(self, "values", tuple(values))

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class InstanceOf:
    """An instance of the given type(s), or anything passing ``check``."""

    types: tuple
    label: str
    check: Callable[[Any], bool] | None = None

    def accepts(self, value: Any) -> bool:
        if self.check is not None:
            return self.check(value)
        return isinstance(value, self.types)

    def describe(self) -> str:
        return self.label


def _describe(constraint: Any) -> str:
    if constraint is None:
        return "None"
    return constraint.describe()


def validate_parameters(estimator: Any, constraints: Mapping[str, Iterable[Any]]) -> None:
    """Check every constructor parameter of ``estimator`` against ``constraints``.

    Raises ``ValueError`` naming the estimator, the parameter, the value and everything
    that is allowed.
    """
    owner = type(estimator).__name__
    params = estimator.get_params(deep=False)
    for name, options in constraints.items():
        value = params[name]
        options = list(options)
        if any(
            (c is None and value is None) or (c is not None and c.accepts(value)) for c in options
        ):
            continue
        allowed = " or ".join(_describe(c) for c in options)
        raise ValueError(
            bad_value(
                name,
                value,
                allowed,
                f"Pass a valid value, e.g. {owner}({name}=...) or .set_params({name}=...).",
                owner=owner,
            )
        )
