"""Per-example gradients: layer blocks, hook-based collection, streaming over checkpoints.

The layer registry (:class:`LayerType`, :func:`register_layer_type`) says how each kind
of layer is read. The built-in losses and measurements live in
:mod:`sourcekit.objectives`; they are re-exported here for convenience.
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
from ._layer_types import LAYER_TYPES, LayerType, register_layer_type

__all__ = [
    "LAYER_TYPES",
    "LOSSES",
    "MEASUREMENTS",
    "LayerType",
    "absolute_error",
    "cross_entropy",
    "margin",
    "output",
    "register_layer_type",
    "squared_error",
]
