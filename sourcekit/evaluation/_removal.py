"""Subset removal: retrain without each query's top proponents and see what changes.

If the scores are right, the k training examples with the largest scores for a query
(its top proponents) hold its measurement up: retraining without them should lower it,
by about the sum of their scores, and may flip the predicted class. Each query gets its
own retraining; the baseline is the recipe retrained on the full training set with the
same seed (a paired comparison, so that the drop measures the removal, not the seed).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import bad_value
from ..trajectory import AttributionTask, Examples, Trajectory
from ._recipe import Retrain
from ._retrain import check_seeds, run_retrainings

__all__ = ["SubsetRemovalResult", "subset_removal"]


@dataclass(frozen=True, eq=False)
class SubsetRemovalResult:
    """What retraining without each query's top-k proponents did.

    Attributes
    ----------
    k : int
    removed : ndarray of int, shape (n_queries, k)
        The training examples removed for each query, largest score first.
    full, without : ndarray of shape (n_queries,)
        The measurement retrained on all examples and without the removed ones (each
        averaged over the seeds).
    drop : ndarray of shape (n_queries,)
        ``full − without``: how much the measurement fell (positive: it fell).
    predicted_drop : ndarray of shape (n_queries,)
        What the scores predicted: the sum of the removed examples' scores.
    mean_drop : float
    flipped : ndarray of shape (n_queries,) or None
        For classifiers, the fraction of seeds in which the predicted class (argmax of
        the outputs) differs from the full-data retraining's; None otherwise.
    flip_rate : float or None
        Mean of ``flipped``: the fraction of (query, seed) retrainings whose prediction
        flipped.
    seeds : tuple of int

    Examples
    --------
    >>> import torch, sourcekit
    >>> from sourcekit.evaluation import subset_removal
    >>> g = torch.Generator().manual_seed(0)
    >>> data = sourcekit.Examples(torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=3, batch_size=4)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> scores = sourcekit.UnrolledAttributor().fit(trajectory).transform(data[:3])
    >>> result = subset_removal(trajectory, data[:3], scores, k=2, seeds=0, progress=False)
    >>> result.removed.shape, result.drop.shape, result.flipped.shape
    ((3, 2), (3,), (3,))
    >>> bool((result.drop == result.full - result.without).all())
    True
    """

    k: int
    removed: np.ndarray
    full: np.ndarray
    without: np.ndarray
    drop: np.ndarray
    predicted_drop: np.ndarray
    mean_drop: float
    flipped: np.ndarray | None
    flip_rate: float | None
    seeds: tuple[int, ...]

    def __repr__(self) -> str:
        flips = "None" if self.flip_rate is None else f"{self.flip_rate:.3f}"
        return (
            f"SubsetRemovalResult(k={self.k}, n_queries={self.drop.size}, "
            f"mean_drop={self.mean_drop:.4g}, flip_rate={flips})"
        )


def subset_removal(
    trajectory: Trajectory,
    queries: Examples | AttributionTask,
    scores: Any,
    k: int = 10,
    *,
    seeds: int | Sequence[int] = (0, 1, 2),
    n_jobs: int | None = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    retrain: Retrain | None = None,
) -> SubsetRemovalResult:
    """Retrain without each query's top-k proponents and measure the drop.

    Costs ``(n_queries + 1) × n_seeds`` retrainings (queries with the same top-k share
    theirs), through the same machinery and cache as
    :func:`~sourcekit.evaluation.retrain_measurements`.

    Parameters
    ----------
    trajectory : Trajectory
    queries : Examples or AttributionTask
    scores : array-like of shape (n_queries, n_train)
        Attribution scores of the queries (``attributor.transform(queries)``).
    k : int, default=10
        Proponents removed per query (the k largest scores; ties by index).
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
    SubsetRemovalResult

    Examples
    --------
    >>> import torch, sourcekit
    >>> from sourcekit.evaluation import subset_removal
    >>> g = torch.Generator().manual_seed(0)
    >>> data = sourcekit.Examples(torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=3, batch_size=4)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> queries = data[:3]
    >>> scores = sourcekit.UnrolledAttributor().fit(trajectory).transform(queries)
    >>> result = subset_removal(trajectory, queries, scores, k=2, seeds=0, progress=False)
    >>> result.removed.shape, result.drop.shape, 0 <= result.flip_rate <= 1
    ((3, 2), (3,), True)
    """
    if not isinstance(trajectory, Trajectory):
        raise TypeError(
            f"Counterfactual retraining needs a Trajectory; got {type(trajectory).__name__}."
        )
    queries = trajectory.check_queries(queries)
    n_queries, n_train = len(queries), trajectory.n_train
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n_queries, n_train):
        raise ValueError(
            f"The 'scores' must have shape (n_queries, n_train) = ({n_queries}, {n_train}), one "
            f"row per query and one column per training example; got {scores.shape}."
        )
    if not np.isfinite(scores).all():
        raise ValueError("The 'scores' hold NaN or infinite values; pass finite scores.")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < n_train:
        raise ValueError(
            bad_value("k", k, f"an int in [1, {n_train - 1}]", owner="subset_removal")
        )
    k = int(k)
    removed = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    masks = np.ones((n_queries + 1, n_train), dtype=bool)  # row 0: the full training set
    np.put_along_axis(masks[1:], removed, False, axis=1)
    measurements, predictions = run_retrainings(
        trajectory,
        queries,
        masks,
        seeds,
        retrain=retrain,
        n_jobs=n_jobs,
        cache_dir=cache_dir,
        progress=progress,
    )
    rows = np.arange(n_queries)
    full = measurements[:, rows, 0]  # (n_seeds, n_queries)
    without = measurements[:, rows, rows + 1]
    drop = (full - without).mean(axis=0)
    flipped = None
    if predictions is not None:
        flipped = (predictions[:, rows, 0] != predictions[:, rows, rows + 1]).mean(axis=0)
    return SubsetRemovalResult(
        k=k,
        removed=removed,
        full=full.mean(axis=0),
        without=without.mean(axis=0),
        drop=drop,
        predicted_drop=np.take_along_axis(scores, removed, axis=1).sum(axis=1),
        mean_drop=float(drop.mean()) if drop.size else float("nan"),
        flipped=flipped,
        flip_rate=None if flipped is None else float(flipped.mean()),
        seeds=check_seeds(seeds),
    )
