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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..curvature._objects import EigenbasisCurvature
from ..curvature._spectral import Decay, DiscreteDecay, DiscreteResidual, Inverse, Residual
from ..exceptions import TrajectoryError
from ..gradients._layers import LayerBlock
from ..trajectory import Segment, Trajectory
from ..trajectory._settings import effective_learning_rates, stage_groups, weight_decays
from ._contraction import gradient_dot, query_matrices
from ._rates import BlockRates, block_rates, precondition_rates, rates_decay

__all__ = ["SegmentModel", "adam_preconditioner", "segment_models", "source_scores"]

# ``training_gradients(step, examples)`` yields (indices, per-example gradients per block);
# the gradients may be FactoredGradients, contracted without forming them.
TrainingGradients = Callable[
    [int, np.ndarray], Iterable[tuple[np.ndarray, Mapping[str, torch.Tensor]]]
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
        Adam's P̄ = mean_c 1/(√v̂_c + ε) per block, in parameter coordinates.
    rates : dict of block name to BlockRates, or None
        Each block's own rates and decays when the parameters do not all share one
        sequence and one decay (parameter groups, frozen parameters: see
        :mod:`sourcekit.scoring._rates`); ``learning_rates`` and the decays above are then
        those of the first block, for reporting.
    """

    segment: Segment
    curvature: object
    learning_rates: np.ndarray
    n_examples: int
    weight_decay: float = 0.0
    decoupled_decay: float = 0.0
    preconditioner: dict[str, torch.Tensor] | None = None
    rates: dict[str, BlockRates] | None = None

    @property
    def lr_sum(self) -> float:
        return float(self.learning_rates.sum())


def adam_preconditioner(
    trajectory: Trajectory, segment: Segment, blocks: Sequence[LayerBlock]
) -> dict[str, torch.Tensor]:
    """P̄ = mean over the segment's checkpoints of 1/(√v̂ + ε), v̂ the bias-corrected second moment.

    A checkpoint at a stage's first step holds the previous stage's optimiser state (or
    none), so only checkpoints after the stage's first update count.
    """
    stage = trajectory.stages[segment.stage]
    total: dict[str, torch.Tensor] = {}
    used = 0
    for step in segment.checkpoints:
        if step <= stage.start:
            continue
        state = trajectory.checkpoint(step).optimizer
        if "exp_avg_sq" not in state or "step" not in state:
            continue
        # Each parameter's own group: its β₂ at the last update before the checkpoint, its ε.
        settings = {}
        for group in stage_groups(trajectory, stage):
            spec, _ = group.at(step - 1 - stage.start)
            settings.update({name: (spec.betas[1], spec.eps) for name in group.parameters})
        moments = state["exp_avg_sq"]
        shapes = trajectory._param_shapes
        # Parameters the stage does not train have no moments; they take no step (their
        # rate is 0), so any positive preconditioner does: 1.
        root = {
            n: (moments[n].double() / (1 - settings[n][0] ** state["step"])).sqrt()
            + settings[n][1]
            if n in moments and n in settings
            else torch.ones(shapes[n], dtype=torch.float64)
            for b in blocks
            for n in (b.weight, b.bias)
            if n is not None
        }
        for block in blocks:
            p = 1.0 / block.matrix(root)
            total[block.name] = total.get(block.name, 0) + p
        used += 1
    if used == 0:
        raise TrajectoryError(
            f"Segment {segment.index} (steps {segment.start}..{segment.end - 1}) trains with "
            f"{stage.optimizer.kind}, but none of its checkpoints {list(segment.checkpoints)} holds "
            "second moments from this stage. SOURCE needs a checkpoint after the stage's first step: "
            "record checkpoints with TrajectoryRecorder or sourcekit.train."
        )
    return {k: v / used for k, v in total.items()}


def segment_models(
    trajectory: Trajectory,
    segments: Sequence[Segment],
    blocks: Sequence[LayerBlock],
    curvatures: Sequence[object],
) -> list[SegmentModel]:
    """Combine segments, their curvature and the recorded optimiser into SegmentModels."""
    models = []
    for segment, curvature in zip(segments, curvatures, strict=True):
        stage = trajectory.stages[segment.stage]
        opt = stage.optimizer
        rates = block_rates(trajectory, segment, blocks)
        first = blocks[0].weight
        lrs = effective_learning_rates(trajectory, segment.start, segment.end, names=[first])[
            first
        ]
        coupled, decoupled = weight_decays(trajectory, segment.start, segment.end, names=[first])[
            first
        ]
        models.append(
            SegmentModel(
                segment=segment,
                curvature=curvature,
                learning_rates=lrs,
                n_examples=stage.n_examples,
                weight_decay=coupled,
                decoupled_decay=decoupled,
                preconditioner=adam_preconditioner(trajectory, segment, blocks)
                if opt.is_adaptive
                else None,
                rates=rates,
            )
        )
    return models


def _multiply(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] * b[k].to(a[k].dtype) for k in a}


def _diagonal_decay(
    model: SegmentModel, damping: float, matrix_function: str
) -> dict[str, torch.Tensor]:
    """exp(−s(P̄(D + λ) + λ_w)) per parameter (or its finite-product form)."""
    assert model.preconditioner is not None
    diag = model.curvature.diagonal()  # type: ignore[attr-defined]
    out = {}
    for name, d in diag.items():
        if model.rates is not None:  # each entry's own rates and decays
            r = model.rates[name]
            coupled, decoupled = (
                x.to(d) if isinstance(x, torch.Tensor) else x for x in (r.coupled, r.decoupled)
            )
            rate = model.preconditioner[name].to(d) * (d + damping + coupled) + decoupled
            if matrix_function == "exp":
                out[name] = torch.exp(-r.entry_sums(d) * rate)
            else:
                out[name] = rates_decay(r, rate)
            continue
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
    v: dict[str, torch.Tensor],
    damping: float,
    matrix_function: str,
    *,
    dtype: torch.dtype | None = None,
    carry: bool = True,
    rotated: bool = False,
    target: EigenbasisCurvature | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(u, v_next): the vector scoring this segment's gradients, and v carried to the
    previous segment (None when ``carry`` is False: the first segment has no previous one).

    ``rotated`` says ``v`` is given in this segment's eigenbasis, and ``target`` (the
    previous segment's curvature) asks for v_next in that curvature's eigenbasis: the
    chain then changes basis once per segment instead of rotating back to parameter
    coordinates and forward again (both only where neither segment uses Adam's
    preconditioner, whose diagonal acts in parameter coordinates).

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
        u, carried = precondition_rates(
            curvature,
            model.rates,
            v,
            damping,
            matrix_function,
            dtype=dtype,
            carry=carry,
            rotated=rotated,
            target=target,
        )
        return rounded(u), (rounded(carried) if carried is not None else None)
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
        targets = (None, target) if carry else (None,)
        applied = curvature.apply_many(  # type: ignore[attr-defined]
            fns, v, shift, dtype, rotated=rotated, targets=targets
        )
        return rounded(applied[0]), (rounded(applied[1]) if carry else None)
    if rotated or target is not None:
        raise ValueError("Adam segments carry their vectors in parameter coordinates.")
    decay_diag = _diagonal_decay(model, damping, matrix_function)
    complement = {k: 1.0 - e for k, e in decay_diag.items()}
    if model.rates is not None:  # each block's mean decays in its inverse
        inv_p = {k: float((1.0 / p).mean()) for k, p in model.preconditioner.items()}
        shift = {  # type: ignore[assignment]
            k: damping + r.mean(r.coupled) + r.mean(r.decoupled) * inv_p[k]
            for k, r in model.rates.items()
        }
    elif model.decoupled_decay:
        inv_p = {k: float((1.0 / p).mean()) for k, p in model.preconditioner.items()}
        shift = {k: shift + model.decoupled_decay * inv_p[k] for k in inv_p}  # type: ignore[assignment]
    u = curvature.apply(Inverse(), _multiply(complement, v), shift)  # type: ignore[attr-defined]
    return rounded(u), (rounded(_multiply(decay_diag, v)) if carry else None)


def _chain_target(
    model: SegmentModel, previous: SegmentModel | None
) -> EigenbasisCurvature | None:
    """The curvature in whose eigenbasis ``model`` hands its carried vector to ``previous``.

    None (parameter coordinates) unless both segments rotate into an eigenbasis of the
    same blocks and neither uses Adam's preconditioner.
    """
    if previous is None or model.preconditioner is not None or previous.preconditioner is not None:
        return None
    mine, theirs = model.curvature, previous.curvature
    if not (isinstance(mine, EigenbasisCurvature) and isinstance(theirs, EigenbasisCurvature)):
        return None
    return theirs if set(mine.factors) == set(theirs.factors) else None


def source_scores(
    query_gradients: dict[str, torch.Tensor],
    segments: Sequence[SegmentModel],
    training_gradients: TrainingGradients,
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
    v: dict[str, torch.Tensor] | None = {k: g.to(dtype) for k, g in query_gradients.items()}
    ordered = list(segments)
    rotated = False  # whether v is in the eigenbasis of the segment about to use it
    for position, model in enumerate(reversed(ordered)):
        assert v is not None
        last = position == len(ordered) - 1  # the first segment carries nothing further back
        previous = None if last else ordered[len(ordered) - position - 2]
        target = _chain_target(model, previous)
        u, v = precondition(
            model,
            v,
            damping,
            matrix_function,
            dtype=dtype,
            carry=not last,
            rotated=rotated,
            target=target,
        )
        rotated = target is not None
        queries = query_matrices(u, model.curvature.blocks, query_rank, dtype)  # type: ignore[attr-defined]
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
    return scores
