"""Runs: several recorded runs of one recipe on the same training set, and the task that
binds queries to them."""

from __future__ import annotations

import functools

import pytest
import torch

import sourcekit
from sourcekit import Runs
from sourcekit.exceptions import TrajectoryError
from sourcekit.trajectory import RunsTask

from .. import _cases

CASE = "mlp_momentum"
SEEDS = (0, 1, 2)


run = functools.partial(_cases.seeded_trajectory, CASE)
runs = functools.partial(_cases.runs, CASE)
queries = functools.partial(_cases.queries, CASE, 6)


def test_runs_must_share_their_training_set() -> None:
    data = run(1).train
    changed = sourcekit.Examples(data.inputs + 1e-3, data.targets)  # 12 examples, other values
    other = _cases.rebuild(run(1), train=changed)
    with pytest.raises(TrajectoryError, match="Run 1 was trained on other examples than run 0"):
        Runs([run(0), other])


def test_a_run_given_twice_is_refused() -> None:
    with pytest.raises(TrajectoryError, match="Runs 0 and 2 are the same recorded run"):
        Runs([run(0), run(1), run(0)])
    again = _cases.record(CASE, random_state=0)  # the same recipe and seed: the same run
    with pytest.raises(TrajectoryError, match="Runs 0 and 1 are the same recorded run"):
        Runs([run(0), again])


def test_runs_refuse_what_is_not_a_list_of_trajectories() -> None:
    with pytest.raises(TrajectoryError, match="at least one Trajectory"):
        Runs([])
    with pytest.raises(TypeError, match="run 1 is a str"):
        Runs([run(0), "run"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of Trajectory objects"):
        Runs(run(0))  # type: ignore[arg-type]


def test_runs_are_opaque_to_scikit_learn_and_bind_queries() -> None:
    ensemble = runs()
    assert not hasattr(ensemble, "__len__") and not hasattr(ensemble, "__getitem__")
    task = ensemble.bind(queries())
    assert isinstance(task, RunsTask) and len(task) == 6 and task.shape == (6,)
    assert task[1:3].runs is ensemble and len(task[1:3]) == 2
    with pytest.raises(ValueError, match="inputs"):
        ensemble.bind(sourcekit.Examples(torch.zeros(2, 7), torch.zeros(2, dtype=torch.long)))


def test_the_fingerprint_depends_on_every_run() -> None:
    assert runs().fingerprint == runs().fingerprint
    assert runs().fingerprint != runs((0, 1)).fingerprint
    assert runs().fingerprint != runs((2, 1, 0)).fingerprint
    assert runs((1,)).fingerprint == run(1).fingerprint
