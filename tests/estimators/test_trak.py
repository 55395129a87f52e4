"""TRAKAttributor as an estimator: seeding, damping at transform, caching and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from sourcekit import TRAKAttributor
from sourcekit.base import clear_state_cache, state_cache_info

from .. import _cases

CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def run():
    return _cases.trajectory("mlp_momentum")


@pytest.fixture(scope="module")
def queries():
    return _cases.queries("mlp_momentum")


def test_scores_are_determined_by_the_random_state(run, queries):
    first = TRAKAttributor(projection_dim=16, random_state=3, **CPU).fit(run).transform(queries)
    clear_state_cache()
    again = TRAKAttributor(projection_dim=16, random_state=3, **CPU).fit(run).transform(queries)
    np.testing.assert_array_equal(first, again)
    other = TRAKAttributor(projection_dim=16, random_state=4, **CPU).fit(run).transform(queries)
    assert not np.array_equal(first, other)
    fresh = []
    for _ in range(2):
        clear_state_cache()
        attributor = TRAKAttributor(projection_dim=16, random_state=None, **CPU).fit(run)
        fresh.append(attributor.transform(queries))
    assert not np.array_equal(fresh[0], fresh[1])


def test_damping_is_read_at_transform_without_refitting(run, queries):
    attributor = TRAKAttributor(projection_dim=16, damping=1e-3, **CPU).fit(run)
    misses = state_cache_info()["misses"]
    changed = attributor.set_params(damping=0.1).transform(queries)
    assert state_cache_info()["misses"] == misses  # nothing was recomputed
    np.testing.assert_array_equal(
        changed, TRAKAttributor(projection_dim=16, damping=0.1, **CPU).fit(run).transform(queries)
    )
    assert not np.allclose(changed, attributor.set_params(damping=1e-3).transform(queries))
    TRAKAttributor(projection_dim=32, **CPU).fit(run)  # the projection shapes the state
    assert state_cache_info()["misses"] == misses + 1


def test_default_damping_is_a_tenth_of_the_mean_eigenvalue(run):
    attributor = TRAKAttributor(projection_dim=16, checkpoints="all", **CPU).fit(run)
    checkpoints = attributor.state_.checkpoints
    assert [c.step for c in checkpoints] == [1, 4, 7, 9]
    assert attributor.damping_ == {
        c.step: pytest.approx(0.1 * float(c.eigenvalues.mean())) for c in checkpoints
    }
    assert attributor.set_params(damping=0.5).damping_ == 0.5
    # the state: Φ (N × k) and the k × k eigenbasis of ΦᵀΦ/N per checkpoint
    assert checkpoints[0].features.shape == (12, 16)
    assert checkpoints[0].eigenvectors.shape == (16, 16)


# memory_limit=1 streams the training data once per query, as the warning says
@pytest.mark.filterwarnings("ignore::sourcekit.exceptions.PerformanceWarning")
def test_query_blocks_and_projection_pieces_do_not_change_the_scores(run, queries):
    reference = TRAKAttributor(projection_dim=16, dtype="float64", **CPU).fit(run)
    # memory_limit=1: one query per block, and every piece of R generated again at each use
    tight = TRAKAttributor(projection_dim=16, dtype="float64", memory_limit=1, **CPU).fit(run)
    expected = reference.transform(queries)
    # the same float64 products in other groupings: a few eps of 38-term sums of the scale
    atol = 64 * 38 * float(np.finfo(np.float64).eps) * np.abs(expected).max()
    np.testing.assert_allclose(tight.transform(queries), expected, rtol=0, atol=atol)


def test_the_state_can_be_cached_on_disk(tmp_path, run, queries, monkeypatch):
    first = TRAKAttributor(projection_dim=16, memory=tmp_path, **CPU).fit(run).transform(queries)
    clear_state_cache()

    def refuse(self, trajectory):  # type: ignore[no-untyped-def]
        raise AssertionError("the state should come from the disk cache")

    monkeypatch.setattr(TRAKAttributor, "_fit_state", refuse)
    again = TRAKAttributor(projection_dim=16, memory=str(tmp_path), **CPU).fit(run)
    np.testing.assert_array_equal(again.transform(queries), first)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"damping": -1.0}, r"'damping' parameter of TRAKAttributor must be None or a float in"),
        ({"projection_dim": 0}, r"'projection_dim' parameter .* an int in \[1, inf\); got 0"),
        ({"projection_dim": 2.5}, r"'projection_dim' parameter .* an int in \[1, inf\)"),
        ({"projection": "sparse"}, r"'projection' .* one of 'gaussian', 'rademacher'"),
        ({"checkpoints": "best"}, r"'checkpoints' .* one of 'final', 'all'; got 'best'"),
        ({"random_state": -1}, r"'random_state' .* None or an int in \[0, inf\)"),
    ],
)
def test_bad_parameters_name_the_parameter_the_value_and_what_is_allowed(run, params, match):
    with pytest.raises(ValueError, match=match):
        TRAKAttributor(**params, **CPU).fit(run)
