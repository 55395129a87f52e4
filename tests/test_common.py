"""The scikit-learn contract of DESIGN.md, checked over every attributor in the package.

``sklearn.utils.estimator_checks`` skips almost everything for non-array input, so the
contract is checked here directly. Attributors are discovered automatically: every public
class of ``sourcekit`` (or ``sourcekit.estimators``) that subclasses ``BaseAttributor``.
A new attributor is picked up without editing this file; give it cheap settings in
``TEST_PARAMS`` if its defaults are expensive.
"""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils.validation import check_is_fitted

import sourcekit
import sourcekit.estimators
from sourcekit import BaseAttributor
from sourcekit.base import clear_state_cache
from sourcekit.exceptions import NotFittedError

from . import _cases


def _discover() -> list[type[BaseAttributor]]:
    found: dict[str, type[BaseAttributor]] = {}
    for module in (sourcekit, sourcekit.estimators):
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if (
                not name.startswith("_")
                and issubclass(obj, BaseAttributor)
                and obj is not BaseAttributor
                and not inspect.isabstract(obj)
            ):
                found[name] = obj
    return [found[name] for name in sorted(found)]


ATTRIBUTORS = _discover()

# Cheap, deterministic settings per attributor (on top of progress=False, device="cpu").
TEST_PARAMS: dict[str, dict[str, Any]] = {
    "UnrolledAttributor": {},
    "SourceAttributor": {},
    "InfluenceAttributor": {},
    "TracInAttributor": {},
    "TRAKAttributor": {"projection_dim": 16, "checkpoints": "all"},
    "GradientSimilarityAttributor": {},
    "RepresentationSimilarityAttributor": {},
    # an ensemble over one run here (tests/estimators/test_ensemble.py: several runs)
    "EnsembleAttributor": {"estimator": sourcekit.TracInAttributor(progress=False, device="cpu")},
}

CASE = "mlp_momentum"  # one stage, 9 steps, checkpoints at 1, 4 and 7
N_QUERIES = 6


def _params(cls: type[BaseAttributor]) -> dict[str, Any]:
    names = cls().get_params(deep=False)
    params: dict[str, Any] = {}
    if "progress" in names:
        params["progress"] = False
    if "device" in names:
        params["device"] = "cpu"
    params.update(TEST_PARAMS.get(cls.__name__, {}))
    return params


def _make(cls: type[BaseAttributor]) -> BaseAttributor:
    return cls(**_params(cls))


def _trajectory() -> sourcekit.Trajectory:
    return _cases.trajectory(CASE)


def _queries(n: int = N_QUERIES) -> sourcekit.Examples:
    return _cases.queries(CASE, n)


_FITTED: dict[str, tuple[BaseAttributor, np.ndarray]] = {}


def _fitted(cls: type[BaseAttributor]) -> tuple[BaseAttributor, np.ndarray]:
    """A fitted attributor and its scores of ``_queries()`` (computed once per class; the
    checks that use it never modify it)."""
    if cls.__name__ not in _FITTED:
        attributor = _make(cls).fit(_trajectory())
        _FITTED[cls.__name__] = (attributor, attributor.transform(_queries()))
    return _FITTED[cls.__name__]


def _tolerance(scores: np.ndarray) -> float:
    # Re-blocking or reordering queries changes only the order of the float sums behind a
    # score, over the model's 38 parameters and a few checkpoints: a sum of n terms moves by
    # at most n·eps·Σ|terms|. With n ≤ 50 and Σ|terms| at most twice the largest score on
    # this well-conditioned case, 100 eps of the score scale bounds it (observed: ~1 eps).
    return 100 * float(np.finfo(scores.dtype).eps) * max(float(np.abs(scores).max()), 1e-30)


def _assert_same_scores(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want))


def _comparable(params: dict[str, Any]) -> dict[str, Any]:
    """``get_params()`` with nested estimators (a meta-estimator's ``estimator``) replaced
    by their class and parameters: a clone holds an equal copy, not the same object."""
    return {
        k: (type(v), _comparable(v.get_params())) if isinstance(v, BaseAttributor) else v
        for k, v in params.items()
    }


def _fitted_runs(attributor: BaseAttributor) -> tuple[sourcekit.Trajectory, ...]:
    """The runs an attributor was fitted to (an ensemble's, or its one trajectory)."""
    if isinstance(attributor, sourcekit.EnsembleAttributor):
        return attributor.runs_.trajectories
    return (attributor.trajectory_,)


def test_attributors_are_discovered() -> None:
    names = {cls.__name__ for cls in ATTRIBUTORS}
    assert "UnrolledAttributor" in names
    assert all(cls.__name__ in sourcekit.__all__ for cls in ATTRIBUTORS)


each_attributor = pytest.mark.parametrize("cls", ATTRIBUTORS, ids=lambda c: c.__name__)


# --- construction --------------------------------------------------------------------------
@each_attributor
def test_init_only_stores_the_parameters(cls: type[BaseAttributor]) -> None:
    params = _params(cls)
    attributor = cls(**params)
    assert set(vars(attributor)) == set(attributor.get_params(deep=False))
    for name, value in params.items():
        assert getattr(attributor, name) is value


@each_attributor
def test_every_parameter_is_declared_and_validated(cls: type[BaseAttributor]) -> None:
    assert set(cls._parameter_constraints) == set(cls().get_params(deep=False))
    assert set(cls._state_parameters) <= set(cls._parameter_constraints)


@each_attributor
def test_get_and_set_params_round_trip(cls: type[BaseAttributor]) -> None:
    attributor = _make(cls)
    params = attributor.get_params()
    assert attributor.set_params(**params) is attributor
    assert _comparable(attributor.get_params()) == _comparable(params)
    other = cls()
    other.set_params(**params)
    assert _comparable(other.get_params()) == _comparable(params)
    with pytest.raises(ValueError, match="Invalid parameter"):
        attributor.set_params(no_such_parameter=1)


@each_attributor
def test_clone(cls: type[BaseAttributor]) -> None:
    attributor, _ = _fitted(cls)
    copy = clone(attributor)
    assert type(copy) is cls and copy is not attributor
    assert _comparable(copy.get_params()) == _comparable(attributor.get_params())
    assert not [k for k in vars(copy) if k.endswith("_")]  # clones are unfitted


@each_attributor
def test_repr(cls: type[BaseAttributor]) -> None:
    assert repr(cls()) == f"{cls.__name__}()"
    attributor = _make(cls)
    text = repr(attributor)
    assert text.startswith(f"{cls.__name__}(")
    if "device" in attributor.get_params():
        assert "device='cpu'" in text


@each_attributor
def test_tags(cls: type[BaseAttributor]) -> None:
    tags = cls().__sklearn_tags__()
    assert tags.requires_fit
    assert not tags.non_deterministic


# --- before fit ------------------------------------------------------------------------------
@each_attributor
def test_not_fitted_error_before_fit(cls: type[BaseAttributor]) -> None:
    attributor = _make(cls)
    with pytest.raises(
        NotFittedError,
        match=rf"This {cls.__name__} instance is not fitted yet\. Call fit\(trajectory\)",
    ):
        attributor.transform(_queries())
    with pytest.raises(NotFittedError, match="not fitted yet"):
        attributor.get_feature_names_out()
    with pytest.raises(SklearnNotFittedError):
        check_is_fitted(attributor)
    assert issubclass(NotFittedError, (ValueError, AttributeError))


# --- fit and transform -------------------------------------------------------------------------
@each_attributor
def test_fit_returns_self_and_sets_fitted_attributes(cls: type[BaseAttributor]) -> None:
    attributor = _make(cls)
    trajectory = _trajectory()
    assert attributor.fit(trajectory) is attributor
    check_is_fitted(attributor)
    assert len(_fitted_runs(attributor)) == 1 and _fitted_runs(attributor)[0] is trajectory
    assert attributor.n_train_ == trajectory.n_train
    assert attributor.fingerprint_ == trajectory.fingerprint


@each_attributor
def test_transform_returns_the_score_matrix(cls: type[BaseAttributor]) -> None:
    attributor, scores = _fitted(cls)
    assert isinstance(scores, np.ndarray)
    assert scores.shape == (N_QUERIES, _trajectory().n_train)
    expected = (
        np.float64 if attributor.get_params().get("dtype", "float32") == "float64" else np.float32
    )
    assert scores.dtype == expected
    assert np.all(np.isfinite(scores))
    assert np.any(scores != 0)


@each_attributor
def test_fit_is_idempotent(cls: type[BaseAttributor]) -> None:
    attributor = _make(cls)
    trajectory, queries = _trajectory(), _queries()
    first = attributor.fit(trajectory).transform(queries)
    again = attributor.fit(trajectory).transform(queries)  # from the cache
    np.testing.assert_array_equal(again, first)
    attributor.fit(_cases.trajectory("mlp_sgd"))  # another run in between
    clear_state_cache()
    recomputed = attributor.fit(trajectory).transform(queries)  # from scratch
    np.testing.assert_array_equal(recomputed, first)


def _snapshot(value: Any) -> Any:
    """A copy of fitted state that detects both rebinding and in-place changes."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value, value.detach().clone())
    if isinstance(value, np.ndarray):
        return ("array", value, value.copy())
    if isinstance(value, dict):
        return ("dict", value, {k: _snapshot(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return ("seq", value, [_snapshot(v) for v in value])
    return ("object", value, None)


def _assert_unchanged(before: Any, now: Any, where: str) -> None:
    kind, original, content = before
    assert now is original, f"{where} was replaced"
    if kind == "tensor":
        assert torch.equal(now, content), f"{where} was modified in place"
    elif kind == "array":
        np.testing.assert_array_equal(now, content, err_msg=f"{where} was modified in place")
    elif kind == "dict":
        assert now.keys() == content.keys(), f"{where} gained or lost keys"
        for key in content:
            _assert_unchanged(content[key], now[key], f"{where}[{key!r}]")
    elif kind == "seq":
        assert len(now) == len(content), f"{where} changed length"
        for i, item in enumerate(content):
            _assert_unchanged(item, now[i], f"{where}[{i}]")


@each_attributor
def test_transform_leaves_the_state_unchanged(cls: type[BaseAttributor]) -> None:
    attributor = _make(cls).fit(_trajectory())
    queries = _queries()
    inputs, targets = queries.inputs.clone(), queries.targets.clone()
    names = set(vars(attributor))
    before = {k: _snapshot(v) for k, v in vars(attributor).items() if k != "trajectory_"}
    (trajectory,) = _fitted_runs(attributor)
    attributor.transform(queries)
    attributor.transform(queries[:2])
    assert set(vars(attributor)) == names
    for key, snapshot in before.items():
        _assert_unchanged(snapshot, getattr(attributor, key), key)
    assert _fitted_runs(attributor) == (trajectory,)
    assert trajectory._compute_fingerprint() == trajectory.fingerprint  # the run is untouched
    assert torch.equal(queries.inputs, inputs) and torch.equal(queries.targets, targets)


@each_attributor
@settings(max_examples=10)
@given(data=st.data())
def test_query_order_and_subsets(cls: type[BaseAttributor], data: st.DataObject) -> None:
    attributor, scores = _fitted(cls)
    order = np.asarray(data.draw(st.permutations(range(N_QUERIES))), dtype=np.int64)
    _assert_same_scores(attributor.transform(_queries()[order]), scores[order])
    subset = np.asarray(
        data.draw(st.lists(st.integers(0, N_QUERIES - 1), min_size=1, max_size=N_QUERIES)),
        dtype=np.int64,
    )  # any subset, with repeats
    _assert_same_scores(attributor.transform(_queries()[subset]), scores[subset])


@each_attributor
def test_bound_tasks(cls: type[BaseAttributor]) -> None:
    attributor, scores = _fitted(cls)
    task = _trajectory().bind(_queries())
    _assert_same_scores(attributor.transform(task), scores)
    _assert_same_scores(attributor.transform(task[1:4]), scores[1:4])
    fresh = _make(cls)
    _assert_same_scores(fresh.fit_transform(task), _make(cls).fit(task).transform(task))
    _assert_same_scores(fresh.transform(_queries()), scores)  # fit(task) fits the trajectory


@each_attributor
def test_pickle_round_trip(cls: type[BaseAttributor]) -> None:
    attributor, scores = _fitted(cls)
    restored = pickle.loads(pickle.dumps(attributor))
    assert _comparable(restored.get_params()) == _comparable(attributor.get_params())
    assert restored.fingerprint_ == attributor.fingerprint_
    np.testing.assert_array_equal(restored.transform(_queries()), scores)


@each_attributor
def test_feature_names(cls: type[BaseAttributor]) -> None:
    attributor, _ = _fitted(cls)
    names = attributor.get_feature_names_out()
    assert isinstance(names, np.ndarray) and names.dtype == object
    assert names.tolist() == [f"train{i}" for i in range(_trajectory().n_train)]
