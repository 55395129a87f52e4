"""Influence functions (METHOD.md section 2), in sourcekit's sign and scale.

    τ_IF[q, m] = −(1/N) ∇f(z_q, θ)ᵀ (H + λI)⁻¹ ∇L(z_m, θ)

at the final parameters θ, with H a curvature approximation of the training objective
(weight decay included) and λ the damping. Query side first: u = (H + λ)⁻¹ ∇f (per
block, optionally replaced by its best rank-r approximation), then one pass over the
training examples, contracted block by block
(:func:`~sourcekit.scoring._contraction.gradient_dot`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..curvature import Curvature
from ..curvature._spectral import Inverse
from ..gradients._training import GradientSource
from ._contraction import gradient_dot, query_matrices

__all__ = ["default_damping", "influence_scores"]


DAMPING_FLOOR = 1e-3
"""No block's default damping is below this fraction of the largest block's."""


def default_damping(
    curvature: Curvature, weight_decay: float | dict[str, float] = 0.0
) -> dict[str, float]:
    """The heuristic damping: 0.1 × the mean eigenvalue of each block (weight decay included).

    A block whose curvature is (nearly) zero at the final checkpoint (every unit of the
    layer inactive, as dead ReLUs after fine-tuning leave it) would get a damping of 0
    and an inverse that does not exist. Each block's damping is therefore at least
    :data:`DAMPING_FLOOR` times the largest block's (1e-3 when every block is flat), and
    a UserWarning names the layers raised to it. Such a layer's gradients are (nearly)
    zero too, so its scores hardly depend on the value.

    Examples
    --------
    >>> from sourcekit.scoring._influence import default_damping
    >>> class Flat:
    ...     def mean_eigenvalues(self):
    ...         return {"0": 0.0, "2": 4.0}
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     damping = default_damping(Flat())
    >>> damping
    {'0': 0.0004, '2': 0.4}
    >>> print(caught[0].message)  # doctest: +ELLIPSIS
    The curvature of layer(s) ['0'] is zero at the final checkpoint...
    """
    means = curvature.mean_eigenvalues()
    decays = weight_decay if isinstance(weight_decay, dict) else dict.fromkeys(means, weight_decay)
    heuristic = {name: 0.1 * (value + decays[name]) for name, value in means.items()}
    largest = max(heuristic.values(), default=0.0)
    floor = DAMPING_FLOOR * largest if largest > 0 else DAMPING_FLOOR
    flat = [name for name, value in heuristic.items() if not value >= floor]
    if flat:
        warnings.warn(
            f"The curvature of layer(s) {flat} is zero at the final checkpoint, or nearly "
            "(all of its units inactive, for instance dead ReLUs), so the default damping of "
            f"0.1 x its mean eigenvalue would leave nothing to invert; it is raised to "
            f"{floor:.3g} ({DAMPING_FLOOR:g} x the largest layer's). Pass damping=... to choose "
            "it yourself.",
            UserWarning,
            stacklevel=3,
        )
    return {name: max(value, floor) for name, value in heuristic.items()}


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
