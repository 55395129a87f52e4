"""A segment whose parameters train at different rates: parameter groups, frozen layers.

METHOD.md writes a segment with one learning-rate sum s and one weight decay λ. When the
optimiser's parameter groups give parameters their own learning rates and decays (AdamW
without decay on biases, a head trained faster than the body), or some parameters are
frozen in a stage (a rate of 0), the segment's linearised update is preconditioned by
the diagonal P of the parameters' rates relative to a reference sequence η_k:

    θ_{k+1} = θ_k − η_k P (H + Λ) θ_k + ...,   Λ = diag(coupled decays) + damping,

and, with K = P^½ (H + Λ) P^½ (symmetric) and R the segment's residual function
((1 − e^{−sσ})/σ, or its finite-product form over η_k),

    u = P^½ R(K) P^½ v,      v_next = v − (H + Λ) u,

the vector scoring the segment's gradients and the one carried to the previous segment
(for P = I these are R(H) v and e^{−sH} v; the identity e^{−sX} = I − X R(X) with
X = (H + Λ)P gives both, and P^½ R(K) P^½ = P R(X) holds for singular P too: a frozen
parameter, P = 0, contributes nothing and passes earlier effects through unchanged).

This module holds what the recorded optimiser did to each block of a segment
(:class:`BlockRates`, from :func:`block_rates`) and the functions of the curvature they
give (:class:`SegmentRates`). Each curvature kind applies them in
:meth:`~sourcekit.curvature.Curvature.apply_rates`:

- the dense kinds ("exact", "hessian"): exactly as above, for any P; the reference
  sequence is that of the fastest parameter, exact when every parameter's rates are a
  constant multiple of it (groups sharing one schedule), the sums s_p kept exact otherwise;
- the block-diagonal kinds ("ekfac", "kfac", "diagonal", "identity"): K is block-diagonal
  too. A block whose parameters share one sequence and one decay gets its own functions
  of its own eigenvalues, exactly. A block whose weight and bias differ (a bias in a
  no-decay group) is exact where its eigenbasis is the identity ("diagonal",
  "identity", embedding tables: the functions act entry by entry), and otherwise takes
  the mean over its entries of the sequence and the decay: the one approximation here.

Adam's diagonal preconditioner path (``sourcekit.scoring._source``) reads the same
per-entry sums and decays in the parameter coordinates where it works (exactly), and the
per-block mean shift in its inverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..gradients._layers import LayerBlock
from ..trajectory import Segment, Trajectory
from ..trajectory._settings import effective_learning_rates, weight_decays
from ._spectral import Decay, DiscreteDecay, DiscreteResidual, Residual

__all__ = ["BlockRates", "SegmentRates", "block_rates"]

SpectralFunction = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BlockRates:
    """The learning rates and decays of one block in one segment.

    Attributes
    ----------
    parts : list of (mask, rates)
        For each distinct sequence of effective learning rates among the block's
        parameters: the entries of the (d_out, d_in) block matrix it applies to (None:
        all of them) and the rate of each of the segment's steps.
    coupled : tensor (d_out, d_in) or float
        The coupled weight decay of each entry (SGD, Adam).
    decoupled : tensor (d_out, d_in) or float
        The decoupled decay of each entry (AdamW).
    """

    parts: list[tuple[torch.Tensor | None, np.ndarray]]
    coupled: torch.Tensor | float
    decoupled: torch.Tensor | float

    @property
    def uniform(self) -> bool:
        """One sequence and one decay for every entry."""
        return (
            len(self.parts) == 1
            and self.parts[0][0] is None
            and not isinstance(self.coupled, torch.Tensor)
            and not isinstance(self.decoupled, torch.Tensor)
        )

    @property
    def n_steps(self) -> int:
        return int(self.parts[0][1].size)

    def _weights(self) -> list[float]:
        sizes = [1.0 if m is None else float(m.double().mean()) for m, _ in self.parts]
        return [s / sum(sizes) for s in sizes]

    def mean_rates(self) -> np.ndarray:
        """The entries' mean rate at every step."""
        return sum(w * rates for w, (_, rates) in zip(self._weights(), self.parts, strict=True))  # type: ignore[return-value]

    def entry_rates(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """The rate of every entry at the segment's ``k``-th step."""
        out = torch.zeros_like(like)
        for mask, rates in self.parts:
            out = out + (1.0 if mask is None else mask.to(like)) * float(rates[k])
        return out

    def entry_sums(self, like: torch.Tensor) -> torch.Tensor:
        """s per entry: the sum of its rates over the segment."""
        out = torch.zeros_like(like)
        for mask, rates in self.parts:
            out = out + (1.0 if mask is None else mask.to(like)) * float(rates.sum())
        return out

    def mean(self, value: torch.Tensor | float) -> float:
        return float(value.mean()) if isinstance(value, torch.Tensor) else float(value)

    def entrywise(self, value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """A per-entry setting (a decay) as a tensor shaped and typed like ``like``."""
        return like + (value.to(like) if isinstance(value, torch.Tensor) else value)


def _matrix(
    block: LayerBlock, values: dict[str, float], shapes: dict[str, tuple[int, ...]]
) -> torch.Tensor:
    names = [n for n in (block.weight, block.bias) if n is not None]
    full = {n: torch.full(shapes[n], float(values[n]), dtype=torch.float64) for n in names}
    return block.matrix(full)


def block_rates(
    trajectory: Trajectory, segment: Segment, blocks: Sequence[LayerBlock]
) -> dict[str, BlockRates] | None:
    """Per block, the rates and decays of ``segment``; None when one sequence and one
    decay hold for every trained parameter (the plain form of METHOD.md)."""
    lrs = effective_learning_rates(trajectory, segment.start, segment.end)
    decays = weight_decays(trajectory, segment.start, segment.end)
    shapes = {n: tuple(s) for n, s in trajectory._param_shapes.items()}
    names = [n for b in blocks for n in (b.weight, b.bias) if n is not None]
    first = lrs[names[0]]
    if all(np.array_equal(lrs[n], first) for n in names) and len({decays[n] for n in names}) == 1:
        return None
    out = {}
    for block in blocks:
        own = [n for n in (block.weight, block.bias) if n is not None]
        groups: list[tuple[list[str], np.ndarray]] = []
        for name in own:
            for members, rates in groups:
                if np.array_equal(rates, lrs[name]):
                    members.append(name)
                    break
            else:
                groups.append(([name], lrs[name]))
        if len(groups) == 1:
            parts: list[tuple[torch.Tensor | None, np.ndarray]] = [(None, groups[0][1])]
        else:
            parts = [
                (_matrix(block, {n: float(n in members) for n in own}, shapes) > 0, rates)
                for members, rates in groups
            ]
        coupled: torch.Tensor | float
        decoupled: torch.Tensor | float
        if len({decays[n] for n in own}) == 1:
            coupled, decoupled = decays[own[0]]
        else:
            coupled = _matrix(block, {n: decays[n][0] for n in own}, shapes)
            decoupled = _matrix(block, {n: decays[n][1] for n in own}, shapes)
        out[block.name] = BlockRates(parts, coupled, decoupled)
    return out


class _EntrywiseDiscrete:
    """The finite-product decay or residual with a rate per entry at every step."""

    def __init__(self, rates: BlockRates, residual: bool) -> None:
        self.rates, self.residual = rates, residual

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(sigma) if self.residual else torch.ones_like(sigma)
        for k in range(self.rates.n_steps):
            eta = self.rates.entry_rates(k, sigma)
            out = out * (1 - eta * sigma) + (eta if self.residual else 0.0)
        return out


def _shifted(fn: SpectralFunction, shift: torch.Tensor | float) -> SpectralFunction:
    return lambda sigma: fn(sigma + shift)


class SegmentRates:
    """A segment's per-block rates and decays, with the form of its matrix functions.

    Parameters
    ----------
    blocks : dict of block name to BlockRates
        What :func:`block_rates` returns for the segment.
    matrix_function : {"exp", "discrete"}
        The exponential form, or the finite product over the recorded rates.

    Examples
    --------
    A block of two entries, the second trained twice as fast over two steps:

    >>> import numpy as np
    >>> import torch
    >>> from sourcekit.curvature._rates import BlockRates, SegmentRates
    >>> fast = torch.tensor([[False, True]])
    >>> rates = BlockRates([(~fast, np.array([0.1, 0.1])), (fast, np.array([0.2, 0.2]))], 0.0, 0.0)
    >>> sigma = torch.ones(1, 2, dtype=torch.float64)
    >>> residual, decay = SegmentRates({"fc": rates}, "exp").entry_functions("fc", sigma)
    >>> decay(sigma)  # e^{-s σ} per entry, s = 0.2 and 0.4
    tensor([[0.8187, 0.6703]], dtype=torch.float64)
    """

    def __init__(self, blocks: dict[str, BlockRates], matrix_function: str) -> None:
        self.blocks = blocks
        self.discrete = matrix_function == "discrete"

    def _of_sequence(self, sequence: np.ndarray) -> tuple[SpectralFunction, SpectralFunction]:
        if self.discrete:
            return DiscreteResidual(sequence), DiscreteDecay(sequence)
        total = float(sequence.sum())
        return Residual(total), Decay(total)

    def block_functions(self, name: str) -> tuple[SpectralFunction, SpectralFunction]:
        """(residual, decay) of block ``name``, shifted by its coupled decay: of its one
        sequence and decay, or of their means over its entries where they differ."""
        r = self.blocks[name]
        sequence = r.parts[0][1] if len(r.parts) == 1 else r.mean_rates()
        residual, decay = self._of_sequence(sequence)
        coupled = r.mean(r.coupled)
        return _shifted(residual, coupled), _shifted(decay, coupled)

    def entry_functions(
        self, name: str, like: torch.Tensor
    ) -> tuple[SpectralFunction, SpectralFunction]:
        """(residual, decay) of block ``name`` acting entry by entry, each entry with its
        own rates and coupled decay: exact where the block's eigenbasis is the identity
        (σ then holds one eigenvalue per entry, shaped like ``like``, (d_out, d_in))."""
        r = self.blocks[name]
        if r.uniform:
            return self.block_functions(name)
        residual: SpectralFunction
        decay: SpectralFunction
        if self.discrete:
            residual, decay = _EntrywiseDiscrete(r, True), _EntrywiseDiscrete(r, False)
        else:
            s = r.entry_sums(like)
            residual, decay = Residual(s), Decay(s)
        coupled = r.entrywise(r.coupled, torch.zeros_like(like))
        return _shifted(residual, coupled), _shifted(decay, coupled)

    def entry_decay(self, name: str, rate: torch.Tensor) -> torch.Tensor:
        """e^{−s x} per entry (or Π_k (1 − η_k x)), each entry with its own rates, for
        per-entry values x shaped like the block (Adam's diagonal decay)."""
        r = self.blocks[name]
        if self.discrete:
            return _EntrywiseDiscrete(r, False)(rate)
        return torch.exp(-r.entry_sums(rate) * rate)

    def reference(self) -> tuple[float, SpectralFunction]:
        """(s, R): the fastest parameter's learning-rate sum and the residual of its
        sequence, the reference of P = s_p / s (the dense kinds)."""
        sequence = max(
            (part[1] for r in self.blocks.values() for part in r.parts),
            key=lambda rates: float(rates.sum()),
        )
        return float(sequence.sum()), self._of_sequence(sequence)[0]
