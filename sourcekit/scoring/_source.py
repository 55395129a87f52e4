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

Adam and AdamW segments are preconditioned descent with a diagonal P̄ (from the recorded
moments): in the coordinates x = p^{−½}δθ they are plain descent on the symmetric
K̄ = p^½(H̄ + λ_c)p^½ + λ_w (``sourcekit.curvature._preconditioner``; λ_c the coupled
decay, λ_w AdamW's decoupled decay, p = P̄ times each parameter's relative rate), so

    S̄ = p^½ e^{−sK̄} p^{−½},   r̄(m) = p^½ F_r(K̄) p^½ ḡ(m) / N_ℓ,

and the query side computes u = p^½ F_r(K̄ + δ) p^½ v and carries v ← S̄ᵀ v, the damping
δ added to K̄'s eigenvalues. With P̄ and H̄ constant in a segment the discrete form with a
dense curvature equals exact unrolling; the eigenbasis kinds project P̄ on their basis.

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

from ..curvature import Carried, Curvature, DenseCurvature
from ..curvature._preconditioner import AdamForm
from ..curvature._rates import BlockRates, SegmentRates
from ..curvature._refined import RefinedAdam
from ..curvature._spectral import Decay, DiscreteDecay, DiscreteResidual, Residual
from ..gradients._training import GradientSource
from ..trajectory import Segment
from ._contraction import gradient_dot, query_matrices

__all__ = [
    "SegmentModel",
    "default_damping",
    "precondition",
    "shifted_matrix_mean",
    "source_scores",
]


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
    adam : DenseAdam or EigenbasisAdam, or None
        Under Adam and AdamW, the preconditioned curvature K̄ the segment's updates see
        (:func:`~sourcekit.curvature._preconditioner.preconditioned_curvature`).
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
    adam: AdamForm | RefinedAdam | None = None

    @property
    def lr_sum(self) -> float:
        return float(self.learning_rates.sum())

    def sequence(self) -> np.ndarray:
        """The learning rates the segment's functions are formed from: its own, or where
        parameters train at their own rates those of the fastest (the reference of
        their relative rates)."""
        if self.rates is None:
            return self.learning_rates
        return max(
            (part[1] for r in self.rates.values() for part in r.parts),
            key=lambda rates: float(rates.sum()),
        )


AUTO_DAMPING = 0.01
"""c in the eigenbasis kinds' default damping δ_ℓ = c / s_ℓ (``damping="auto"``;
docs/source.md, "Damping")."""

DENSE_SHRINKAGE = 1.0
"""ρ/(1 − ρ) in the dense kinds' default damping δ_ℓ = ρ/(1 − ρ) · m_ℓ, m_ℓ the mean
eigenvalue: the shrinkage (1 − ρ)H + ρ m I of the sample matrix towards its mean
eigenvalue, with ρ = ½ (docs/source.md, "Damping")."""


def shifted_matrix_mean(model: SegmentModel) -> float | None:
    """m_ℓ, the mean eigenvalue (trace / P) of the matrix the damping shifts, where the
    curvature is dense: H̄ + λ_c under SGD (λ_c the coupled decay), K̄ under Adam and
    AdamW (its decays included). None for the other kinds.

    Where parameters train at their own rates, λ_c is the first block's decay (as
    ``weight_decay`` reports it).
    """
    if model.adam is not None:
        shifted = model.adam.curvature
        return (
            float(torch.diagonal(shifted.matrix).mean())
            if isinstance(shifted, DenseCurvature)
            else None
        )
    if not isinstance(model.curvature, DenseCurvature):
        return None
    return float(torch.diagonal(model.curvature.matrix).mean()) + model.weight_decay


def default_damping(segments: Sequence[SegmentModel]) -> list[float]:
    """The default damping of each segment (``damping="auto"``).

    The damping shifts the curvature the segment's updates see (H̄ under SGD, K̄ under
    Adam), and SOURCE's matrix functions read it only through s_ℓ σ:
    F_S(σ + δ) = e^{−sδ} F_S(σ) and F_r(σ + δ) = (1 − e^{−s(σ+δ)})/(σ + δ).

    - The eigenbasis kinds (EK-FAC, K-FAC, diagonal, identity, and their refinement)
      take δ_ℓ = 0.01 / s_ℓ, s_ℓ the segment's learning-rate sum: every carried effect
      is multiplied by e^{−0.01} and directions flatter than 1/s_ℓ keep a residual of
      s_ℓ (1 − e^{−0.01})/0.01 instead of s_ℓ, the same under SGD and Adam, for any
      learning rate or loss scale. Their eigenvalues are the diagonal of the curvature
      in a basis fitted to the Kronecker factors only, already averaged towards the
      mean (Schur-Horn), so they need no more than that.
    - The dense kinds (``"exact"``, ``"hessian"``) take δ_ℓ = max(m_ℓ, 0.01 / s_ℓ), m_ℓ
      the mean eigenvalue of the matrix the damping shifts
      (:func:`shifted_matrix_mean`). Their eigenvectors are fitted to the same examples
      as their eigenvalues, so the small eigenvalues of the sample matrix lie below
      those of the matrix it estimates (the spread of a sample covariance's spectrum);
      shrinking it towards its mean eigenvalue, (1 − ρ)H + ρ m I, is up to the factor
      1 − ρ a damping by ρ/(1 − ρ) · m, and ρ = ½ gives m. The floor keeps the
      eigenbasis rule where m is not positive (a Hessian's trace can be negative).

    A segment with s_ℓ = 0 (no training) gets 0.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from sourcekit.scoring._source import default_damping
    >>> import numpy as np
    >>> segments = [
    ...     SimpleNamespace(sequence=lambda r=r: np.array(r), adam=None, curvature=None)
    ...     for r in ([1.0, 1.0], [0.25])
    ... ]
    >>> default_damping(segments)
    [0.005, 0.04]
    """
    dampings = []
    for model in segments:
        s = float(np.sum(model.sequence()))
        if s <= 0:
            dampings.append(0.0)
            continue
        floor = AUTO_DAMPING / s
        mean = shifted_matrix_mean(model)
        dampings.append(floor if mean is None else max(DENSE_SHRINKAGE * mean, floor))
    return dampings


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

    Under SGD u = F_r(H̄ + λ) v and v_next = F_S(H̄ + λ) v, λ the damping plus the
    coupled decay; under Adam u = p^½ F_r(K̄ + δ) p^½ v and v_next = S̄ᵀ v, δ the damping
    (``sourcekit.curvature._preconditioner``).

    ``v`` comes as the previous step of the chain left it: in parameter coordinates or
    in a curvature's eigenbasis (:class:`~sourcekit.curvature.Carried`). A curvature
    with an eigenbasis of its own takes it from there with one change of basis and
    leaves v_next in its basis (:meth:`~sourcekit.curvature.Curvature.apply_carried`),
    under Adam too (the eigenbasis kinds project P̄ on it).

    ``dtype`` is the precision of the rotations into the curvature's eigenbasis and back
    (default float64); the matrix functions are evaluated in float64. It applies where
    those functions are bounded (the residual by s, the decay by 1), so that a rotation's
    rounding is not amplified. Under Adam the residual is scaled by P̄, which spans
    orders of magnitude (up to 1/ε): that path rotates in float64 whatever ``dtype``
    says, and only its results are rounded to it.
    """
    curvature = model.curvature
    shift = damping + model.weight_decay
    work = torch.float64 if dtype is None else dtype

    def rounded(vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t.to(work) for k, t in vectors.items()}

    if model.adam is None and model.rates is not None:
        scoring, after = curvature.apply_rates(
            SegmentRates(model.rates, matrix_function), v, damping, dtype
        )
        return rounded(scoring.in_parameters()), (after.to(work) if carry else None)
    residual: Callable[[torch.Tensor], torch.Tensor]
    decay: Callable[[torch.Tensor], torch.Tensor]
    sequence = model.sequence()
    if matrix_function == "exp":
        total = float(sequence.sum())
        residual, decay = Residual(total), Decay(total)
    else:
        residual, decay = DiscreteResidual(sequence), DiscreteDecay(sequence)
    if model.adam is None:
        fns = (residual, decay) if carry else (residual,)
        applied = curvature.apply_carried(fns, v, shift, dtype)
        return rounded(applied[0].in_parameters()), (applied[1].to(work) if carry else None)
    # Adam: K̄ + δ, in float64 whatever ``dtype`` says (p can span many orders of magnitude).
    u, carried = model.adam.apply((residual, decay), v, damping, carry)
    return rounded(u), (carried.to(work) if carried is not None else None)


def source_scores(
    query_gradients: dict[str, torch.Tensor],
    segments: Sequence[SegmentModel],
    training_gradients: GradientSource,
    stage_examples: Sequence[np.ndarray],
    *,
    n_train: int,
    damping: float | Sequence[float],
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
    damping : float or sequence of float
        Added to the eigenvalues of every segment's curvature (H̄ under SGD, K̄ under
        Adam), or one value per segment, in training order.
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
    dampings = (
        [float(damping)] * len(ordered)
        if isinstance(damping, (int, float))
        else [float(d) for d in damping]
    )
    if len(dampings) != len(ordered):
        raise ValueError(
            f"SOURCE got {len(dampings)} dampings for {len(ordered)} segments; give one per segment."
        )
    for position, model in enumerate(reversed(ordered)):
        assert v is not None
        last = position == len(ordered) - 1  # the first segment carries nothing further back
        damped = dampings[len(ordered) - 1 - position]
        u, v = precondition(model, v, damped, matrix_function, dtype=dtype, carry=not last)
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
