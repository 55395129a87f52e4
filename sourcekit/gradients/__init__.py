"""Per-example losses, measurements and gradients."""

from ._functions import (
    LOSSES,
    MEASUREMENTS,
    absolute_error,
    cross_entropy,
    margin,
    output,
    squared_error,
)

__all__ = [
    "LOSSES",
    "MEASUREMENTS",
    "absolute_error",
    "cross_entropy",
    "margin",
    "output",
    "squared_error",
]
