"""Leave-one-out ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sourcekit
from sourcekit.evaluation import leave_one_out_measurements, retrain_measurements

from .. import _cases


def test_effects_are_full_minus_without_each_example() -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    queries = _cases.queries("mlp_two_stage")
    examples = [0, 6, 11]
    loo = leave_one_out_measurements(trajectory, queries, examples, seeds=(0, 1), progress=False)
    masks = np.ones((4, 12), dtype=bool)
    masks[[1, 2, 3], examples] = False
    retrained = retrain_measurements(trajectory, queries, masks, seeds=(0, 1), progress=False)
    per_seed = retrained.per_seed[:, :, :1] - retrained.per_seed[:, :, 1:]
    np.testing.assert_allclose(loo.per_seed, per_seed, rtol=0, atol=1e-12)
    np.testing.assert_allclose(loo.effects, per_seed.mean(axis=0), rtol=0, atol=1e-12)
    assert loo.effects.shape == (4, 3) and loo.examples.tolist() == examples


def test_the_sign_convention_agrees_with_exact_unrolling() -> None:
    # Full-batch gradient descent on a linear model: leave-one-out retraining and the
    # first-order unrolled scores (effect of including an example) agree closely.
    trajectory = _cases.trajectory("linear_gd")
    queries = _cases.queries("linear_gd")
    loo = leave_one_out_measurements(trajectory, queries, seeds=0, progress=False)
    scores = sourcekit.UnrolledAttributor().fit(trajectory).transform(queries)
    assert loo.effects.shape == scores.shape == (4, 8)
    for q in range(4):
        assert np.corrcoef(loo.effects[q], scores[q])[0, 1] > 0.98


def test_leave_one_out_shares_the_retraining_cache(tmp_path: Path) -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd")
    first = leave_one_out_measurements(
        trajectory, queries, [2, 3], seeds=0, cache_dir=tmp_path, progress=False
    )
    assert len(list(tmp_path.glob("*.npz"))) == 3  # the full set and one per example
    second = leave_one_out_measurements(
        trajectory, queries, [3, 4], seeds=0, cache_dir=tmp_path, progress=False
    )
    assert len(list(tmp_path.glob("*.npz"))) == 4
    np.testing.assert_array_equal(second.effects[:, 0], first.effects[:, 1])


@pytest.mark.parametrize("examples", [[], [12], [-1], [[0, 1]], [0.5]])
def test_bad_examples_are_reported(examples: object) -> None:
    with pytest.raises(ValueError, match=r"'examples' must be a non-empty 1-d array .* \[0, 12\)"):
        leave_one_out_measurements(
            _cases.trajectory("mlp_sgd"), _cases.queries("mlp_sgd"), examples, progress=False
        )
