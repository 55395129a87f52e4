"""Subset removal: retraining without each query's top proponents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sourcekit
from sourcekit.evaluation import _recipe, retrain_measurements, subset_removal

from .. import _cases


def test_removal_retrains_without_each_querys_top_k() -> None:
    trajectory = _cases.trajectory("mlp_momentum")
    queries = _cases.queries("mlp_momentum")
    scores = sourcekit.UnrolledAttributor().fit(trajectory).transform(queries)
    result = subset_removal(trajectory, queries, scores, k=3, seeds=(0, 1), progress=False)
    np.testing.assert_array_equal(result.removed, np.argsort(-scores, axis=1)[:, :3])
    masks = np.ones((5, 12), dtype=bool)
    for q in range(4):
        masks[q + 1, result.removed[q]] = False
    retrained = retrain_measurements(trajectory, queries, masks, seeds=(0, 1), progress=False)
    np.testing.assert_array_equal(result.full, retrained.outputs[:, 0])
    np.testing.assert_array_equal(result.without, retrained.outputs[np.arange(4), np.arange(1, 5)])
    np.testing.assert_allclose(result.drop, result.full - result.without, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        result.predicted_drop, np.sort(scores, axis=1)[:, ::-1][:, :3].sum(1)
    )
    assert result.mean_drop == pytest.approx(result.drop.mean())
    assert result.flipped is not None and set(np.unique(result.flipped)) <= {0.0, 0.5, 1.0}
    assert result.flip_rate == pytest.approx(result.flipped.mean())
    assert "k=3" in repr(result)


def test_removing_the_top_proponents_lowers_the_measurement() -> None:
    # With exact first-order scores of a full-batch run, the measured drop follows the
    # predicted one, and removing proponents lowers every query's measurement.
    trajectory = _cases.trajectory("linear_gd")
    queries = _cases.queries("linear_gd")
    scores = sourcekit.UnrolledAttributor().fit(trajectory).transform(queries)
    result = subset_removal(trajectory, queries, scores, k=2, seeds=0, progress=False)
    assert (result.drop > 0).all()
    assert np.corrcoef(result.drop, result.predicted_drop)[0, 1] > 0.5
    assert result.flipped is None and result.flip_rate is None  # a regression: no classes


def test_a_flip_is_a_changed_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd")
    scores = np.zeros((4, 12))
    scores[:, 0] = 1.0  # every query removes example 0 (one shared retraining)
    calls: list[Any] = []
    original = _recipe.train
    monkeypatch.setattr(_recipe, "train", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = subset_removal(trajectory, queries, scores, k=1, seeds=0, progress=False)
    assert len(calls) == 2  # the full set, and the set without example 0
    full = _recipe.RecipeReplay.from_trajectory(trajectory)(np.ones(12, bool), 0)
    keep = np.arange(12) != 0
    without = _recipe.RecipeReplay.from_trajectory(trajectory)(keep, 0)
    changed = full(queries.inputs).argmax(1) != without(queries.inputs).argmax(1)
    np.testing.assert_array_equal(result.flipped, changed.numpy().astype(float))


def test_removal_reuses_the_retraining_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd")
    retrain_measurements(
        trajectory,
        queries,
        np.ones((1, 12), bool),
        seeds=(0, 1),
        cache_dir=tmp_path,
        progress=False,
    )
    calls: list[Any] = []
    original = _recipe.train
    monkeypatch.setattr(_recipe, "train", lambda *a, **k: calls.append(1) or original(*a, **k))
    scores = np.random.default_rng(0).normal(size=(4, 12))
    first = subset_removal(
        trajectory, queries, scores, k=2, seeds=(0, 1), cache_dir=tmp_path, progress=False
    )
    assert len(calls) == 4 * 2  # the full-set baselines came from the cache
    again = subset_removal(
        trajectory, queries, scores, k=2, seeds=(0, 1), cache_dir=tmp_path, progress=False
    )
    assert len(calls) == 8
    np.testing.assert_array_equal(again.drop, first.drop)


@pytest.mark.parametrize(
    ("scores", "k", "match"),
    [
        (np.zeros((4, 11)), 2, r"'scores' must have shape \(n_queries, n_train\) = \(4, 12\)"),
        (np.zeros((12, 4)), 2, r"got \(12, 4\)"),
        (np.full((4, 12), np.nan), 2, "NaN"),
        (np.zeros((4, 12)), 0, r"'k' parameter of subset_removal must be an int in \[1, 11\]"),
        (np.zeros((4, 12)), 12, r"must be an int in \[1, 11\]"),
    ],
)
def test_bad_arguments_are_reported(scores: np.ndarray, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        subset_removal(
            _cases.trajectory("mlp_sgd"), _cases.queries("mlp_sgd"), scores, k=k, progress=False
        )
