"""Influence functions (METHOD.md section 2), in sourcekit's sign and scale.

    τ_IF[q, m] = −(1/N) ∇f(z_q, θ)ᵀ (H + λI)⁻¹ ∇L(z_m, θ)

at the final parameters θ, with H a curvature approximation of the training objective
(weight decay included) and λ the damping. Query side first: u = (H + λ)⁻¹ ∇f (per
block, optionally replaced by its best rank-r approximation), then one pass over the
training examples, contracted block by block
(:func:`~sourcekit.scoring._contraction.gradient_dot`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..curvature import Curvature
from ..curvature._spectral import Inverse
from ..gradients._training import GradientSource
from ._contraction import gradient_dot, query_matrices

__all__ = ["default_damping", "influence_scores"]


def default_damping(curvature: Curvature, weight_decay: float = 0.0) -> dict[str, float]:
    """The heuristic damping: 0.1 × the mean eigenvalue of each block (weight decay included)."""
    means = curvature.mean_eigenvalues()
    return {name: 0.1 * (value + weight_decay) for name, value in means.items()}


def influence_scores(
    query_gradients: dict[str, torch.Tensor],
    curvature: Curvature,
    training_gradients: GradientSource,
    step: int,
    examples: np.ndarray,
    *,
    n_train: int,
    n_examples: int,
    shift: float | dict[str, float],
    dtype: torch.dtype = torch.float32,
    query_rank: int | None = None,
) -> torch.Tensor:
    """Influence scores of shape (n_queries, n_train); ``shift`` is damping plus weight decay.

    ``query_rank`` replaces each block of u = (H + λ)⁻¹ ∇f by its best rank-r
    approximation (None: exact).
    """
    n_queries = next(iter(query_gradients.values())).shape[0]
    device = next(iter(query_gradients.values())).device
    v = {k: g.double() for k, g in query_gradients.items()}
    u = curvature.apply(Inverse(), v, shift)
    queries = query_matrices(u, curvature.blocks, query_rank, dtype)
    scores = torch.zeros(n_queries, n_train, dtype=dtype, device=device)
    for indices, grads in training_gradients(step, examples):
        dots = gradient_dot(queries, grads, dtype)
        scores[:, torch.from_numpy(indices).to(device)] = -dots / n_examples
    return scores
