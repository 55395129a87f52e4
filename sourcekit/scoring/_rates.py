"""SOURCE when parameters train at different rates: parameter groups and frozen layers.

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

How each curvature kind takes it:

- the dense kinds ("exact", "hessian"): exactly as above, for any P; the reference
  sequence is that of the fastest parameter, exact when every parameter's rates are a
  constant multiple of it (groups sharing one schedule), the sums s_p kept exact otherwise;
- block-diagonal kinds ("ekfac", "kfac", "diagonal", "identity"): K is block-diagonal
  too. A block whose parameters share one sequence and one decay gets its own functions
  of its own eigenvalues, exactly. A block whose weight and bias differ (a bias in a
  no-decay group) is exact where its eigenbasis is the identity ("diagonal",
  "identity", embedding tables: the functions act entry by entry), and otherwise takes
  the mean over its entries of the sequence and the decay: the one approximation here.

Adam's diagonal preconditioner path reads the same per-entry sums and decays in the
parameter coordinates where it works (exactly), and the per-block mean shift in its
inverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..curvature._objects import DenseCurvature, EigenbasisCurvature
from ..curvature._spectral import Decay, DiscreteDecay, DiscreteResidual, Residual
from ..gradients._layers import LayerBlock
from ..trajectory import Segment, Trajectory
from ..trajectory._settings import effective_learning_rates, weight_decays

__all__ = ["BlockRates", "block_rates", "precondition_rates", "rates_decay"]


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

    def __init__(self, rates: BlockRates, n_steps: int, residual: bool) -> None:
        self.rates, self.n_steps, self.residual = rates, n_steps, residual

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(sigma) if self.residual else torch.ones_like(sigma)
        for k in range(self.n_steps):
            eta = self.rates.entry_rates(k, sigma)
            out = out * (1 - eta * sigma) + (eta if self.residual else 0.0)
        return out


def rates_decay(rates: BlockRates, rate: torch.Tensor) -> torch.Tensor:
    """Π_k (1 − η_k x) per entry, with each entry's own rates η_k (Adam's finite-product decay)."""
    return _EntrywiseDiscrete(rates, rates.parts[0][1].size, False)(rate)


def _functions(
    rates: BlockRates, matrix_function: str, per_entry: bool, like: torch.Tensor
) -> tuple[Callable, Callable]:
    """(residual, decay) of one block, per entry or from the block's mean rates."""
    if per_entry:
        if matrix_function == "exp":
            s = rates.entry_sums(like)
            return Residual(s), Decay(s)
        n = rates.parts[0][1].size
        return _EntrywiseDiscrete(rates, n, True), _EntrywiseDiscrete(rates, n, False)
    sequence = rates.parts[0][1] if len(rates.parts) == 1 else rates.mean_rates()
    if matrix_function == "exp":
        return Residual(float(sequence.sum())), Decay(float(sequence.sum()))
    return DiscreteResidual(sequence), DiscreteDecay(sequence)


def _shifted(fn: Callable, shift: torch.Tensor | float) -> Callable:
    return lambda sigma: fn(sigma + shift)


def precondition_rates(
    curvature: object,
    rates: dict[str, BlockRates],
    v: dict[str, torch.Tensor],
    damping: float,
    matrix_function: str,
    *,
    dtype: torch.dtype | None,
    carry: bool,
    rotated: bool,
    target: EigenbasisCurvature | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(u, v_next) of a segment whose parameters train at different rates (module docstring)."""
    if isinstance(curvature, DenseCurvature):
        return _dense(curvature, rates, v, damping, matrix_function, carry)
    assert isinstance(curvature, EigenbasisCurvature)
    u: dict[str, torch.Tensor] = {}
    carried: dict[str, torch.Tensor] = {}
    for block in curvature.blocks:
        factors = curvature.factors[block.name]
        r = rates[block.name]
        identity = factors.q_s is None and factors.q_a is None
        per_entry = identity and not r.uniform
        residual, decay = _functions(r, matrix_function, per_entry, factors.eigenvalues)
        coupled: torch.Tensor | float = r.mean(r.coupled)
        if per_entry and isinstance(r.coupled, torch.Tensor):
            coupled = r.coupled.to(factors.eigenvalues)
        fns = (_shifted(residual, coupled), _shifted(decay, coupled))
        one = EigenbasisCurvature(curvature.kind, [block], {block.name: factors})
        aim = (
            None
            if target is None
            else EigenbasisCurvature(
                target.kind, [block], {block.name: target.factors[block.name]}
            )
        )
        out = one.apply_many(
            fns if carry else fns[:1],
            {block.name: v[block.name]},
            damping,
            dtype,
            rotated=rotated,
            targets=(None, aim) if carry else (None,),
        )
        u[block.name] = out[0][block.name]
        if carry:
            carried[block.name] = out[1][block.name]
    return u, (carried if carry else None)


def _dense(
    curvature: DenseCurvature,
    rates: dict[str, BlockRates],
    v: dict[str, torch.Tensor],
    damping: float,
    matrix_function: str,
    carry: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """u = P^½ R(K) P^½ v and v_next = v − (H + Λ) u, with K = P^½ (H + Λ) P^½."""
    matrix = curvature.matrix
    sums, decays = [], []
    for b in curvature.blocks:
        like = torch.zeros(b.d_out, b.d_in, dtype=matrix.dtype, device=matrix.device)
        sums.append(rates[b.name].entry_sums(like).reshape(-1))
        coupled = rates[b.name].coupled
        decays.append(
            (like + (coupled.to(like) if isinstance(coupled, torch.Tensor) else coupled)).reshape(
                -1
            )
        )
    s_p, decay = torch.cat(sums), torch.cat(decays)
    # The reference sequence: the fastest parameter's (P ≤ 1 elsewhere).
    fastest = max(
        ((b.name, part) for b in curvature.blocks for part in rates[b.name].parts),
        key=lambda item: float(item[1][1].sum()),
    )
    sequence = fastest[1][1]
    total = float(sequence.sum())
    p = s_p / total if total > 0 else torch.zeros_like(s_p)
    root = p.sqrt()
    shifted = matrix + torch.diag(decay + damping)
    k = root[:, None] * shifted * root[None, :]
    lam, q = torch.linalg.eigh(0.5 * (k + k.T))
    if matrix_function == "exp":
        values = Residual(total)(lam)
    else:
        values = DiscreteResidual(sequence)(lam)
    flat = curvature.flatten(v).to(matrix.dtype)
    u_flat = (((flat * root) @ q) * values) @ q.T * root
    u = curvature.unflatten(u_flat)
    if not carry:
        return u, None
    return u, curvature.unflatten(flat - u_flat @ shifted)
