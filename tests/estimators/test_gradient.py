"""The base of the gradient attributors: shared settings, typed state, caches, query blocks."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

import sourcekit
from sourcekit import BaseAttributor, SourceAttributor
from sourcekit.base import FittedState, clear_state_cache
from sourcekit.estimators._gradient import GradientAttributor, GradientState
from sourcekit.estimators._source import SourceState

from .. import _cases
from ..test_common import ATTRIBUTORS

GRADIENT = {
    "GradientSimilarityAttributor",
    "InfluenceAttributor",
    "SourceAttributor",
    "TRAKAttributor",
    "TracInAttributor",
}


def test_the_attributors_that_stream_gradients_share_one_base() -> None:
    found = {cls.__name__ for cls in ATTRIBUTORS if issubclass(cls, GradientAttributor)}
    assert found == GRADIENT
    for cls in ATTRIBUTORS:
        assert issubclass(cls._state_type or FittedState, FittedState)
        shared = GradientAttributor._parameter_constraints
        if cls.__name__ in GRADIENT:  # the shared parameters, declared once
            assert {k: cls._parameter_constraints[k] for k in shared} == shared


def test_the_fitted_state_is_a_typed_object() -> None:
    run = _cases.trajectory("mlp_momentum")
    source = SourceAttributor(n_segments=2, device="cpu").fit(run)
    assert isinstance(source.state_, SourceState) and isinstance(source.state_, GradientState)
    assert [s.checkpoints for s in source.segments_] == [
        m.segment.checkpoints for m in source.state_.segments
    ]
    assert source.state_.cache  # the training-loss factors kept from fitting


def test_a_fitted_attributor_pickles_without_its_gradient_cache(digits_early) -> None:
    # The kept training-loss factors of the digits MLP (3.5k parameters, 1437 examples,
    # 6 checkpoints) take several times the whole recorded run: they are a cache, left out
    # of the pickle and streamed again by the restored attributor, to the same scores.
    queries = sourcekit.datasets.load_digits_task().test[:3]
    source = SourceAttributor(device="cpu").fit(digits_early)
    cached = sum(b.nbytes() for batches in source.state_.cache.values() for b in batches)
    run = len(pickle.dumps(digits_early))
    assert cached > 5 * run
    data = pickle.dumps(source)
    assert len(data) < 2 * run  # the run itself and the curvatures, not the gradients
    restored = pickle.loads(data)
    assert restored.state_.cache == {} and source.state_.cache  # the original keeps its own
    np.testing.assert_array_equal(restored.transform(queries), source.transform(queries))


def test_the_disk_cache_key_changes_with_the_state_format(tmp_path, monkeypatch) -> None:
    run, queries = _cases.trajectory("mlp_momentum"), _cases.queries("mlp_momentum")
    first = SourceAttributor(memory=tmp_path, device="cpu").fit(run).transform(queries)
    fits = []
    original = SourceAttributor._fit_state

    def counting(self, trajectory):  # type: ignore[no-untyped-def]
        fits.append(1)
        return original(self, trajectory)

    monkeypatch.setattr(SourceAttributor, "_fit_state", counting)
    clear_state_cache()  # as if in another process
    SourceAttributor(memory=tmp_path, device="cpu").fit(run)
    assert fits == []  # read from disk
    monkeypatch.setattr(SourceState, "FORMAT", SourceState.FORMAT + 1)  # another format
    clear_state_cache()
    again = SourceAttributor(memory=tmp_path, device="cpu").fit(run).transform(queries)
    assert fits == [1]  # not read as this format: fitted again
    np.testing.assert_array_equal(again, first)


@dataclasses.dataclass
class _Means(FittedState):
    means: list


def test_the_format_key_names_the_class_its_format_and_its_fields() -> None:
    assert _Means.format_key() == ("_Means", 1, ("means",))
    assert GradientState.format_key() == ("GradientState", 1, ("blocks", "cache"))


def test_an_attributor_without_the_gradient_settings_needs_none_of_them() -> None:
    # BaseAttributor asks its hooks, never for attributes a subclass may lack.
    class Constant(BaseAttributor):
        def _scores(self, queries):  # type: ignore[no-untyped-def]
            import torch

            return torch.ones(len(queries), self.n_train_, dtype=torch.float64)

    run = _cases.trajectory("mlp_sgd")
    scores = Constant().fit(run).transform(_cases.queries("mlp_sgd"))
    assert scores.dtype == np.float32 and np.all(scores == 1)
    assert not hasattr(Constant(), "memory_limit_")


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan"), "abc"])
@pytest.mark.parametrize(
    "cls", [c for c in ATTRIBUTORS if "damping" in c().get_params()], ids=lambda c: c.__name__
)
def test_damping_set_after_fit_is_validated_by_transform(cls, value) -> None:  # type: ignore[no-untyped-def]
    run, queries = _cases.trajectory("mlp_momentum"), _cases.queries("mlp_momentum")
    attributor = cls(device="cpu").fit(run)
    attributor.set_params(damping=value)
    with pytest.raises(
        ValueError,
        match=rf"The 'damping' parameter of {cls.__name__} must be (None or )?a float in \[0, inf\)( or one of 'auto')?; "
        r"got .*\.set_params\(damping=\.\.\.\)",
    ):
        attributor.transform(queries)
