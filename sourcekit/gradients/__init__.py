"""Per-example gradients: layer blocks, hook-based collection, streaming over checkpoints.

The built-in losses and measurements live in :mod:`sourcekit.objectives`; they are
re-exported here for convenience.
"""

from ..objectives import (
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
