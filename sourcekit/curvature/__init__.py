"""Curvature approximations per segment: EK-FAC, K-FAC, diagonal, identity, dense."""

from ._fit import CURVATURES, fit_curvature
from ._objects import DenseCurvature, EigenbasisCurvature, KroneckerFactors
from ._spectral import Decay, DiscreteDecay, DiscreteResidual, Inverse, Residual

__all__ = [
    "CURVATURES",
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
