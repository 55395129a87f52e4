"""Curvature approximations per segment: EK-FAC, K-FAC, diagonal, identity, dense.

Every kind is fitted by one function of the registry (:data:`CURVATURE_KINDS`) and
returns a :class:`Curvature`; the spectral functions of SOURCE and influence functions
act on it.
"""

from ._dense import DenseCurvature
from ._fit import CURVATURE_KINDS, CURVATURES, fit_curvature
from ._objects import Carried, Curvature, EigenbasisCurvature, KroneckerFactors
from ._spectral import Decay, DiscreteDecay, DiscreteResidual, Inverse, Residual

__all__ = [
    "CURVATURES",
    "CURVATURE_KINDS",
    "Carried",
    "Curvature",
    "Decay",
    "DenseCurvature",
    "DiscreteDecay",
    "DiscreteResidual",
    "EigenbasisCurvature",
    "Inverse",
    "KroneckerFactors",
    "Residual",
    "fit_curvature",
]
