"""scikit-learn integration (DESIGN.md): searches, pipelines, caching and output containers.

The samples axis is the queries: ``trajectory.bind(queries)`` is the X that scikit-learn
splits, and y holds, per query, the measurements of models retrained on subsets.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import loguniform
from sklearn.model_selection import GridSearchCV, KFold, RandomizedSearchCV, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer

import sourcekit
from sourcekit import InfluenceAttributor, LDSScorer, SourceAttributor, TopKProponents

from . import _cases

CASE = "mlp_momentum"
DAMPINGS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


@pytest.fixture(scope="module")
def trajectory():
    return _cases.trajectory(CASE)


@pytest.fixture(scope="module")
def task(trajectory):
    return trajectory.bind(_cases.queries(CASE, 20))


@pytest.fixture(scope="module")
def masks():
    return np.random.default_rng(0).random((30, 12)) < 0.5


@pytest.fixture(scope="module")
def outputs(task, masks):
    # Any ground truth serves these tests; this one is the exact-unrolling prediction of
    # each subset's effect, perturbed so that the damping matters.
    exact = sourcekit.UnrolledAttributor(device="cpu").fit(task).transform(task)
    noise = np.random.default_rng(1).normal(scale=0.1 * np.abs(exact).max(), size=(20, 30))
    return exact @ masks.T.astype(float) + noise


lds = LDSScorer(np.random.default_rng(0).random((30, 12)) < 0.5)  # the masks of `outputs`


def count_fits(monkeypatch, cls):  # type: ignore[no-untyped-def]
    calls = []
    original = cls._fit_state

    def counting(self, trajectory):  # type: ignore[no-untyped-def]
        calls.append(type(self).__name__)
        return original(self, trajectory)

    monkeypatch.setattr(cls, "_fit_state", counting)
    return calls


@pytest.mark.parametrize("cls", [SourceAttributor, InfluenceAttributor])
def test_grid_search_over_damping_computes_the_state_once(monkeypatch, task, outputs, cls):
    calls = count_fits(monkeypatch, cls)
    search = GridSearchCV(
        cls(damping=1e-3, device="cpu"),
        {"damping": DAMPINGS},
        scoring=lds,
        cv=KFold(5, shuffle=True, random_state=0),
    )
    search.fit(task, outputs)
    # 5 dampings x 5 folds + the refit: 26 fits, one computation of the expensive state.
    assert len(calls) == 1
    assert search.best_params_["damping"] in DAMPINGS
    assert search.cv_results_["mean_test_score"].shape == (5,)
    # The refitted best estimator scores queries of the same trajectory.
    assert search.best_estimator_.transform(task[:3]).shape == (3, 12)


def test_randomized_search_and_cross_validate(monkeypatch, task, outputs):
    calls = count_fits(monkeypatch, SourceAttributor)
    search = RandomizedSearchCV(
        SourceAttributor(device="cpu"),
        {"damping": loguniform(1e-4, 1.0)},
        n_iter=4,
        scoring=lds,
        cv=3,
        random_state=0,
    )
    search.fit(task, outputs)
    assert 1e-4 <= search.best_params_["damping"] <= 1.0
    result = cross_validate(SourceAttributor(device="cpu"), task, outputs, scoring=lds, cv=4)
    assert result["test_score"].shape == (4,)
    assert np.all(np.isfinite(result["test_score"]))
    assert len(calls) == 1


def top1_label_agreement(estimator, X, y=None):  # type: ignore[no-untyped-def]
    """Fraction of queries whose strongest proponent has the query's label."""
    top = estimator.transform(X)[:, 0]
    labels = X.trajectory.train.targets.numpy()
    return float(np.mean(labels[top] == X.queries.targets.numpy()))


def test_pipeline_with_top_k_proponents_is_searchable(task, outputs):
    pipe = Pipeline([("attr", SourceAttributor(device="cpu")), ("top", TopKProponents(k=3))])
    selected = pipe.fit(task).transform(task)
    scores = pipe["attr"].transform(task)
    assert selected.shape == (20, 6)
    np.testing.assert_array_equal(selected[:, 0], scores.argmax(axis=1))
    np.testing.assert_array_equal(selected[:, 3], scores.argmin(axis=1))
    search = GridSearchCV(
        pipe, {"attr__damping": DAMPINGS[:3]}, scoring=top1_label_agreement, cv=4
    )
    search.fit(task, outputs)
    assert search.best_params_["attr__damping"] in DAMPINGS[:3]


def test_a_stock_transformer_after_an_attributor(task):
    pipe = Pipeline([("attr", SourceAttributor(device="cpu")), ("norm", Normalizer())])
    normalised = pipe.fit_transform(task)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, rtol=1e-6)


def test_set_output_pandas(task):
    pd = pytest.importorskip("pandas")
    attributor = SourceAttributor(device="cpu").set_output(transform="pandas")
    frame = attributor.fit(task).transform(task)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns[:3]) == ["train0", "train1", "train2"]
    assert frame.shape == (20, 12)
    top = TopKProponents(k=2, output="scores").set_output(transform="pandas")
    assert list(top.fit_transform(frame.to_numpy()).columns) == [
        "proponent0",
        "proponent1",
        "opponent0",
        "opponent1",
    ]


def test_disk_cache_is_shared_across_processes(tmp_path, trajectory, monkeypatch):
    queries = _cases.queries(CASE)
    first = SourceAttributor(memory=tmp_path, device="cpu").fit(trajectory).transform(queries)
    sourcekit.base.clear_state_cache()  # as if in a new process
    calls = count_fits(monkeypatch, SourceAttributor)
    again = SourceAttributor(memory=str(tmp_path), device="cpu").fit(trajectory).transform(queries)
    assert calls == []
    np.testing.assert_array_equal(first, again)
    other = SourceAttributor(memory=tmp_path, n_segments=2, device="cpu").fit(trajectory)
    assert calls == ["SourceAttributor"] and other.transform(queries).shape == (4, 12)


def test_top_k_proponents_checks_its_input():
    with pytest.raises(
        ValueError, match=r"'k' parameter of TopKProponents is 5, but the scores have only 4"
    ):
        TopKProponents(k=5).fit(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"'kind' parameter of TopKProponents must be one of"):
        TopKProponents(kind="best").fit(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"shape \(n_queries, n_train\)"):
        TopKProponents(k=1).fit(np.zeros(4))
    fitted = TopKProponents(k=1).fit(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"fitted with 4"):
        fitted.transform(np.zeros((2, 5)))


def test_top_k_normalisation_keeps_the_ranking():
    scores = np.array([[2.0, -4.0, 1.0], [0.0, 0.0, 0.0]])
    top = TopKProponents(k=1, normalize="max", output="scores").fit(scores)
    np.testing.assert_allclose(top.transform(scores), [[0.5, -1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(top.select(scores).indices, [[0, 1], [0, 2]])
