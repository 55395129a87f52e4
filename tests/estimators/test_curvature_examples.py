"""``curvature_examples``: curvature estimated from a seeded subset of each stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourcekit import InfluenceAttributor, SourceAttributor
from sourcekit.curvature import fit_curvature
from sourcekit.estimators._curvature import curvature_subset

from .. import _cases

CPU = {"device": "cpu", "dtype": "float64"}


@pytest.fixture(scope="module")
def run():
    return _cases.trajectory("mlp_two_stage")


def _queries():
    return _cases.queries("mlp_two_stage")


def test_the_subset_is_seeded_sorted_and_the_same_for_every_checkpoint_of_a_stage():
    examples = np.arange(3, 40)
    a = curvature_subset(examples, 10, seed=5, stage=1)
    assert len(a) == 10 and len(set(a)) == 10 and set(a) <= set(examples)
    assert np.array_equal(a, np.sort(a))
    assert np.array_equal(a, curvature_subset(examples, 10, seed=5, stage=1))
    assert not np.array_equal(a, curvature_subset(examples, 10, seed=6, stage=1))
    assert not np.array_equal(a, curvature_subset(examples, 10, seed=5, stage=0))
    assert np.array_equal(curvature_subset(examples, 37, seed=5, stage=1), examples)
    assert np.array_equal(curvature_subset(examples, None, seed=5, stage=1), examples)


@pytest.mark.parametrize("cls", [SourceAttributor, InfluenceAttributor])
def test_a_limit_at_or_above_the_stage_size_changes_nothing(run, cls):
    full = cls(**CPU).fit(run).transform(_queries())
    same = cls(curvature_examples=run.n_train, **CPU).fit(run).transform(_queries())
    np.testing.assert_array_equal(same, full)


def test_source_fits_each_segment_on_its_stage_subset(run):
    source = SourceAttributor(n_segments=2, curvature_examples=4, **CPU).fit(run)
    settings = source._fit_settings()
    blocks = source.state_.blocks
    for model in source.state_.segments:
        stage = run.stages[model.segment.stage]
        subset = curvature_subset(stage.examples, 4, settings.random_state, model.segment.stage)
        assert len(subset) == min(4, len(stage.examples))
        direct = fit_curvature("ekfac", run, blocks, model.segment.checkpoints, subset, settings)
        for name, factors in model.curvature.factors.items():
            torch.testing.assert_close(
                factors.eigenvalues, direct.factors[name].eigenvalues, rtol=0, atol=0
            )
        # the subset's training-loss factors are kept: scoring streams only the others
        for step in model.segment.checkpoints:
            kept = np.concatenate([b.indices for b in source.state_.cache[step]])
            np.testing.assert_array_equal(np.sort(kept), subset)


def test_scoring_streams_only_the_examples_outside_the_kept_subset(run, monkeypatch):
    import sourcekit.gradients._training as training

    streamed: list[int] = []
    original = training.checkpoint_batches

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        for batch in original(*args, **kwargs):
            streamed.extend(batch.indices.tolist())
            yield batch

    source = SourceAttributor(n_segments=2, curvature_examples=4, **CPU).fit(run)
    monkeypatch.setattr(training, "checkpoint_batches", counting)
    source.transform(_queries())
    expected = sum(
        len(run.stages[m.segment.stage].examples) - 4
        for m in source.state_.segments
        for _ in m.segment.checkpoints
    )
    assert len(streamed) == expected


@pytest.mark.parametrize("cls", [SourceAttributor, InfluenceAttributor])
def test_every_training_example_is_still_scored(run, cls):
    # With the identity curvature the subset has nothing to estimate, so the scores must
    # equal the full fit's: every column, including examples outside the subset.
    params = {"curvature": "identity", **CPU}
    full = cls(**params).fit(run).transform(_queries())
    subset = cls(curvature_examples=3, **params).fit(run).transform(_queries())
    np.testing.assert_allclose(subset, full, rtol=1e-12, atol=0)
    assert np.count_nonzero(np.abs(full).sum(axis=0)) == run.n_train


def test_a_subset_changes_the_curvature_and_the_seed_chooses_it(run):
    full = SourceAttributor(**CPU).fit(run).transform(_queries())
    a = SourceAttributor(curvature_examples=4, **CPU).fit(run).transform(_queries())
    b = SourceAttributor(curvature_examples=4, **CPU).fit(run).transform(_queries())
    c = SourceAttributor(curvature_examples=4, random_state=1, **CPU).fit(run)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, full)
    assert not np.allclose(c.transform(_queries()), a)


@pytest.mark.parametrize("value", [0, -3, 2.5, "all"])
@pytest.mark.parametrize("cls", [SourceAttributor, InfluenceAttributor])
def test_bad_values_are_refused(run, cls, value):
    with pytest.raises(ValueError, match=r"'curvature_examples' parameter of \w+ must be None or"):
        cls(curvature_examples=value, **CPU).fit(run)
