"""The linear datamodeling score: exactness, undefined queries, the interval, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import spearmanr

from sourcekit.evaluation import linear_datamodeling_score, make_subset_masks


def _problem(n_queries: int = 5, n_train: int = 30, n_subsets: int = 40, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_queries, n_train))
    masks = make_subset_masks(n_train, n_subsets=n_subsets, random_state=seed)
    return rng, scores, masks


def test_a_perfect_linear_predictor_scores_one() -> None:
    rng, scores, masks = _problem()
    # Any increasing affine map of the predicted group effects, per query.
    outputs = 3.0 * (scores @ masks.T) + rng.normal(size=(5, 1))
    result = linear_datamodeling_score(scores, masks, outputs)
    np.testing.assert_allclose(result.per_query, 1.0, rtol=0, atol=1e-12)
    assert result.mean == pytest.approx(1.0) and result.n_undefined == 0
    assert result.confidence_interval == pytest.approx((1.0, 1.0))
    reversed_ = linear_datamodeling_score(scores, masks, -outputs)
    assert reversed_.mean == pytest.approx(-1.0)


def test_only_ranks_matter() -> None:
    _, scores, masks = _problem()
    outputs = np.exp(scores @ masks.T / 3)  # monotone, not linear
    assert linear_datamodeling_score(scores, masks, outputs).mean == pytest.approx(1.0)


def test_per_query_values_are_spearman_correlations() -> None:
    rng, scores, masks = _problem()
    outputs = scores @ masks.T + 2.0 * rng.normal(size=(5, 40))
    result = linear_datamodeling_score(scores, masks, outputs, n_bootstrap=0)
    predicted = scores @ masks.T
    expected = [spearmanr(predicted[q], outputs[q]).statistic for q in range(5)]
    np.testing.assert_allclose(result.per_query, expected, rtol=0, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected))
    assert result.confidence_interval is None


def test_ties_get_average_ranks() -> None:
    masks = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    scores = np.array([[1.0, 1.0]])  # subsets 0 and 1 tie
    outputs = np.array([[1.0, 2.0, 3.0]])
    expected = spearmanr(scores @ masks.T, outputs, axis=1).statistic
    assert linear_datamodeling_score(scores, masks, outputs).per_query[0] == pytest.approx(
        expected
    )


def test_constant_predictions_or_outputs_are_left_out_and_counted() -> None:
    rng, scores, masks = _problem()
    scores[1] = 0.0  # every subset predicted the same: no ranking
    outputs = scores @ masks.T + 0.5 * rng.normal(size=(5, 40))
    outputs[3] = 7.0  # retrained outputs all equal
    result = linear_datamodeling_score(scores, masks, outputs)
    assert np.isnan(result.per_query[[1, 3]]).all()
    assert result.n_undefined == 2
    assert result.mean == pytest.approx(np.mean(result.per_query[[0, 2, 4]]))
    low, high = result.confidence_interval  # type: ignore[misc]
    assert low <= result.mean <= high
    assert "n_undefined=2" in repr(result)


def test_no_defined_query_gives_nan() -> None:
    _, scores, masks = _problem(n_queries=2)
    result = linear_datamodeling_score(scores, masks, np.ones((2, 40)))
    assert math.isnan(result.mean) and result.n_undefined == 2
    assert all(math.isnan(v) for v in result.confidence_interval)  # type: ignore[union-attr]


def test_the_bootstrap_interval_is_seeded_and_widens_with_confidence() -> None:
    rng, scores, masks = _problem(n_queries=30)
    outputs = scores @ masks.T + 3.0 * rng.normal(size=(30, 40))
    a = linear_datamodeling_score(scores, masks, outputs, random_state=1)
    assert (
        a.confidence_interval
        == linear_datamodeling_score(scores, masks, outputs, random_state=1).confidence_interval
    )
    low, high = a.confidence_interval  # type: ignore[misc]
    assert low < a.mean < high
    wide = linear_datamodeling_score(scores, masks, outputs, confidence=0.99, random_state=1)
    assert wide.confidence_interval[0] <= low and wide.confidence_interval[1] >= high  # type: ignore[index]
    assert float(a) == a.mean


@given(seed=st.integers(0, 2**16))
def test_invariant_to_the_order_of_queries_and_subsets(seed: int) -> None:
    rng, scores, masks = _problem(n_queries=4, n_train=10, n_subsets=12, seed=seed)
    outputs = scores @ masks.T + rng.normal(size=(4, 12))
    base = linear_datamodeling_score(scores, masks, outputs, n_bootstrap=0)
    q, j = rng.permutation(4), rng.permutation(12)
    moved = linear_datamodeling_score(scores[q], masks[j], outputs[q][:, j], n_bootstrap=0)
    np.testing.assert_allclose(moved.per_query, base.per_query[q], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"masks": np.ones(30, bool)},
            r"'masks' must be a 2-d array of shape \(n_subsets, n_train\)",
        ),
        ({"masks": np.ones((1, 30), bool)}, "needs at least 2 subsets"),
        ({"scores": np.zeros((5, 29))}, r"'scores' must have shape \(n_queries, 30\)"),
        ({"scores": np.zeros((30, 5))}, "must be transposed"),
        (
            {"outputs": np.zeros((40, 5))},
            r"'outputs' must have shape \(n_queries, n_subsets\) = \(5, 40\).*got \(40, 5\)",
        ),
        ({"outputs": np.zeros((4, 40))}, r"one row per query of the scores.*got \(4, 40\)"),
        ({"outputs": np.full((5, 40), np.nan)}, "'outputs' hold NaN"),
        ({"scores": np.full((5, 30), np.inf)}, "'scores' hold NaN"),
        ({"confidence": 1.0}, r"'confidence' parameter of the LDS must be a float in \(0, 1\)"),
        ({"n_bootstrap": -1}, "'n_bootstrap' parameter of the LDS must be an int >= 0"),
    ],
)
def test_bad_inputs_are_reported(change: dict, match: str) -> None:
    _, scores, masks = _problem()
    arguments = {"scores": scores, "masks": masks, "outputs": scores @ masks.T, **change}
    with pytest.raises(ValueError, match=match):
        linear_datamodeling_score(**arguments)
