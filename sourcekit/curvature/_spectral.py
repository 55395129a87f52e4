"""Spectral functions: scalar functions applied to the eigenvalues of a curvature.

SOURCE needs, for a segment with learning-rate sum s (METHOD.md section 4),

    decay     F_S(σ) = exp(−sσ)                          (how later training fades an effect)
    residual  F_r(σ) = (1 − exp(−sσ))/σ, with F_r(0) = s   (what the segment contributes)

and their finite-product ("discrete") forms over the segment's learning rates η_k,

    Π_k (1 − η_k σ)    and    Σ_k η_k Π_{k'>k} (1 − η_{k'} σ),

which equal exact unrolling when curvature and gradients are constant in the segment.
Influence functions need the inverse 1/σ. Each function is a small object: calling it
on a tensor of (already damped) eigenvalues returns the tensor of function values.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["Decay", "DiscreteDecay", "DiscreteResidual", "Inverse", "Residual"]

# Below this |sσ| the residual uses its Taylor series s Σ_j (−x)^j/(j+1)!, six terms: the
# first dropped term x⁶/5040 is below 2e-22 relative, far under float64 resolution.
_SERIES_BELOW = 1e-3


def _describe(s: float | torch.Tensor) -> str:
    return f"{s:g}" if isinstance(s, float) else f"<{tuple(s.shape)} per entry>"


class Decay:
    """σ ↦ exp(−sσ): what a segment with learning-rate sum s does to an earlier effect.

    Parameters
    ----------
    s : float or tensor
        The segment's learning-rate sum (effective rates under momentum); a tensor
        shaped like the eigenvalues gives each its own.

    Examples
    --------
    A flat direction (σ = 0) keeps an earlier effect whole; a steep one forgets it.

    >>> import torch
    >>> from sourcekit.curvature import Decay
    >>> Decay(s=2.0)(torch.tensor([0.0, 0.5, 5.0], dtype=torch.float64))
    tensor([1.0000e+00, 3.6788e-01, 4.5400e-05], dtype=torch.float64)
    """

    def __init__(self, s: float | torch.Tensor) -> None:
        # A tensor s holds one sum per eigenvalue (parameters training at their own rates
        # where the eigenbasis is the identity).
        self.s = s if isinstance(s, torch.Tensor) else float(s)

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.s * sigma)

    def __repr__(self) -> str:
        return f"Decay(s={_describe(self.s)})"


class Residual:
    """σ ↦ (1 − exp(−sσ))/σ = s·(−expm1(−sσ))/(sσ), equal to s at σ = 0.

    What a segment with learning-rate sum s contributes from a constant gradient: s
    along flat directions, about 1/σ (the influence function's inverse) along steep
    ones. Computed with ``expm1`` (no cancellation for small sσ) and a Taylor series
    near 0.

    Parameters
    ----------
    s : float or tensor
        The segment's learning-rate sum (or one per eigenvalue).

    Examples
    --------
    >>> import torch
    >>> from sourcekit.curvature import Residual
    >>> Residual(s=2.0)(torch.tensor([0.0, 1e-9, 0.5, 100.0], dtype=torch.float64))
    tensor([2.0000, 2.0000, 1.2642, 0.0100], dtype=torch.float64)
    """

    def __init__(self, s: float | torch.Tensor) -> None:
        self.s = s if isinstance(s, torch.Tensor) else float(s)

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        x = self.s * sigma
        small = x.abs() < _SERIES_BELOW
        safe_sigma = torch.where(small, torch.ones_like(sigma), sigma)
        direct = -torch.expm1(-x) / safe_sigma
        series = self.s * (1 - x / 2 * (1 - x / 3 * (1 - x / 4 * (1 - x / 5 * (1 - x / 6)))))
        return torch.where(small, series, direct)

    def __repr__(self) -> str:
        return f"Residual(s={_describe(self.s)})"


class DiscreteDecay:
    """σ ↦ Π_k (1 − η_k σ) over the learning rates of a segment.

    The finite-product form of :class:`Decay`: exactly what the segment's gradient
    steps do to an earlier effect when the curvature is constant.

    Parameters
    ----------
    learning_rates : iterable of float
        The learning rates η_k of the segment's steps.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.curvature import Decay, DiscreteDecay
    >>> sigma = torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> DiscreteDecay([0.5, 0.5])(sigma)
    tensor([1.0000, 0.2500], dtype=torch.float64)

    Many small steps approach the exponential form with the same sum s = 2:

    >>> DiscreteDecay([0.002] * 1000)(sigma), Decay(2.0)(sigma)
    (tensor([1.0000, 0.1351], dtype=torch.float64), tensor([1.0000, 0.1353], dtype=torch.float64))
    """

    def __init__(self, learning_rates: Iterable[float]) -> None:
        self.learning_rates = [float(x) for x in learning_rates]

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        out = torch.ones_like(sigma)
        for eta in self.learning_rates:
            out = out * (1 - eta * sigma)
        return out

    def __repr__(self) -> str:
        return f"DiscreteDecay({len(self.learning_rates)} steps)"


class DiscreteResidual:
    """σ ↦ Σ_k η_k Π_{k'>k} (1 − η_{k'} σ): a constant gradient fed through the segment's steps.

    The finite-product form of :class:`Residual`.

    Parameters
    ----------
    learning_rates : iterable of float
        The learning rates η_k of the segment's steps, in order.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.curvature import DiscreteResidual
    >>> DiscreteResidual([0.5, 0.5])(torch.tensor([0.0, 1.0], dtype=torch.float64))
    tensor([1.0000, 0.7500], dtype=torch.float64)
    """

    def __init__(self, learning_rates: Iterable[float]) -> None:
        self.learning_rates = [float(x) for x in learning_rates]

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(sigma)
        for eta in self.learning_rates:
            out = out * (1 - eta * sigma) + eta
        return out

    def __repr__(self) -> str:
        return f"DiscreteResidual({len(self.learning_rates)} steps)"


class Inverse:
    """σ ↦ 1/σ (influence functions; σ must be damped away from 0).

    Examples
    --------
    >>> import torch
    >>> from sourcekit.curvature import Inverse
    >>> Inverse()(torch.tensor([0.5, 4.0]))
    tensor([2.0000, 0.2500])
    """

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / sigma

    def __repr__(self) -> str:
        return "Inverse()"
