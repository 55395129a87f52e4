"""The diagonal curvature: Λ = mean_c E[G^∘2] over the per-example gradients G (for Fisher
targets), in parameter coordinates, for every block (the pass of
:func:`~sourcekit.curvature._kfac.kronecker_pass` with every block diagonal)."""

from __future__ import annotations

from ._kfac import kronecker_pass
from ._objects import EigenbasisCurvature
from ._passes import CurvaturePasses

__all__ = ["fit_diagonal"]


def fit_diagonal(passes: CurvaturePasses) -> EigenbasisCurvature:
    """The diagonal of the Fisher of every block, in parameter coordinates."""
    found = kronecker_pass(passes, list(passes.blocks), keep_fisher=False)
    return EigenbasisCurvature(
        "diagonal", passes.blocks, {b.name: found.diagonal[b.name] for b in passes.blocks}
    )
