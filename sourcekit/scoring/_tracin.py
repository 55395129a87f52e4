"""TracIn (METHOD.md section 6): first-order effects summed over checkpoints, no propagation.

    τ[q, m] = −Σ_c (η_c / N_c) ∇f(z_q, θ_c)ᵀ ∇L(z_m, θ_c)

over the trajectory's attribution checkpoints c, with η_c the learning rate summed over
the steps the checkpoint stands for (:func:`~sourcekit.trajectory._segments.checkpoint_spans`),
optionally times the stage's heavy-ball factor (1 − dampening)/(1 − β), and N_c the
number of examples of the checkpoint's stage; examples outside that stage contribute 0
at c. Each term is what one full-batch gradient step of size η_c at θ_c does to f
*measured at θ_c*: TracIn ignores how later training transforms the step (the
(I − ηH) factors of exact unrolling), and measures the query at each checkpoint instead
of at θ_T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..gradients._training import GradientSource
from ..trajectory import Trajectory
from ..trajectory._segments import checkpoint_spans
from ._contraction import gradient_dot

__all__ = ["TracInCheckpoint", "tracin_checkpoints", "tracin_scores"]


@dataclass(frozen=True)
class TracInCheckpoint:
    """One term of the TracIn sum.

    Attributes
    ----------
    step : int
        The checkpoint θ_c.
    stage : int
        Index of the stage that trains at ``step``.
    start, end : int
        The steps ``start .. end-1`` the checkpoint stands for.
    learning_rate : float
        η_c: the learning rates of those steps summed (times the momentum factor when
        corrected).
    n_examples : int
        N_c, the number of training examples of the stage.
    """

    step: int
    stage: int
    start: int
    end: int
    learning_rate: float
    n_examples: int


def tracin_checkpoints(
    trajectory: Trajectory, *, momentum_correction: bool = True
) -> list[TracInCheckpoint]:
    """The TracIn terms of ``trajectory``: one per attribution checkpoint, in order."""
    spans = checkpoint_spans(trajectory)
    terms = []
    for step in trajectory.checkpoint_steps:
        start, end = spans[step]
        stage_index = next(i for i, s in enumerate(trajectory.stages) if s.start <= step < s.end)
        stage = trajectory.stages[stage_index]
        factor = stage.optimizer.effective_lr_factor if momentum_correction else 1.0
        terms.append(
            TracInCheckpoint(
                step=int(step),
                stage=stage_index,
                start=start,
                end=end,
                learning_rate=float(trajectory.learning_rates[start:end].sum()) * factor,
                n_examples=stage.n_examples,
            )
        )
    return terms


def tracin_scores(
    query_gradients: Callable[[int], dict[str, torch.Tensor]],
    checkpoints: Sequence[TracInCheckpoint],
    training_gradients: GradientSource,
    stage_examples: Sequence[np.ndarray],
    *,
    n_train: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """TracIn scores of shape (n_queries, n_train).

    Parameters
    ----------
    query_gradients : callable
        ``query_gradients(step)`` returns ∇f(z_q, θ_step) per block,
        {name: (n_queries, d_out, d_in)}; it is called once per checkpoint, so only one
        checkpoint's query gradients are held at a time.
    checkpoints : sequence of TracInCheckpoint
    training_gradients : callable
        ``training_gradients(step, examples)`` yields ``(indices, {block: (n, d_out, d_in)})``
        with ∇L(z_m, θ_step) for every example of ``examples`` once.
    stage_examples : sequence of int arrays
        The examples of each stage.
    """
    scores: torch.Tensor | None = None
    for term in checkpoints:
        query = query_gradients(term.step)
        if scores is None:
            first = next(iter(query.values()))
            scores = torch.zeros(first.shape[0], n_train, dtype=dtype, device=first.device)
        query = {k: g.to(dtype) for k, g in query.items()}
        weight = term.learning_rate / term.n_examples
        for indices, grads in training_gradients(term.step, stage_examples[term.stage]):
            dots = gradient_dot(query, grads, dtype)
            scores.index_add_(1, torch.from_numpy(indices).to(scores.device), dots, alpha=-weight)
    if scores is None:
        raise ValueError("TracIn needs at least one checkpoint.")
    return scores
