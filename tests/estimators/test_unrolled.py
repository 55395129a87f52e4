"""``UnrolledAttributor``: the estimator over exact unrolling, and its input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourcekit import Examples, UnrolledAttributor
from sourcekit.exceptions import NotFittedError, TrajectoryError
from sourcekit.scoring import unrolled_scores

from .. import _cases

NAME = "mlp_momentum"


def _fitted(**params: object) -> UnrolledAttributor:
    return UnrolledAttributor(device="cpu", **params).fit(_cases.trajectory(NAME))  # type: ignore[arg-type]


def test_scores_are_the_unrolled_scores() -> None:
    queries = _cases.queries(NAME)
    scores = _fitted().transform(queries)
    assert isinstance(scores, np.ndarray)
    assert scores.dtype == np.float64 and scores.shape == (4, 12)
    np.testing.assert_array_equal(
        scores, unrolled_scores(_cases.trajectory(NAME), queries).numpy()
    )


def test_float32_scores() -> None:
    scores = _fitted(dtype="float32").transform(_cases.queries(NAME))
    assert scores.dtype == np.float32


def test_settings_are_read_at_transform() -> None:
    attributor = _fitted()
    queries = _cases.queries(NAME)
    exact = attributor.transform(queries)
    single = attributor.set_params(dtype="float32").transform(queries)
    assert single.dtype == np.float32
    # float32 replay of T = 9 steps (see tests/scoring/test_unrolled.py): 8·T·eps32 relative.
    np.testing.assert_allclose(single, exact, rtol=0, atol=8 * 9 * 1.2e-7 * np.abs(exact).max())


def test_no_queries() -> None:
    scores = _fitted().transform(_cases.queries(NAME)[:0])
    assert scores.shape == (0, 12) and scores.dtype == np.float64


def test_progress_bars_can_be_shown(capsys: pytest.CaptureFixture[str]) -> None:
    _fitted(progress=True).transform(_cases.queries(NAME))
    assert "unrolling queries" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"query_batch_size": 0},
            r"'query_batch_size' parameter of UnrolledAttributor must be an int in \[1, inf\); got 0\. Pass a valid value, e\.g\. UnrolledAttributor\(query_batch_size=\.\.\.\)",
        ),
        (
            {"query_batch_size": 2.0},
            r"'query_batch_size' parameter of UnrolledAttributor must be an int in \[1, inf\); got 2\.0",
        ),
        (
            {"dtype": "float16"},
            r"'dtype' parameter of UnrolledAttributor must be one of 'float32', 'float64'; got 'float16'",
        ),
        (
            {"device": 0},
            r"'device' parameter of UnrolledAttributor must be 'auto', 'cpu', 'cuda' or a torch\.device; got 0",
        ),
        (
            {"progress": "yes"},
            r"'progress' parameter of UnrolledAttributor must be a bool; got 'yes'",
        ),
    ],
)
def test_bad_parameters_are_refused_in_fit(params: dict, match: str) -> None:
    attributor = UnrolledAttributor(**params)  # the constructor only stores them
    with pytest.raises(ValueError, match=match):
        attributor.fit(_cases.trajectory(NAME))


def test_fit_needs_a_trajectory() -> None:
    with pytest.raises(
        TypeError,
        match=r"UnrolledAttributor\.fit needs a Trajectory or trajectory\.bind\(queries\); got Examples\. Record the run with TrajectoryRecorder or sourcekit\.train",
    ):
        UnrolledAttributor().fit(_cases.queries(NAME))  # type: ignore[arg-type]


def test_fit_needs_batches() -> None:
    trajectory = _cases.rebuild(_cases.trajectory(NAME), batches=None)
    with pytest.raises(
        TrajectoryError,
        match=r"UnrolledAttributor replays the recorded batches, but this trajectory has no batch indices\. Record the run with TrajectoryRecorder",
    ):
        UnrolledAttributor().fit(trajectory)


def test_transform_needs_queries_not_a_trajectory() -> None:
    with pytest.raises(
        TypeError,
        match=r"UnrolledAttributor\.transform needs queries, not a Trajectory\. Pass Examples\(inputs, targets\) or trajectory\.bind\(queries\)",
    ):
        _fitted().transform(_cases.trajectory(NAME))  # type: ignore[arg-type]


def test_queries_with_another_feature_size() -> None:
    queries = Examples(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"query inputs have shape \(n, 4\) per example but the training inputs have \(n, 3\)\. Pass queries shaped like the training examples",
    ):
        _fitted().transform(queries)


def test_queries_as_a_tuple() -> None:
    queries = _cases.queries(NAME)
    with pytest.raises(
        TypeError,
        match=r"Queries must be an Examples object; got tuple\. Wrap arrays as Examples\(inputs, targets\)",
    ):
        _fitted().transform((queries.inputs, queries.targets))  # type: ignore[arg-type]


def test_queries_bound_to_another_trajectory() -> None:
    other = _cases.trajectory("mlp_sgd").bind(_cases.queries(NAME))
    with pytest.raises(
        ValueError,
        match=r"bound to a different trajectory than the one this attributor was fitted on\. Bind them to the fitted trajectory \(attributor\.trajectory_\.bind\) or fit again",
    ):
        _fitted().transform(other)


def test_transform_before_fit() -> None:
    with pytest.raises(
        NotFittedError,
        match=r"This UnrolledAttributor instance is not fitted yet\. Call fit\(trajectory\) before transform",
    ):
        UnrolledAttributor().transform(_cases.queries(NAME))


def test_the_trajectory_is_not_modified() -> None:
    trajectory = _cases.record(NAME)
    before = {s: trajectory.checkpoint(s).digest() for s in trajectory.stored_steps}
    lrs = trajectory.learning_rates.copy()
    UnrolledAttributor(device="cpu").fit(trajectory).transform(_cases.queries(NAME))
    assert {s: trajectory.checkpoint(s).digest() for s in trajectory.stored_steps} == before
    np.testing.assert_array_equal(trajectory.learning_rates, lrs)
    assert trajectory.fingerprint == trajectory._compute_fingerprint()


@pytest.mark.gpu
def test_cuda_scores_equal_cpu_scores() -> None:
    trajectory, queries = _cases.trajectory(NAME), _cases.queries(NAME)
    cpu = UnrolledAttributor(device="cpu").fit(trajectory).transform(queries)
    cuda = UnrolledAttributor(device="cuda").fit(trajectory).transform(queries)
    # The same float64 computation on another device: kernels sum in another order, a
    # rounding of a few eps64 per operation over the T = 9 steps; 1e-10 relative is ample.
    np.testing.assert_allclose(cuda, cpu, rtol=0, atol=1e-10 * np.abs(cpu).max())
