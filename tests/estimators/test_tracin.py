"""TracInAttributor as an estimator: its terms, the fitted gradient cache and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from sourcekit import TracInAttributor
from sourcekit.base import state_cache_info

from .. import _cases

CPU = {"device": "cpu"}
EPS64 = float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def run():
    return _cases.trajectory("mlp_momentum")  # 9 steps, checkpoints 1, 4, 7, momentum 0.9


def test_the_terms_are_the_checkpoints_with_their_corrected_learning_rates(run):
    attributor = TracInAttributor(**CPU).fit(run)
    assert attributor.momentum_correction is True
    terms = attributor.checkpoints_
    assert [(t.step, t.start, t.end, t.n_examples) for t in terms] == [
        (1, 0, 3, 12),
        (4, 3, 6, 12),
        (7, 6, 9, 12),
    ]
    for term in terms:
        recorded = run.learning_rates[term.start : term.end].sum()
        assert term.learning_rate == pytest.approx(recorded / (1 - 0.9), rel=1e-12)


# memory_limit=1 streams the training data once per query, as the warning says
@pytest.mark.filterwarnings("ignore::sourcekit.exceptions.PerformanceWarning")
def test_fit_keeps_the_training_gradients_and_scoring_reuses_them(run):
    queries = _cases.queries("mlp_momentum")
    cached = TracInAttributor(dtype="float64", **CPU).fit(run)
    assert sorted(cached.state_.cache) == [1, 4, 7]
    streamed = TracInAttributor(dtype="float64", memory_limit=1, **CPU).fit(run)
    assert streamed.state_.cache == {}
    expected = cached.transform(queries)
    # the same float64 gradients, contracted in other groupings (one query per block here)
    atol = 64 * 38 * EPS64 * np.abs(expected).max()
    np.testing.assert_allclose(streamed.transform(queries), expected, rtol=0, atol=atol)


def test_momentum_correction_is_read_at_transform_without_refitting(run):
    queries = _cases.queries("mlp_momentum")
    attributor = TracInAttributor(**CPU).fit(run)
    misses = state_cache_info()["misses"]
    corrected = attributor.transform(queries)
    plain = attributor.set_params(momentum_correction=False).transform(queries)
    assert state_cache_info()["misses"] == misses
    np.testing.assert_allclose(corrected, 10 * plain, rtol=1e-5)  # float32 scores


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"momentum_correction": "yes"},
            r"'momentum_correction' parameter of TracInAttributor must be a bool; got 'yes'",
        ),
        ({"modules": "0"}, r"'modules' .* None or a list of module names"),
        ({"batch_size": 0}, r"'batch_size' .* an int in \[1, inf\)"),
        ({"dtype": "float16"}, r"'dtype' .* one of 'float32', 'float64'"),
    ],
)
def test_bad_parameters_name_the_parameter_the_value_and_what_is_allowed(run, params, match):
    with pytest.raises(ValueError, match=match):
        TracInAttributor(**params, **CPU).fit(run)
