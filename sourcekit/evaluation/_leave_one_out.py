"""Leave-one-out retraining: the exact counterfactual for single training examples.

The ground truth in sourcekit's sign convention is the effect of *including* example m,
``f(z_q, θ(D)) − f(z_q, θ(D \\ z_m))``, estimated by retraining the recipe on the full
training set and on the set without m, with the same seeds (a paired comparison, so that
seed noise cancels as far as it can). It costs one retraining per example and seed:
meant for small runs and a few examples.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..trajectory import AttributionTask, Examples, Trajectory
from ._recipe import Retrain
from ._retrain import check_seeds, run_retrainings

__all__ = ["LeaveOneOutResult", "leave_one_out_measurements"]


@dataclass(frozen=True, eq=False)
class LeaveOneOutResult:
    """The measured effect of including each of some training examples.

    Attributes
    ----------
    effects : ndarray of shape (n_queries, n_examples)
        ``f(full) − f(without m)`` averaged over the seeds, in the same sign and units
        as ``scores[:, examples]`` of any attributor. It is not the same quantity as a
        first-order score: retraining without m also averages every batch's loss over
        one example fewer and reshuffles the batches, and a whole example is a finite
        change, so the two agree only up to those effects (closely for converged
        convex problems, loosely far from convergence).
    per_seed : ndarray of shape (n_seeds, n_queries, n_examples)
    examples : ndarray of int
        The training examples left out, one column each.
    seeds : tuple of int

    Examples
    --------
    The effect of including each of two examples on a linear regression's prediction:

    >>> import torch, sourcekit
    >>> from sourcekit.evaluation import leave_one_out_measurements
    >>> g = torch.Generator().manual_seed(0)
    >>> data = sourcekit.Examples(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=5, batch_size=8)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 1), data, [stage], loss="squared_error",
    ...                              measurement="output", progress=False)
    >>> loo = leave_one_out_measurements(trajectory, data[:2], [0, 5], seeds=0, progress=False)
    >>> loo
    LeaveOneOutResult(n_queries=2, n_examples=2, seeds=(0,))
    >>> loo.effects.shape, loo.per_seed.shape, loo.examples.tolist()
    ((2, 2), (1, 2, 2), [0, 5])
    """

    effects: np.ndarray
    per_seed: np.ndarray
    examples: np.ndarray
    seeds: tuple[int, ...]

    def __repr__(self) -> str:
        n_queries, n_examples = self.effects.shape
        return (
            f"LeaveOneOutResult(n_queries={n_queries}, n_examples={n_examples}, "
            f"seeds={self.seeds})"
        )


def _check_examples(examples: Any, n_train: int) -> np.ndarray:
    if examples is None:
        return np.arange(n_train, dtype=np.int64)
    array = np.asarray(examples)
    if (
        array.ndim != 1
        or array.size == 0
        or not np.issubdtype(array.dtype, np.integer)
        or array.min() < 0
        or array.max() >= n_train
    ):
        raise ValueError(
            f"The 'examples' must be a non-empty 1-d array of training-example indices in "
            f"[0, {n_train}); got {examples!r}."
        )
    return array.astype(np.int64)


def leave_one_out_measurements(
    trajectory: Trajectory,
    queries: Examples | AttributionTask,
    examples: Any = None,
    *,
    seeds: int | Sequence[int] = (0, 1, 2),
    n_jobs: int | None = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    retrain: Retrain | None = None,
) -> LeaveOneOutResult:
    """Leave-one-out ground truth: how much including each example moves each query.

    Retrains the recipe (as :func:`~sourcekit.evaluation.retrain_measurements` does) on
    the full training set and on the set without each of ``examples``, once per seed.

    Parameters
    ----------
    trajectory : Trajectory
    queries : Examples or AttributionTask
    examples : array-like of int, optional
        The training examples to leave out (default: all of them).
    seeds : int or sequence of int, default=(0, 1, 2)
        As in :func:`~sourcekit.evaluation.retrain_measurements`.
    n_jobs : int or None, default=1
        As in :func:`~sourcekit.evaluation.retrain_measurements`.
    cache_dir : str or path, optional
        As in :func:`~sourcekit.evaluation.retrain_measurements` (the cache is shared
        with it).
    progress : bool, default=True
        Show a progress bar over the retrainings.
    retrain : callable, optional
        As in :func:`~sourcekit.evaluation.retrain_measurements`.

    Returns
    -------
    LeaveOneOutResult
        ``effects[q, i] = f(z_q, θ(D)) − f(z_q, θ(D \\ z_{examples[i]}))``, averaged over
        seeds: sourcekit's sign convention (positive: the example pushed the measurement
        up).

    Examples
    --------
    >>> import torch, sourcekit
    >>> from sourcekit.evaluation import leave_one_out_measurements
    >>> data = sourcekit.Examples(torch.randn(8, 3), torch.randn(8, 1))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=5, batch_size=8)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 1), data, [stage], loss="squared_error",
    ...                              measurement="output", progress=False)
    >>> loo = leave_one_out_measurements(trajectory, data[:2], [0, 5], seeds=0, progress=False)
    >>> loo.effects.shape
    (2, 2)
    """
    if not isinstance(trajectory, Trajectory):
        raise TypeError(
            f"Counterfactual retraining needs a Trajectory; got {type(trajectory).__name__}."
        )
    examples = _check_examples(examples, trajectory.n_train)
    masks = np.ones((examples.size + 1, trajectory.n_train), dtype=bool)
    masks[np.arange(1, examples.size + 1), examples] = False  # row 0 keeps everything
    per_seed, _ = run_retrainings(
        trajectory,
        queries,
        masks,
        seeds,
        retrain=retrain,
        n_jobs=n_jobs,
        cache_dir=cache_dir,
        progress=progress,
    )
    effects = per_seed[:, :, :1] - per_seed[:, :, 1:]
    return LeaveOneOutResult(
        effects=effects.mean(axis=0),
        per_seed=effects,
        examples=examples,
        seeds=check_seeds(seeds),
    )
