"""Several recorded runs of one recipe on the same training set: what an ensemble fits.

A run is one sample of the training randomness (initialisation, batch order, sampled
dropout...); scores averaged over runs of the same recipe with different seeds estimate
the expected counterfactual better than one run's scores do.
:class:`~sourcekit.EnsembleAttributor` fits :class:`Runs`; :meth:`Runs.bind` gives the
bound task that scikit-learn's search tools slice by queries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ..exceptions import TrajectoryError
from ._examples import Examples
from ._trajectory import AttributionTask, Trajectory

__all__ = ["Runs", "RunsTask"]


class Runs:
    """Several recorded runs of one recipe on the same training set.

    The runs must share their training examples (the columns of every score matrix,
    compared by content) and be distinct runs (a run given twice would weigh double).
    Like a :class:`Trajectory`, it is opaque to scikit-learn (no ``len()`` or
    indexing): bind queries to it with :meth:`bind`.

    Parameters
    ----------
    trajectories : sequence of Trajectory
        At least one run, typically the same recipe recorded with different seeds.

    Attributes
    ----------
    trajectories : tuple of Trajectory
    n_runs : int
    n_train : int
        Number of training examples (columns of every score matrix).
    train : Examples
        The shared training examples (those of the first run).
    fingerprint : str
        The run's own fingerprint for one run; for several, a sha256 of theirs in order.

    Raises
    ------
    TrajectoryError
        If the runs do not share their training examples, or a run appears twice.

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
    >>> runs
    Runs(n_runs=3, n_train=20)
    >>> X = runs.bind(data[:6])
    >>> len(X), X[2:4].runs is runs
    (6, True)
    """

    def __init__(self, trajectories: Sequence[Trajectory]) -> None:
        if isinstance(trajectories, Trajectory) or not isinstance(trajectories, Sequence):
            raise TypeError(
                "Runs needs a list of Trajectory objects (several runs of one recipe); got "
                f"{type(trajectories).__name__}."
            )
        runs = tuple(trajectories)
        if not runs:
            raise TrajectoryError(
                "Runs needs at least one Trajectory; got an empty list. Record the recipe "
                "once per seed and pass the runs."
            )
        for i, run in enumerate(runs):
            if not isinstance(run, Trajectory):
                raise TypeError(
                    f"Runs needs Trajectory objects; run {i} is a {type(run).__name__}."
                )
        shared = runs[0].train.fingerprint()
        for i, run in enumerate(runs[1:], start=1):
            if run.train.fingerprint() != shared:
                raise TrajectoryError(
                    f"Run {i} was trained on other examples than run 0 ({run.n_train} examples "
                    f"against {runs[0].n_train}, or the same number with other contents): the "
                    "runs of an ensemble must share their training set, whose examples are the "
                    "columns of the scores. Record every run on the same training data."
                )
        seen: dict[str, int] = {}
        for i, run in enumerate(runs):
            if run.fingerprint in seen:
                raise TrajectoryError(
                    f"Runs {seen[run.fingerprint]} and {i} are the same recorded run (equal "
                    "fingerprints): an ensemble averages over distinct runs. Record each run "
                    "with its own seed (random_state), or pass it once."
                )
            seen[run.fingerprint] = i
        self.trajectories = runs

    @property
    def n_runs(self) -> int:
        return len(self.trajectories)

    @property
    def n_train(self) -> int:
        return self.trajectories[0].n_train

    @property
    def train(self) -> Examples:
        return self.trajectories[0].train

    @property
    def fingerprint(self) -> str:
        if self.n_runs == 1:
            return self.trajectories[0].fingerprint
        digest = hashlib.sha256(b"runs")
        for run in self.trajectories:
            digest.update(run.fingerprint.encode())
        return digest.hexdigest()

    def check_queries(self, queries: Any) -> Examples:
        """Return ``queries`` as Examples shaped like the training examples, or raise."""
        if isinstance(queries, RunsTask):
            queries = queries.queries
        return self.trajectories[0].check_queries(queries)

    def bind(self, queries: Examples) -> RunsTask:
        """Bind queries to these runs: the sample axis scikit-learn tools split."""
        return RunsTask(self, queries)

    def __repr__(self) -> str:
        return f"Runs(n_runs={self.n_runs}, n_train={self.n_train})"


class RunsTask:
    """Runs bound to queries: the ``X`` of an ensemble in scikit-learn's search tools.

    ``len()`` and ``shape`` count queries; indexing selects queries and keeps the same
    :class:`Runs` object. Create it with :meth:`Runs.bind`.

    Attributes
    ----------
    runs : Runs
    queries : Examples
    shape : tuple of int
        ``(n_queries,)``.

    Examples
    --------
    >>> import torch
    >>> import sourcekit
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> runs = sourcekit.Runs(
    ...     [sourcekit.train(torch.nn.Linear(3, 2), data, [stage], random_state=seed, progress=False)
    ...      for seed in range(2)]
    ... )
    >>> X = runs.bind(data[:6])
    >>> X.shape, X[1:3].shape, X[1:3].runs is runs
    ((6,), (2,), True)
    """

    def __init__(self, runs: Runs, queries: Examples | AttributionTask) -> None:
        if not isinstance(runs, Runs):
            raise TypeError(f"RunsTask needs a Runs object; got {type(runs).__name__}.")
        self.runs = runs
        self.queries = runs.check_queries(queries)

    @property
    def shape(self) -> tuple[int]:
        return self.queries.shape

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key: Any) -> RunsTask:
        return RunsTask(self.runs, self.queries[key])

    def __repr__(self) -> str:
        return f"RunsTask(n_queries={len(self)}, runs={self.runs!r})"
