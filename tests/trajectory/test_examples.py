"""``Examples`` and ``AttributionTask``: the containers scikit-learn slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.model_selection import KFold
from sklearn.utils import _safe_indexing

from sourcekit import AttributionTask, Examples

from .. import _cases

N = 7


def _examples(n: int = N) -> Examples:
    inputs = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    return Examples(inputs, torch.arange(n) % 3)


def _rows(examples: Examples) -> list[int]:
    """The original positions held by ``examples`` (the targets-free identity of a row)."""
    return (examples.inputs[:, 0] / 2).long().tolist()


def test_shape_and_len() -> None:
    ex = _examples()
    assert ex.shape == (N,)
    assert len(ex) == N


@given(st.integers(-N, N - 1))
def test_int_index_keeps_the_examples_axis(i: int) -> None:
    got = _examples()[i]
    assert isinstance(got, Examples)
    assert got.shape == (1,)
    assert _rows(got) == [list(range(N))[i]]
    got_np = _examples()[np.int64(i)]
    assert _rows(got_np) == _rows(got)


@given(st.integers(-N - 2, N + 2), st.integers(-N - 2, N + 2), st.sampled_from([None, 1, 2, -1]))
def test_slice(start: int, stop: int, step: int | None) -> None:
    got = _examples()[start:stop:step]
    assert isinstance(got, Examples)
    assert _rows(got) == list(range(N))[start:stop:step]


@given(st.lists(st.integers(-N, N - 1), max_size=12))
def test_integer_array(indices: list[int]) -> None:
    key = np.asarray(indices, dtype=np.int64)
    want = [list(range(N))[i] for i in indices]
    for k in (key, torch.from_numpy(key), indices):
        got = _examples()[k]
        assert isinstance(got, Examples)
        assert got.shape == (len(indices),)
        assert _rows(got) == want


@given(st.lists(st.booleans(), min_size=N, max_size=N))
def test_boolean_mask(mask: list[bool]) -> None:
    got = _examples()[np.asarray(mask)]
    assert _rows(got) == [i for i in range(N) if mask[i]]
    assert _rows(_examples()[torch.tensor(mask)]) == _rows(got)


@given(st.lists(st.integers(0, N - 1), max_size=12))
def test_sklearn_safe_indexing(indices: list[int]) -> None:
    # scikit-learn indexes with ``X[key, ...]``; anything without it becomes a list.
    got = _safe_indexing(_examples(), np.asarray(indices, dtype=np.int64))
    assert isinstance(got, Examples)
    assert _rows(got) == indices
    assert _rows(_examples()[np.asarray(indices, dtype=np.int64), ...]) == indices


@pytest.mark.parametrize(
    ("key", "match"),
    [
        (N, r"Example index 7 is out of range for 7 examples"),
        (-N - 1, r"Example index -8 is out of range"),
        ([0, N], r"must lie in \[-7, 7\); got values from 0 to 7"),
        (np.ones(N - 1, dtype=bool), r"boolean mask must have shape \(7,\); got \(6,\)"),
        (np.array([0.5, 1.0]), r"array of ints or booleans; got an array of dtype float64"),
        ((0, 1), r"indexed along the examples axis only; got the tuple \(0, 1\)"),
    ],
)
def test_bad_keys(key: object, match: str) -> None:
    with pytest.raises(IndexError, match=match):
        _examples()[key]


def test_mismatched_lengths_name_both_counts_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"got 3 inputs and 2 targets\. Pass matching arrays"):
        Examples(torch.zeros(3, 2), torch.zeros(2))


def test_scalars_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"leading examples axis.*x\[None\]"):
        Examples(torch.tensor(1.0), torch.tensor(0))


def test_object_arrays_are_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"'inputs' array has dtype object.*np\.asarray"):
        Examples(np.array([object(), object()]), np.zeros(2))


def test_numpy_inputs_are_shared_not_copied() -> None:
    x = np.zeros((4, 2), dtype=np.float32)
    ex = Examples(x, np.zeros(4, dtype=np.int64))
    assert np.shares_memory(ex.inputs.numpy(), x)


def test_fingerprint_depends_on_values_and_dtype() -> None:
    ex = _examples()
    assert ex.fingerprint() == _examples().fingerprint()
    assert ex.fingerprint() != ex[:-1].fingerprint()
    assert ex.fingerprint() != Examples(ex.inputs.double(), ex.targets).fingerprint()
    changed = Examples(ex.inputs.clone(), ex.targets.clone())
    changed.inputs[3, 1] += 1
    assert ex.fingerprint() != changed.fingerprint()


def test_concat_and_to() -> None:
    ex = _examples()
    joined = Examples.concat([ex[:3], ex[3:]])
    assert torch.equal(joined.inputs, ex.inputs)
    assert torch.equal(joined.targets, ex.targets)
    moved = ex.to(dtype=torch.float64)
    assert moved.inputs.dtype == torch.float64
    assert moved.targets.dtype == ex.targets.dtype  # integer labels keep their dtype
    with pytest.raises(ValueError, match="at least one Examples"):
        Examples.concat([])


# --- AttributionTask: a trajectory bound to queries --------------------------------------
def test_bind_slicing_keeps_the_same_trajectory() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd", 6)
    task = trajectory.bind(queries)
    assert isinstance(task, AttributionTask)
    assert task.shape == (6,)
    assert len(task) == 6
    for key in (slice(1, 4), [5, 0], np.array([True, False] * 3), 2):
        part = task[key]
        assert isinstance(part, AttributionTask)
        assert part.trajectory is trajectory
        assert torch.equal(part.queries.inputs, queries[key].inputs)
    folds = list(KFold(n_splits=3).split(task))
    for _, test_idx in folds:
        part = _safe_indexing(task, test_idx)
        assert isinstance(part, AttributionTask)
        assert part.trajectory is trajectory
        assert len(part) == len(test_idx)
    assert "AttributionTask(n_queries=6" in repr(task)


def test_bind_checks_the_queries() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    with pytest.raises(TypeError, match=r"Queries must be an Examples object; got tuple"):
        trajectory.bind((torch.zeros(2, 3), torch.zeros(2)))


def test_attribution_task_needs_a_trajectory() -> None:
    with pytest.raises(TypeError, match="AttributionTask needs a Trajectory; got str"):
        AttributionTask("not a trajectory", _examples())  # type: ignore[arg-type]


def test_trajectory_is_opaque_to_scikit_learn() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    for name in ("__len__", "shape", "__getitem__", "__array__"):
        assert not hasattr(trajectory, name), name
