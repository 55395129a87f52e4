"""Retraining ground truth: the measurements of the queries after training on subsets.

For every subset (a row of a mask matrix) and every seed, the trajectory's own recipe is
trained on the kept examples (see :mod:`sourcekit.evaluation._recipe`) and the
trajectory's measurement is taken on the queries at the final model, in evaluation
mode. Retrainings run in parallel with joblib, each single-threaded (so results do not
depend on ``n_jobs``), and can be cached on disk one file per (subset, seed) so that an
interrupted evaluation resumes without recomputing what finished.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import joblib
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._imports import importable_name
from .._validation import bad_value
from ..trajectory import AttributionTask, Examples, Trajectory
from ..trajectory._inputs import call_model
from ._cache import RetrainingCache
from ._masks import check_masks
from ._recipe import RecipeReplay, Retrain

__all__ = ["RetrainingResult", "retrain_measurements", "run_retrainings"]

_QUERY_BATCH = 1024


@dataclass(frozen=True, eq=False)
class RetrainingResult:
    """Measurements of the queries after retraining on each subset.

    Attributes
    ----------
    outputs : ndarray of shape (n_queries, n_subsets)
        ``outputs[q, j]``: the measurement f(z_q, θ_{S_j}) averaged over the seeds (the
        ``y`` of :class:`~sourcekit.evaluation.LDSScorer`).
    per_seed : ndarray of shape (n_seeds, n_queries, n_subsets)
        The same for each seed, in the order of ``seeds``.
    masks : ndarray of bool, shape (n_subsets, n_train)
        The subsets, as given.
    seeds : tuple of int

    Examples
    --------
    >>> import numpy as np
    >>> import torch, sourcekit
    >>> from sourcekit.evaluation import make_subset_masks, retrain_measurements
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> masks = make_subset_masks(trajectory.n_train, n_subsets=5)
    >>> result = retrain_measurements(trajectory, data[:4], masks, seeds=(0, 1), progress=False)
    >>> result
    RetrainingResult(n_queries=4, n_subsets=5, seeds=(0, 1))
    >>> np.allclose(result.outputs, result.per_seed.mean(axis=0))
    True
    """

    outputs: np.ndarray
    per_seed: np.ndarray
    masks: np.ndarray
    seeds: tuple[int, ...]

    def __repr__(self) -> str:
        n_queries, n_subsets = self.outputs.shape
        return (
            f"RetrainingResult(n_queries={n_queries}, n_subsets={n_subsets}, seeds={self.seeds})"
        )


def check_seeds(seeds: Any) -> tuple[int, ...]:
    """``seeds`` as a non-empty tuple of distinct ints (a single int is one seed)."""
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        seeds = (seeds,)
    elif isinstance(seeds, np.ndarray) and seeds.ndim == 1:
        seeds = tuple(seeds.tolist())
    ok = isinstance(seeds, Sequence) and not isinstance(seeds, str) and len(seeds) > 0
    ok = ok and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds)
    if not ok or len(set(seeds)) != len(seeds):
        raise ValueError(
            bad_value(
                "seeds",
                seeds,
                "an int or a non-empty sequence of distinct ints",
                "Each seed retrains every subset once; the paper averages a few, e.g. (0, 1, 2).",
            )
        )
    return tuple(int(s) for s in seeds)


def _check_options(n_jobs: Any, retrain: Any) -> None:
    if n_jobs is not None and (
        isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral) or n_jobs == 0
    ):
        raise ValueError(
            bad_value(
                "n_jobs", n_jobs, "None or a non-zero int (joblib's convention: -1 uses all cores)"
            )
        )
    if retrain is not None and not callable(retrain):
        raise TypeError(
            f"The 'retrain' argument must be a callable retrain(keep_mask, seed) -> nn.Module; "
            f"got {type(retrain).__name__}."
        )


@contextmanager
def _single_threaded() -> Iterator[None]:
    # One intra-op thread per retraining: parallelism comes from joblib, and results are
    # bitwise the same whatever n_jobs (reductions do not depend on the thread count).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(
    model: nn.Module, queries: Examples, measurement: Callable
) -> tuple[np.ndarray, np.ndarray | None]:
    """The measurement of every query at ``model`` (eval mode), and its predicted classes.

    Predictions are the argmax of the outputs when they are (n, n_classes) logits with
    more than one class, otherwise None.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The retraining function returned a {type(model).__name__}; it must return the "
            "trained nn.Module."
        )
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    values, predictions = [], []
    with torch.no_grad():
        for start in range(0, len(queries), _QUERY_BATCH):
            batch = queries[start : start + _QUERY_BATCH].to(device)
            outputs = call_model(model, batch.inputs)
            values.append(measurement(outputs, batch.targets).detach().double().cpu().numpy())
            if outputs.ndim == 2 and outputs.shape[1] > 1:
                predictions.append(outputs.argmax(dim=1).cpu().numpy().astype(np.int64))
    measured = np.concatenate(values).reshape(len(queries))
    return measured, np.concatenate(predictions) if predictions else None


def _retrain_one(
    index: int,
    retrain: Retrain,
    keep: np.ndarray,
    seed: int,
    queries: Examples,
    measurement: Callable,
    cache: RetrainingCache | None,
    key: str,
) -> tuple[int, np.ndarray, np.ndarray | None]:
    with _single_threaded():
        model = retrain(keep.copy(), seed)
        values, predictions = measure(model, queries, measurement)
    if cache is not None:
        cache.save(key, keep, seed, values, predictions)
    return index, values, predictions


def _run_identity(trajectory: Trajectory, retrain: Retrain | None) -> str:
    if retrain is None:
        return f"recipe:{trajectory.fingerprint}"
    name = importable_name(retrain) or getattr(retrain, "__qualname__", type(retrain).__qualname__)
    return f"custom:{name}:{trajectory.fingerprint}"


def run_retrainings(
    trajectory: Trajectory,
    queries: Examples | AttributionTask,
    masks: Any,
    seeds: Any,
    *,
    retrain: Retrain | None = None,
    n_jobs: int | None = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Retrain every (mask, seed) pair once; the engine of all ground-truth functions.

    Returns the measurements, shape (n_seeds, n_queries, n_masks), and the predicted
    classes of the same shape (None unless the model outputs class logits). Identical
    (mask, seed) pairs are trained once; cached ones are read, not retrained.
    """
    if not isinstance(trajectory, Trajectory):
        raise TypeError(
            f"Counterfactual retraining needs a Trajectory; got {type(trajectory).__name__}."
        )
    queries = trajectory.check_queries(queries)
    masks = check_masks(masks, trajectory.n_train)
    seeds = check_seeds(seeds)
    _check_options(n_jobs, retrain)
    # Validate the recipe before any work: a run that cannot be replayed fails now.
    function: Retrain = RecipeReplay.from_trajectory(trajectory) if retrain is None else retrain
    cache = None if cache_dir is None else RetrainingCache(cache_dir)
    run = _run_identity(trajectory, retrain)
    queries_id = queries.fingerprint()

    results: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    slots: list[tuple[int, int, str]] = []  # (seed position, mask position, key)
    pending: dict[str, tuple[np.ndarray, int]] = {}
    for s, seed in enumerate(seeds):
        for j, keep in enumerate(masks):
            key = RetrainingCache.key(run, keep, seed, queries_id)
            slots.append((s, j, key))
            if key in results or key in pending:
                continue
            cached = None if cache is None else cache.load(key, keep, seed)
            if cached is None:
                pending[key] = (keep, seed)
            else:
                results[key] = cached

    keys = list(pending)
    tasks = (
        joblib.delayed(_retrain_one)(
            i, function, keep, seed, queries, trajectory.measurement, cache, key
        )
        for i, (key, (keep, seed)) in enumerate(pending.items())
    )
    with tqdm(
        total=len(keys),
        desc="retraining",
        unit="run",
        disable=not progress or not keys,
        leave=False,
    ) as bar:
        for i, values, predictions in joblib.Parallel(
            n_jobs=n_jobs, return_as="generator_unordered"
        )(tasks):
            results[keys[i]] = (values, predictions)
            bar.update(1)

    n_queries = len(queries)
    measurements = np.empty((len(seeds), n_queries, len(masks)), dtype=np.float64)
    predicted = np.empty((len(seeds), n_queries, len(masks)), dtype=np.int64)
    has_predictions = True
    for s, j, key in slots:
        values, predictions = results[key]
        measurements[s, :, j] = values
        if predictions is None:
            has_predictions = False
        else:
            predicted[s, :, j] = predictions
    return measurements, predicted if has_predictions else None


def retrain_measurements(
    trajectory: Trajectory,
    queries: Examples | AttributionTask,
    masks: Any,
    *,
    seeds: int | Sequence[int] = (0, 1, 2),
    n_jobs: int | None = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    retrain: Retrain | None = None,
) -> RetrainingResult:
    """Retrain the run's own recipe on each subset and measure the queries.

    For each row ``masks[j]`` and each seed, the recipe of ``trajectory`` (optimiser,
    schedule, epochs, batch size, stopping rule, all stages; see
    :func:`~sourcekit.evaluation.stages_from_recipe`) is trained on the kept examples
    with that seed in place of the recorded initialisation and shuffling seeds, and the
    trajectory's measurement is taken on the queries at the final model.

    Parameters
    ----------
    trajectory : Trajectory
        A run recorded by :func:`sourcekit.train`, or any run when ``retrain`` is given.
    queries : Examples or AttributionTask
    masks : array-like of bool, shape (n_subsets, n_train)
        The subsets, e.g. from :func:`~sourcekit.evaluation.make_subset_masks`.
    seeds : int or sequence of int, default=(0, 1, 2)
        Every subset is retrained once per seed; ``outputs`` averages them.
    n_jobs : int or None, default=1
        Retrainings in parallel (joblib; -1: all cores). Each runs single-threaded, so
        the results are identical for every ``n_jobs``.
    cache_dir : str or path, optional
        Keep each finished retraining in this directory (one file per subset and seed,
        keyed by the trajectory's fingerprint, the mask, the seed and the queries) and
        reuse it: an interrupted call resumes where it stopped.
    progress : bool, default=True
        Show a progress bar over the retrainings.
    retrain : callable, optional
        ``retrain(keep_mask, seed) -> nn.Module``: your own training function, for runs
        recorded from your own loop (which have no recipe). The cache then knows it by
        its qualified name: use a new ``cache_dir`` when you change what it does.

    Returns
    -------
    RetrainingResult
        ``outputs`` (n_queries, n_subsets), averaged over seeds; ``per_seed``
        (n_seeds, n_queries, n_subsets).

    Raises
    ------
    TrajectoryError
        If the run has no recipe and no ``retrain`` is given.

    Examples
    --------
    >>> import torch, sourcekit
    >>> from sourcekit.evaluation import make_subset_masks, retrain_measurements
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> masks = make_subset_masks(trajectory.n_train, n_subsets=5)
    >>> result = retrain_measurements(trajectory, data[:4], masks, seeds=(0, 1), progress=False)
    >>> result.outputs.shape, result.per_seed.shape
    ((4, 5), (2, 4, 5))
    """
    masks = check_masks(masks, getattr(trajectory, "n_train", None))
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
    return RetrainingResult(
        outputs=per_seed.mean(axis=0),
        per_seed=per_seed,
        masks=masks,
        seeds=check_seeds(seeds),
    )
