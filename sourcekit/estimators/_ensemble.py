"""``EnsembleAttributor``: an attributor's scores averaged over several runs of one recipe."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone

from .._distributed import is_distributed
from .._validation import InstanceOf, Interval, validate_parameters
from ..base import BaseAttributor
from ..exceptions import NotFittedError
from ..trajectory import AttributionTask, Examples, Trajectory
from ..trajectory._runs import Runs, RunsTask
from ._source import SourceAttributor

__all__ = ["EnsembleAttributor"]


def _fit_one(estimator: BaseAttributor, run: Trajectory) -> BaseAttributor:
    return estimator.fit(run)


def _transform_one(
    estimator: BaseAttributor, params: dict[str, Any], queries: Examples
) -> np.ndarray:
    # A shallow copy shares the fitted state; it takes the parameters that only
    # ``transform`` reads (``damping``...) as the template has them now.
    return copy.copy(estimator).set_params(**params).transform(queries)


class EnsembleAttributor(BaseAttributor):
    """An attributor's scores averaged over several runs of the same recipe.

    A recorded run is one sample of the training randomness (initialisation, batch
    order); the effect of including an example is better estimated by its expectation
    over that randomness. The ensemble fits a clone of ``estimator`` to each run of a
    :class:`~sourcekit.Runs` (the same training set, different seeds) and returns the
    mean of their score matrices:

        scores[q, m] = (1/R) Σ_r τ_r[q, m].

    Each run's state is fitted and cached by the clone under that run's fingerprint,
    so a search over ``estimator__damping`` fits every run once. The parameters of
    ``estimator`` are set through the nested names (``estimator__damping``), also on a
    fitted ensemble: ``transform`` passes the template's current parameters to the
    fitted clones, and refuses a change of a parameter that shapes the fitted state
    (fit again).

    Parameters
    ----------
    estimator : BaseAttributor, default=None
        The attributor to fit to every run (never fitted itself); None:
        ``SourceAttributor()``.
    n_jobs : int, default=None
        Runs fitted and scored at the same time, with joblib (None: one at a time; -1:
        as many as there are cores). Threads by default, which share the in-process
        state cache; under ``joblib.parallel_config(backend="loky")`` the runs go to
        worker processes, which share fitted states only through the estimator's
        ``memory=`` directory. Under ``torch.distributed`` the runs always go one after
        another (every rank must run the same collectives in the same order).

    Attributes
    ----------
    estimators_ : list of BaseAttributor
        The fitted clones, one per run, in the order of the runs.
    runs_ : Runs
        The runs fitted (one Trajectory given to ``fit`` is a ``Runs`` of one).
    n_train_ : int
    fingerprint_ : str
        The fingerprint of ``runs_`` (the run's own for one run).

    Examples
    --------
    >>> import torch
    >>> import sourcekit
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> runs = sourcekit.Runs(
    ...     [sourcekit.train(torch.nn.Linear(3, 2), data, [stage], random_state=seed, progress=False)
    ...      for seed in range(3)]
    ... )
    >>> ensemble = sourcekit.EnsembleAttributor(sourcekit.TracInAttributor(progress=False))
    >>> scores = ensemble.fit(runs).transform(data[:4])
    >>> scores.shape, len(ensemble.estimators_)
    ((4, 20), 3)
    >>> each = [e.transform(data[:4]) for e in ensemble.estimators_]
    >>> bool(abs(scores - sum(each) / 3).max() < 1e-6)
    True
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "estimator": [None, InstanceOf((BaseAttributor,), "an attributor")],
        "n_jobs": [None, Interval(int, 1, None), Interval(int, None, -1)],
    }

    def __init__(self, estimator: BaseAttributor | None = None, *, n_jobs: int | None = None):
        self.estimator = estimator
        self.n_jobs = n_jobs

    def _template(self) -> BaseAttributor:
        return SourceAttributor() if self.estimator is None else self.estimator

    def _parallel(self) -> Parallel:
        return Parallel(n_jobs=1 if is_distributed() else self.n_jobs, prefer="threads")

    def fit(self, X: Any, y: Any = None) -> EnsembleAttributor:
        """Fit a clone of ``estimator`` to every run.

        Parameters
        ----------
        X : Runs, RunsTask, list of Trajectory, Trajectory or AttributionTask
            The runs (a bound task's queries are ignored by ``fit``); one Trajectory is
            an ensemble of one run.
        y : ignored

        Returns
        -------
        self
        """
        validate_parameters(self, self._parameter_constraints)
        runs = _as_runs(X)
        template = self._template()
        self.estimators_ = list(
            self._parallel()(delayed(_fit_one)(clone(template), run) for run in runs.trajectories)
        )
        self.runs_ = runs
        self.n_train_ = runs.n_train
        self.fingerprint_ = runs.fingerprint
        return self

    def transform(self, X: Any) -> np.ndarray:
        """The mean over the runs of the fitted clones' scores.

        Parameters
        ----------
        X : Examples, RunsTask or AttributionTask
            The queries (a bound task must be bound to the fitted runs).

        Returns
        -------
        scores : ndarray of shape (n_queries, n_train)
        """
        self._check_fitted()
        validate_parameters(self, self._parameter_constraints)
        bound = X.runs if isinstance(X, RunsTask) else getattr(X, "trajectory", None)
        if bound is not None and bound.fingerprint != self.fingerprint_:
            raise ValueError(
                "The queries are bound to other runs than the ones this EnsembleAttributor was "
                "fitted on. Bind them to the fitted runs (ensemble.runs_.bind) or fit again."
            )
        if isinstance(X, (Trajectory, Runs)):
            raise TypeError(
                f"EnsembleAttributor.transform needs queries, not a {type(X).__name__}. Pass "
                "Examples(inputs, targets) or runs.bind(queries)."
            )
        queries = self.runs_.check_queries(X)
        params = self._transform_parameters()
        per_run = self._parallel()(
            delayed(_transform_one)(estimator, params, queries) for estimator in self.estimators_
        )
        total = np.zeros(per_run[0].shape, dtype=np.float64)
        for scores in per_run:
            total += scores
        return (total / len(per_run)).astype(per_run[0].dtype, copy=False)

    def _check_fitted(self) -> None:
        if not hasattr(self, "estimators_"):
            raise NotFittedError(
                "This EnsembleAttributor instance is not fitted yet. Call fit(trajectory) "
                "(or fit(runs)) before transform."
            )

    def _transform_parameters(self) -> dict[str, Any]:
        """The template's parameters, after checking those that shape the fitted state."""
        template = self._template()
        fitted = self.estimators_[0]
        if type(template) is not type(fitted):
            raise ValueError(
                f"The 'estimator' parameter is now a {type(template).__name__}, but the ensemble "
                f"was fitted with a {type(fitted).__name__}. Call fit again."
            )
        params = template.get_params(deep=False)
        for name in fitted._state_parameters:
            if repr(params[name]) != repr(getattr(fitted, name)):
                raise ValueError(
                    f"The 'estimator__{name}' parameter changed since fit "
                    f"({getattr(fitted, name)!r} -> {params[name]!r}); it shapes the fitted "
                    "state. Call fit again."
                )
        return params


def _as_runs(X: Any) -> Runs:
    if isinstance(X, Runs):
        return X
    if isinstance(X, RunsTask):
        return X.runs
    if isinstance(X, Trajectory):
        return Runs([X])
    if isinstance(X, AttributionTask):
        return Runs([X.trajectory])
    if isinstance(X, (list, tuple)):
        return Runs(X)
    raise TypeError(
        f"EnsembleAttributor.fit needs Runs, a list of Trajectory objects or a Trajectory; got "
        f"{type(X).__name__}. Record the recipe once per seed and pass "
        "sourcekit.Runs([...]) (or runs.bind(queries) in a search)."
    )
