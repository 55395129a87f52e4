"""The SOURCE score (METHOD.md section 4), computed query side first.

For segments ℓ = 1..L with curvature H̄_ℓ, learning-rate sum s_ℓ, averaged training
gradients ḡ_ℓ(m) over the segment's checkpoints and N_ℓ examples in its stage,

    S̄_ℓ = exp(−s_ℓ H̄_ℓ),   r̄_ℓ(m) = (1/N_ℓ) (I − exp(−s_ℓ H̄_ℓ)) H̄_ℓ⁻¹ ḡ_ℓ(m),
    τ[q, m] = −∇f(z_q, θ_T)ᵀ Σ_ℓ S̄_L ⋯ S̄_{ℓ+1} r̄_ℓ(m).

Every S̄ is symmetric, so for each query v ← ∇f(z_q, θ_T) and, for ℓ = L..1,
u_ℓ = F_r,ℓ(H̄_ℓ) v; τ[q, m] −= (1/N_ℓ) mean_{c∈ℓ} u_ℓᵀ ∇L(z_m, θ_c); v ← F_S,ℓ(H̄_ℓ) v.
Each segment applies its functions in its own eigenbasis. The products u_ℓᵀ ∇L are
contracted block by block with the training examples' layer inputs and output
gradients (:func:`~sourcekit.scoring._contraction.gradient_dot`), optionally with each
u_ℓ replaced by its best rank-r approximation per block (``query_rank``).

Adam and AdamW segments use a diagonal preconditioner P̄ (from the recorded second
moments) and the diagonal D of H̄ in the exponent, and the full curvature in the inverse:
S̄ = exp(−s(P̄(D + λ) + λ_w)), r̄ = (I − S̄)(H̄ + λ + λ_w/P̄)⁻¹ ḡ / N_ℓ, where λ is the
damping plus coupled weight decay and λ_w AdamW's decoupled decay (whose 1/P̄ is
replaced by its mean over each block, the one approximation beyond METHOD.md).

Parameters that train at their own rates (parameter groups, layers frozen in a stage,
clipping) enter with their own learning-rate sums and decays: the curvature applies a
segment's functions through :meth:`~sourcekit.curvature.Curvature.apply_rates`
(``sourcekit.curvature._rates`` derives it), and Adam's diagonal decay takes each
entry's own sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..curvature import Carried, Curvature
from ..curvature._rates import BlockRates, SegmentRates
from ..curvature._spectral import Decay, DiscreteDecay, DiscreteResidual, Inverse, Residual
from ..gradients._training import GradientSource
from ..trajectory import Segment
from ._contraction import gradient_dot, query_matrices

__all__ = ["SegmentModel", "precondition", "source_scores"]


@dataclass
class SegmentModel:
    """Everything SOURCE needs about one segment, independent of the damping.

    Attributes
    ----------
    segment : Segment
    curvature : EigenbasisCurvature or DenseCurvature
        H̄_ℓ (without damping or weight decay).
    learning_rates : ndarray
        Effective learning rate of each step (η_k, times 1/(1−β) under momentum).
    n_examples : int
        N_ℓ, the number of training examples of the segment's stage.
    weight_decay : float
        Coupled L2 coefficient (SGD, Adam), added to the eigenvalues.
    decoupled_decay : float
        AdamW's decoupled coefficient (0 otherwise).
    preconditioner : dict of block name to tensor, or None
        Adam's P̄ = mean_c 1/(√v̂_c + ε) per block, in parameter coordinates
        (:func:`~sourcekit.curvature._preconditioner.adam_preconditioner`).
    rates : dict of block name to BlockRates, or None
        Each block's own rates and decays when the parameters do not all share one
        sequence and one decay (parameter groups, frozen parameters: see
        :mod:`sourcekit.curvature._rates`); ``learning_rates`` and the decays above are
        then those of the first block, for reporting.
    """

    segment: Segment
    curvature: Curvature
    learning_rates: np.ndarray
    n_examples: int
    weight_decay: float = 0.0
    decoupled_decay: float = 0.0
    preconditioner: dict[str, torch.Tensor] | None = None
    rates: dict[str, BlockRates] | None = None

    @property
    def lr_sum(self) -> float:
        return float(self.learning_rates.sum())


def _multiply(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] * b[k].to(a[k].dtype) for k in a}


def _diagonal_decay(
    model: SegmentModel, damping: float, matrix_function: str
) -> dict[str, torch.Tensor]:
    """exp(−s(P̄(D + λ) + λ_w)) per parameter (or its finite-product form), each entry
    with its own sums and decays where the parameters train at their own rates."""
    assert model.preconditioner is not None
    diag = model.curvature.diagonal()
    out = {}
    if model.rates is not None:
        rates = SegmentRates(model.rates, matrix_function)
        for name, d in diag.items():
            r = model.rates[name]
            coupled, decoupled = (
                r.entrywise(x, torch.zeros_like(d)) for x in (r.coupled, r.decoupled)
            )
            rate = model.preconditioner[name].to(d) * (d + damping + coupled) + decoupled
            out[name] = rates.entry_decay(name, rate)
        return out
    for name, d in diag.items():
        rate = (
            model.preconditioner[name].to(d) * (d + damping + model.weight_decay)
            + model.decoupled_decay
        )
        if matrix_function == "exp":
            out[name] = torch.exp(-model.lr_sum * rate)
        else:
            out[name] = DiscreteDecay(model.learning_rates)(rate)
    return out


def precondition(
    model: SegmentModel,
    v: Carried,
    damping: float,
    matrix_function: str,
    *,
    dtype: torch.dtype | None = None,
    carry: bool = True,
) -> tuple[dict[str, torch.Tensor], Carried | None]:
    """(u, v_next): the vector scoring this segment's gradients, in parameter coordinates,
    and v carried to the previous segment (None when ``carry`` is False: the first
    segment has no previous one).

    ``v`` comes as the previous step of the chain left it: in parameter coordinates or
    in a curvature's eigenbasis (:class:`~sourcekit.curvature.Carried`). A curvature
    with an eigenbasis of its own takes it from there with one change of basis and
    leaves v_next in its basis (:meth:`~sourcekit.curvature.Curvature.apply_carried`);
    Adam's preconditioner acts in parameter coordinates, so its segments take and hand
    over v there.

    ``dtype`` is the precision of the rotations into the curvature's eigenbasis and back
    (default float64); the matrix functions are evaluated in float64. It applies where
    those functions are bounded (the residual by s, the decay by 1), so that a rotation's
    rounding is not amplified. Under Adam the residual is an inverse, 1/(σ + shift),
    which amplifies the rounding of the small-σ directions by up to 1/shift: that path
    rotates in float64 whatever ``dtype`` says, and only its results are rounded to it.
    """
    curvature = model.curvature
    shift = damping + model.weight_decay
    work = torch.float64 if dtype is None else dtype

    def rounded(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t.to(work) for k, t in vectors.items()}

    if model.preconditioner is None and model.rates is not None:
        scoring, after = curvature.apply_rates(
            SegmentRates(model.rates, matrix_function), v, damping, dtype
        )
        return rounded(scoring.in_parameters()), (after.to(work) if carry else None)
    if model.preconditioner is None:
        residual: Callable[[torch.Tensor], torch.Tensor]
        decay: Callable[[torch.Tensor], torch.Tensor]
        if matrix_function == "exp":
            residual, decay = Residual(model.lr_sum), Decay(model.lr_sum)
        else:
            residual, decay = (
                DiscreteResidual(model.learning_rates),
                DiscreteDecay(model.learning_rates),
            )
        fns = (residual, decay) if carry else (residual,)
        applied = curvature.apply_carried(fns, v, shift, dtype)
        return rounded(applied[0].in_parameters()), (applied[1].to(work) if carry else None)
    params = v.in_parameters()
    decay_diag = _diagonal_decay(model, damping, matrix_function)
    complement = {k: 1.0 - e for k, e in decay_diag.items()}
    shifts: float | dict[str, float] = shift
    if model.rates is not None:  # each block's mean decays in its inverse
        inv_p = {k: float((1.0 / p).mean()) for k, p in model.preconditioner.items()}
        shifts = {
            k: damping + r.mean(r.coupled) + r.mean(r.decoupled) * inv_p[k]
            for k, r in model.rates.items()
        }
    elif model.decoupled_decay:
        inv_p = {k: float((1.0 / p).mean()) for k, p in model.preconditioner.items()}
        shifts = {k: shift + model.decoupled_decay * inv_p[k] for k in inv_p}
    u = curvature.apply(Inverse(), _multiply(complement, params), shifts)
    return rounded(u), (Carried(rounded(_multiply(decay_diag, params))) if carry else None)


def source_scores(
    query_gradients: dict[str, torch.Tensor],
    segments: Sequence[SegmentModel],
    training_gradients: GradientSource,
    stage_examples: Sequence[np.ndarray],
    *,
    n_train: int,
    damping: float,
    matrix_function: str = "exp",
    dtype: torch.dtype = torch.float32,
    query_rank: int | None = None,
) -> torch.Tensor:
    """SOURCE scores of shape (n_queries, n_train).

    Parameters
    ----------
    query_gradients : dict of block name to tensor (n_queries, d_out, d_in)
        ∇f(z_q, θ_T) per block.
    segments : sequence of SegmentModel
        In training order.
    training_gradients : callable
        ``training_gradients(step, examples)`` yields ``(indices, {block: (n, d_out, d_in)})``
        with the gradients ∇L(z_m, θ_step) of the given examples (each example once).
    stage_examples : sequence of int arrays
        The examples of each stage (examples outside a segment's stage score 0 there).
    query_rank : int, optional
        Replace each preconditioned query matrix u_ℓ of a block by its best rank-r
        approximation (truncated SVD) before contracting (None: exact).
    """
    n_queries = next(iter(query_gradients.values())).shape[0]
    device = next(iter(query_gradients.values())).device
    scores = torch.zeros(n_queries, n_train, dtype=dtype, device=device)
    # The chain runs in ``dtype``: its rotations are the query side's whole cost (Q
    # queries x P parameters x (d_in + d_out) per segment), and orthogonal rotations in
    # float32 round each entry by about eps32 √d of the vector's scale.
    v: Carried | None = Carried({k: g.to(dtype) for k, g in query_gradients.items()})
    ordered = list(segments)
    for position, model in enumerate(reversed(ordered)):
        assert v is not None
        last = position == len(ordered) - 1  # the first segment carries nothing further back
        u, v = precondition(model, v, damping, matrix_function, dtype=dtype, carry=not last)
        queries = query_matrices(u, model.curvature.blocks, query_rank, dtype)
        del u  # dropped once used: the chain holds about three vectors (query_slices)
        weight = 1.0 / (model.n_examples * len(model.segment.checkpoints))
        seen = np.zeros(n_train, dtype=np.int64)
        for step in model.segment.checkpoints:
            for indices, grads in training_gradients(step, stage_examples[model.segment.stage]):
                block_scores = gradient_dot(queries, grads, dtype)
                scores.index_add_(
                    1, torch.from_numpy(indices).to(device), block_scores, alpha=-weight
                )
                seen[indices] += 1
        expected = np.zeros(n_train, dtype=np.int64)
        expected[stage_examples[model.segment.stage]] = len(model.segment.checkpoints)
        if not np.array_equal(seen, expected):
            raise RuntimeError(
                "SOURCE scored a training example more or less than once per checkpoint."
            )
        del queries
    return scores
