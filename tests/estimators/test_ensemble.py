"""EnsembleAttributor and Runs: the mean of an attributor's scores over several runs of one
recipe, the checks on the runs, the state fitted once per run, nested parameters and
parallel runs."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline

import sourcekit
from sourcekit import (
    EnsembleAttributor,
    InfluenceAttributor,
    LDSScorer,
    SourceAttributor,
    TopKProponents,
    TracInAttributor,
)
from sourcekit.base import clear_state_cache, state_cache_info
from sourcekit.exceptions import NotFittedError, TrajectoryError

from .. import _cases

CASE = "mlp_momentum"
SEEDS = (0, 1, 2)


run = functools.partial(_cases.seeded_trajectory, CASE)
runs = functools.partial(_cases.runs, CASE)
queries = functools.partial(_cases.queries, CASE, 6)


def source() -> SourceAttributor:
    return SourceAttributor(n_segments=2, device="cpu", progress=False)


# Each ensemble score is a mean of R float32 scores, formed in float64 and rounded once:
# it differs from the same mean formed otherwise by at most one rounding of the largest
# score (2 eps32 of it bounds both roundings).
def assert_mean_of(got: np.ndarray, parts: list[np.ndarray]) -> None:
    want = np.mean(np.stack([p.astype(np.float64) for p in parts]), axis=0)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * np.finfo(np.float32).eps * scale)


# --- the mean over runs ----------------------------------------------------------------------
@pytest.mark.parametrize("make", [source, lambda: TracInAttributor(progress=False)])
def test_the_scores_are_the_mean_of_each_runs_scores(make) -> None:  # type: ignore[no-untyped-def]
    ensemble = EnsembleAttributor(make()).fit(runs())
    got = ensemble.transform(queries())
    parts = [make().fit(run(s)).transform(queries()) for s in SEEDS]
    assert got.shape == (6, 12) and got.dtype == np.float32
    assert_mean_of(got, parts)
    # the runs differ, so the ensemble is not any one of them
    assert all(np.abs(got - p).max() > 1e-3 * np.abs(p).max() for p in parts)


def test_one_run_is_the_attributor_itself() -> None:
    trajectory = run(0)
    ensemble = EnsembleAttributor(source()).fit(trajectory)
    np.testing.assert_array_equal(
        ensemble.transform(queries()), source().fit(trajectory).transform(queries())
    )
    assert ensemble.runs_.trajectories == (trajectory,)
    assert ensemble.fingerprint_ == trajectory.fingerprint


def test_fit_accepts_runs_a_list_and_bound_tasks() -> None:
    want = EnsembleAttributor(source()).fit(runs()).transform(queries())
    for X in ([run(s) for s in SEEDS], runs().bind(queries()), tuple(run(s) for s in SEEDS)):
        got = EnsembleAttributor(source()).fit(X).transform(queries())
        np.testing.assert_array_equal(got, want)
    task = runs().bind(queries())
    np.testing.assert_array_equal(EnsembleAttributor(source()).fit_transform(task), want)


def test_the_default_estimator_is_source() -> None:
    ensemble = EnsembleAttributor().fit(run(0))
    assert type(ensemble.estimators_[0]) is SourceAttributor
    assert EnsembleAttributor().estimator is None  # the template is never created in __init__


def test_the_estimator_given_is_never_fitted() -> None:
    template = source()
    ensemble = EnsembleAttributor(template).fit(runs())
    assert not hasattr(template, "state_")
    assert all(e is not template for e in ensemble.estimators_)
    assert [e.fingerprint_ for e in ensemble.estimators_] == [run(s).fingerprint for s in SEEDS]


def test_fit_checks_the_runs() -> None:
    data = run(1).train
    other = _cases.rebuild(run(1), train=sourcekit.Examples(data.inputs + 1e-3, data.targets))
    with pytest.raises(TrajectoryError, match="Run 1 was trained on other examples"):
        EnsembleAttributor(source()).fit([run(0), other])
    with pytest.raises(TrajectoryError, match="Runs 0 and 1 are the same recorded run"):
        EnsembleAttributor(source()).fit([run(0), run(0)])
    with pytest.raises(TypeError, match=r"EnsembleAttributor\.fit needs Runs"):
        EnsembleAttributor(source()).fit(np.zeros(3))


# --- transform -------------------------------------------------------------------------------
def test_transform_refuses_queries_bound_to_other_runs() -> None:
    ensemble = EnsembleAttributor(source()).fit(runs())
    with pytest.raises(ValueError, match="bound to other runs"):
        ensemble.transform(runs((0, 1)).bind(queries()))
    with pytest.raises(ValueError, match="bound to other runs"):
        ensemble.transform(run(0).bind(queries()))
    with pytest.raises(TypeError, match="needs queries, not a Runs"):
        ensemble.transform(runs())
    np.testing.assert_array_equal(
        ensemble.transform(runs().bind(queries())[2:4]), ensemble.transform(queries()[2:4])
    )


def test_not_fitted() -> None:
    with pytest.raises(NotFittedError, match="EnsembleAttributor instance is not fitted yet"):
        EnsembleAttributor(source()).transform(queries())


def test_the_damping_is_read_at_transform_without_refitting(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clear_state_cache()
    ensemble = EnsembleAttributor(InfluenceAttributor(damping=1e-3, device="cpu", progress=False))
    ensemble.fit(runs())
    fitted = state_cache_info()["misses"]
    assert fitted == len(SEEDS)  # one state per run
    ensemble.set_params(estimator__damping=1e-1)
    got = ensemble.transform(queries())
    want = EnsembleAttributor(InfluenceAttributor(damping=1e-1, device="cpu", progress=False)).fit(
        runs()
    )
    np.testing.assert_array_equal(got, want.transform(queries()))
    assert state_cache_info()["misses"] == fitted  # the second ensemble read the cache
    # The fitted clones keep their own parameters: transform works on copies.
    assert all(e.damping == 1e-3 for e in ensemble.estimators_)


def test_a_change_of_a_state_parameter_after_fit_is_refused() -> None:
    ensemble = EnsembleAttributor(source()).fit(runs())
    ensemble.set_params(estimator__n_segments=3)
    with pytest.raises(ValueError, match=r"'estimator__n_segments' parameter changed since fit"):
        ensemble.transform(queries())
    ensemble.set_params(estimator=TracInAttributor(progress=False))
    with pytest.raises(
        ValueError, match=r"now a TracInAttributor.*fitted with a SourceAttributor"
    ):
        ensemble.transform(queries())


def test_parameters_are_validated() -> None:
    for bad in (0, 1.5, "all"):
        with pytest.raises(ValueError, match="'n_jobs' parameter of EnsembleAttributor"):
            EnsembleAttributor(source(), n_jobs=bad).fit(runs())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'estimator' parameter of EnsembleAttributor must be"):
        EnsembleAttributor("source").fit(runs())  # type: ignore[arg-type]


# --- scikit-learn ------------------------------------------------------------------------------
def test_a_search_over_the_nested_damping_fits_every_run_once() -> None:
    masks = np.random.default_rng(0).random((30, 12)) < 0.5
    task = runs().bind(_cases.queries(CASE, 20))
    exact = EnsembleAttributor(sourcekit.UnrolledAttributor(device="cpu")).fit(task)
    y = exact.transform(task) @ masks.T.astype(float)
    y += np.random.default_rng(1).normal(scale=0.1 * np.abs(y).max(), size=y.shape)
    clear_state_cache()
    search = GridSearchCV(
        EnsembleAttributor(InfluenceAttributor(device="cpu", progress=False)),
        {"estimator__damping": [1e-3, 1e-2, 1e-1]},
        scoring=LDSScorer(masks),
        cv=KFold(3),
    )
    search.fit(task, y)
    assert state_cache_info()["misses"] == len(SEEDS)
    assert search.best_params_["estimator__damping"] in (1e-3, 1e-2, 1e-1)
    assert search.best_estimator_.transform(task).shape == (20, 12)


def test_in_a_pipeline_clones_and_pickles() -> None:
    pipeline = Pipeline([("ensemble", EnsembleAttributor(source())), ("top", TopKProponents(k=2))])
    task = runs().bind(queries())
    top = pipeline.fit_transform(task)
    scores = EnsembleAttributor(source()).fit(task).transform(task)
    np.testing.assert_array_equal(top, TopKProponents(k=2).fit_transform(scores))
    fitted = pipeline.named_steps["ensemble"]
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.transform(queries()), scores)
    copy = clone(fitted)
    assert not hasattr(copy, "estimators_") and copy.estimator is not fitted.estimator


def test_parallel_runs_give_the_same_scores() -> None:
    want = EnsembleAttributor(source()).fit(runs()).transform(queries())
    clear_state_cache()
    got = EnsembleAttributor(source(), n_jobs=2).fit(runs()).transform(queries())
    np.testing.assert_array_equal(got, want)
