"""``Examples`` and ``AttributionTask``: the containers scikit-learn slices."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.model_selection import KFold
from sklearn.utils import _safe_indexing

from sourcekit import AttributionTask, Examples, SourceAttributor, Trajectory

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


# --- inputs of several tensors: a dict (model(**inputs)) or a tuple (model(*inputs)) ---------
def _dict_examples(n: int = N) -> Examples:
    ids = torch.arange(n * 3).reshape(n, 3)
    mask = torch.ones(n, 3, dtype=torch.long)
    mask[::2, -1] = 0
    return Examples({"input_ids": ids, "attention_mask": mask}, torch.arange(n) % 3)


def _tuple_examples(n: int = N) -> Examples:
    return Examples(
        (torch.arange(n * 2.0).reshape(n, 2), torch.arange(n)[:, None] * 1.5), torch.arange(n) % 3
    )


def _structured_rows(examples: Examples) -> list[int]:
    if isinstance(examples.inputs, dict):
        return (examples.inputs["input_ids"][:, 0] // 3).tolist()
    return (examples.inputs[0][:, 0] / 2).long().tolist()


@pytest.mark.parametrize("make", [_dict_examples, _tuple_examples])
@given(indices=st.lists(st.integers(-N, N - 1), max_size=12))
def test_several_inputs_index_together(make, indices: list[int]) -> None:
    ex = make()
    assert ex.shape == (N,) and len(ex) == N
    key = np.asarray(indices, dtype=np.int64)
    want = [list(range(N))[i] for i in indices]
    for got in (ex[key], _safe_indexing(ex, key), ex[key, ...]):
        assert isinstance(got, Examples)
        assert type(got.inputs) is type(ex.inputs)
        assert _structured_rows(got) == want
        assert got.targets.tolist() == [i % 3 for i in want]
    assert _structured_rows(ex[1:5:2]) == [1, 3]
    assert _structured_rows(ex[np.arange(N) % 2 == 0]) == [0, 2, 4, 6]


def test_several_inputs_move_concat_and_describe_themselves() -> None:
    ex = _dict_examples()
    joined = Examples.concat([ex[:3], ex[3:]])
    assert list(joined.inputs) == ["input_ids", "attention_mask"]
    for key in ex.inputs:
        assert torch.equal(joined.inputs[key], ex.inputs[key])
    moved = _tuple_examples().to(dtype=torch.float64)
    assert [t.dtype for t in moved.inputs] == [torch.float64, torch.float64]
    assert moved.to(dtype=torch.float32).inputs[0].dtype == torch.float32
    assert ex.to(dtype=torch.float64).inputs["input_ids"].dtype == torch.int64  # integers stay
    assert repr(ex) == (
        "Examples(n=7, inputs={'input_ids': int64[3], 'attention_mask': int64[3]}, "
        "targets=int64[])"
    )
    assert (
        repr(_tuple_examples())
        == "Examples(n=7, inputs=(float32[2], float32[1]), targets=int64[])"
    )
    with pytest.raises(ValueError, match="same kind; the parts hold dicts with different keys"):
        Examples.concat([ex, Examples({"input_ids": ex.inputs["input_ids"]}, ex.targets)])
    with pytest.raises(ValueError, match="same kind"):
        Examples.concat([ex, _examples()])


def test_several_inputs_fingerprint_their_names_values_and_kind() -> None:
    ex = _dict_examples()
    assert ex.fingerprint() == _dict_examples().fingerprint()
    renamed = Examples(
        {"ids": ex.inputs["input_ids"], "attention_mask": ex.inputs["attention_mask"]}, ex.targets
    )
    as_tuple = Examples(tuple(ex.inputs.values()), ex.targets)
    changed = Examples({k: v.clone() for k, v in ex.inputs.items()}, ex.targets)
    changed.inputs["attention_mask"][1, 0] = 0
    prints = {e.fingerprint() for e in (ex, renamed, as_tuple, changed)}
    assert len(prints) == 4
    # A single tensor keeps the fingerprint it always had (caches keyed by it stay valid).
    plain = _examples()
    digest = hashlib.sha256()
    for t in (plain.inputs, plain.targets):
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert plain.fingerprint() == digest.hexdigest()


def test_several_inputs_are_checked() -> None:
    ids = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"inputs\['mask'\] have 3 examples but inputs\['input_ids'\] have 4"
    ):
        Examples({"input_ids": ids, "mask": torch.zeros(3, 3)}, torch.zeros(4))
    with pytest.raises(ValueError, match=r"got 4 inputs and 5 targets"):
        Examples((ids, ids), torch.zeros(5))
    with pytest.raises(TypeError, match=r"keys \[0\] that are not strings.*model\(\*\*inputs\)"):
        Examples({0: ids}, torch.zeros(4))
    with pytest.raises(ValueError, match="empty dict"):
        Examples({}, torch.zeros(4))
    with pytest.raises(ValueError, match=r"inputs\[1\] are a scalar"):
        Examples((ids, torch.tensor(1.0)), torch.zeros(4))
    bad = torch.zeros(4, 2)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"inputs\['scale'\] of example 2 hold nan"):
        Examples({"input_ids": ids, "scale": bad}, torch.zeros(4))
    ex = Examples({"input_ids": np.zeros((4, 3), dtype=np.int64)}, np.zeros(4))
    assert isinstance(ex.inputs["input_ids"], torch.Tensor)


def test_queries_must_hold_inputs_of_the_training_kind() -> None:
    trajectory = _cases.trajectory("mlp_dict")
    queries = _cases.queries("mlp_dict", 3)
    assert trajectory.check_queries(queries) is queries
    plain = Examples(queries.inputs["features"], queries.targets)
    with pytest.raises(
        ValueError,
        match=r"query inputs are a tensor but the training inputs are a dict with keys \['features', 'mask'\]",
    ):
        trajectory.bind(plain)
    renamed = Examples(
        {"features": queries.inputs["features"], "other": queries.inputs["mask"]}, queries.targets
    )
    with pytest.raises(ValueError, match=r"dict with keys \['features', 'other'\]"):
        trajectory.bind(renamed)
    wider = Examples(
        {"features": torch.zeros(3, 4), "mask": queries.inputs["mask"]}, queries.targets
    )
    with pytest.raises(
        ValueError,
        match=r"query inputs\['features'\] have shape \(n, 4\) per example but the training inputs\['features'\] have \(n, 3\)",
    ):
        trajectory.bind(wider)
    floats = Examples(
        {"features": queries.inputs["features"], "mask": queries.inputs["mask"].float()},
        queries.targets,
    )
    with pytest.raises(
        ValueError,
        match=r"query inputs\['mask'\] have dtype torch.float32 but the training inputs\['mask'\] have torch.int64",
    ):
        trajectory.bind(floats)
    task = trajectory.bind(queries)
    for _, test_idx in KFold(n_splits=3).split(task):
        part = _safe_indexing(task, test_idx)
        assert part.trajectory is trajectory and len(part) == len(test_idx)


@pytest.mark.parametrize("name", ["mlp_dict", "mlp_tuple"])
def test_runs_on_several_inputs_save_load_and_attribute(name: str, tmp_path: Path) -> None:
    trajectory = _cases.trajectory(name)
    trajectory.save(tmp_path / "run")
    loaded = Trajectory.load(tmp_path / "run")
    assert type(loaded.train.inputs) is type(trajectory.train.inputs)
    assert loaded.fingerprint == trajectory.fingerprint
    queries = _cases.queries(name, 3)
    before = SourceAttributor(n_segments=1, device="cpu").fit(trajectory).transform(queries)
    after = SourceAttributor(n_segments=1, device="cpu").fit(loaded).transform(queries)
    np.testing.assert_array_equal(after, before)
    assert np.isfinite(before).all() and np.abs(before).max() > 0
