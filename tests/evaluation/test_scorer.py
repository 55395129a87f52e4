"""LDSScorer inside scikit-learn's model selection."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, KFold, cross_validate

import sourcekit
from sourcekit.evaluation import (
    LDSScorer,
    linear_datamodeling_score,
    make_subset_masks,
    retrain_measurements,
)

from .. import _cases


@pytest.fixture(scope="module")
def lds_problem() -> tuple[sourcekit.Trajectory, sourcekit.Examples, np.ndarray, np.ndarray]:
    trajectory = _cases.trajectory("mlp_momentum")
    queries = _cases.queries("mlp_momentum", 12)
    masks = make_subset_masks(trajectory.n_train, n_subsets=16)
    outputs = retrain_measurements(trajectory, queries, masks, seeds=0, progress=False).outputs
    return trajectory, queries, masks, outputs


def test_the_scorer_is_the_mean_lds(lds_problem) -> None:  # type: ignore[no-untyped-def]
    trajectory, queries, masks, outputs = lds_problem
    source = sourcekit.SourceAttributor().fit(trajectory)
    scorer = LDSScorer(masks)
    expected = linear_datamodeling_score(source.transform(queries), masks, outputs).mean
    assert scorer(source, trajectory.bind(queries), outputs) == pytest.approx(expected)
    assert isinstance(scorer(source, queries, outputs), float)
    assert repr(scorer) == "LDSScorer(n_subsets=16, n_train=12)"
    assert np.array_equal(pickle.loads(pickle.dumps(scorer)).masks, masks)


def test_folds_slice_queries_and_outputs_together(lds_problem) -> None:  # type: ignore[no-untyped-def]
    trajectory, queries, masks, outputs = lds_problem
    source = sourcekit.SourceAttributor()
    cv = KFold(3, shuffle=True, random_state=0)
    result = cross_validate(
        source,
        trajectory.bind(queries),
        outputs,
        cv=cv,
        scoring=LDSScorer(masks),
        return_indices=True,
    )
    scores = sourcekit.SourceAttributor().fit(trajectory).transform(queries)
    for fold, test in enumerate(result["indices"]["test"]):
        expected = linear_datamodeling_score(
            scores[test], masks, outputs[test], n_bootstrap=0
        ).mean
        assert result["test_score"][fold] == pytest.approx(expected, abs=1e-12)


def test_grid_search_over_damping_picks_one(lds_problem) -> None:  # type: ignore[no-untyped-def]
    trajectory, queries, masks, outputs = lds_problem
    grid = {"damping": [1e-4, 1e-2, 1.0, 100.0]}
    search = GridSearchCV(sourcekit.SourceAttributor(), grid, scoring=LDSScorer(masks), cv=3)
    search.fit(trajectory.bind(queries), outputs)
    assert search.best_params_["damping"] in grid["damping"]
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert -1.0 <= search.best_score_ <= 1.0


def test_the_scorer_needs_outputs_that_match(lds_problem) -> None:  # type: ignore[no-untyped-def]
    trajectory, queries, masks, outputs = lds_problem
    source = sourcekit.SourceAttributor().fit(trajectory)
    scorer = LDSScorer(masks)
    with pytest.raises(ValueError, match="LDSScorer needs y"):
        scorer(source, trajectory.bind(queries), None)
    with pytest.raises(
        ValueError, match=r"'outputs' must have shape \(n_queries, n_subsets\) = \(12, 16\)"
    ):
        scorer(source, trajectory.bind(queries), outputs[:5])
    with pytest.raises(ValueError, match=r"'scores' must have shape \(n_queries, 3\)"):
        LDSScorer(masks[:, :3])(source, trajectory.bind(queries), outputs)
