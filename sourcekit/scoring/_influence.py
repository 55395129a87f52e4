"""Influence functions (METHOD.md section 2), in sourcekit's sign and scale.

    τ_IF[q, m] = −(1/N) ∇f(z_q, θ)ᵀ (H + λI)⁻¹ ∇L(z_m, θ)

at the final parameters θ, with H a curvature approximation of the training objective
(weight decay included) and λ the damping. Query side first: u = (H + λ)⁻¹ ∇f, then
one pass over the training examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..curvature._spectral import Inverse

__all__ = ["default_damping", "influence_scores"]


def default_damping(curvature: object, weight_decay: float = 0.0) -> dict[str, float]:
    """The heuristic damping: 0.1 × the mean eigenvalue of each block (weight decay included)."""
    means = curvature.mean_eigenvalues()  # type: ignore[attr-defined]
    return {name: 0.1 * (value + weight_decay) for name, value in means.items()}


def influence_scores(
    query_gradients: dict[str, torch.Tensor],
    curvature: object,
    training_gradients: Callable[
        [int, np.ndarray], Iterable[tuple[np.ndarray, dict[str, torch.Tensor]]]
    ],
    step: int,
    examples: np.ndarray,
    *,
    n_train: int,
    n_examples: int,
    shift: float | dict[str, float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Influence scores of shape (n_queries, n_train); ``shift`` is damping plus weight decay."""
    n_queries = next(iter(query_gradients.values())).shape[0]
    device = next(iter(query_gradients.values())).device
    v = {k: g.double() for k, g in query_gradients.items()}
    u = curvature.apply(Inverse(), v, shift)  # type: ignore[attr-defined]
    flat_u = torch.cat([u[k].reshape(n_queries, -1) for k in u], dim=1).to(dtype)
    scores = torch.zeros(n_queries, n_train, dtype=dtype, device=device)
    for indices, grads in training_gradients(step, examples):
        flat_g = torch.cat([grads[k].reshape(len(indices), -1) for k in u], dim=1).to(dtype)
        scores[:, torch.from_numpy(indices).to(device)] = -(flat_u @ flat_g.T) / n_examples
    return scores
