"""The identity curvature: Λ = 1 everywhere, without a pass over the data (SOURCE then
reduces to sums of learning-rate-weighted gradient products; a baseline)."""

from __future__ import annotations

import torch

from ._objects import EigenbasisCurvature, KroneckerFactors
from ._passes import CurvaturePasses

__all__ = ["fit_identity"]


def fit_identity(passes: CurvaturePasses) -> EigenbasisCurvature:
    """Eigenvalues 1 in parameter coordinates, for every block."""
    device = passes.settings.device
    factors = {
        b.name: KroneckerFactors(
            None, None, torch.ones(b.d_out, b.d_in, dtype=torch.float64, device=device)
        )
        for b in passes.blocks
    }
    return EigenbasisCurvature("identity", passes.blocks, factors)
