"""SOURCE's fast variant: ``average_checkpoints=True``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourcekit import OptimizerSpec, SourceAttributor, TrainingStage, train
from sourcekit.gradients._training import TrainingGradients
from sourcekit.trajectory import Checkpoint
from sourcekit.trajectory._averaged import AveragedTrajectory, averaged_states

from .. import _cases

CPU = {"device": "cpu", "dtype": "float64"}


@pytest.fixture(scope="module")
def batchnorm_run():  # type: ignore[no-untyped-def]
    data = _cases.classification_data(24, 0)
    stage = TrainingStage(OptimizerSpec("sgd", lr=0.2), epochs=3, batch_size=6, n_checkpoints=4)
    return train(_cases.make_batchnorm_mlp, data, [stage], random_state=0, progress=False)


def test_averaged_states_are_the_mean_of_each_segments_checkpoints(batchnorm_run):
    segments = batchnorm_run.segments(n_segments=2)
    states = averaged_states(batchnorm_run, segments)
    assert sorted(states) == [s.checkpoints[0] for s in segments]
    for segment in segments:
        state = states[segment.checkpoints[0]]
        checkpoints = [batchnorm_run.checkpoint(c) for c in segment.checkpoints]
        for name, value in state.items():
            recorded = [{**c.params, **c.buffers}[name] for c in checkpoints]
            assert value.dtype == recorded[0].dtype
            if value.is_floating_point():  # weights and the running statistics
                mean = torch.stack([r.double() for r in recorded]).mean(0)
                torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)
            else:  # the batch counter comes from the last checkpoint
                assert torch.equal(value, recorded[-1])
        # the averaged state is really an average (the checkpoints differ)
        first = checkpoints[0].params
        assert any(not torch.equal(state[k], first[k]) for k in first)


def test_a_segment_with_one_checkpoint_keeps_it():
    run = _cases.trajectory("mlp_momentum")
    one_each = run.segments(n_segments=len(run.checkpoint_steps))
    assert averaged_states(run, one_each) == {}
    queries = _cases.queries("mlp_momentum")
    n = len(run.checkpoint_steps)
    standard = SourceAttributor(n_segments=n, **CPU).fit(run).transform(queries)
    fast = SourceAttributor(n_segments=n, average_checkpoints=True, **CPU).fit(run)
    assert np.array_equal(fast.transform(queries), standard)


def _with_averaged_checkpoints(run, n_segments):  # type: ignore[no-untyped-def]
    """A copy of ``run`` whose checkpoints all hold their segment's averaged weights
    (the optimiser's recorded state is kept)."""
    segments = run.segments(n_segments=n_segments)
    states = averaged_states(run, segments)
    checkpoints = {s: run.checkpoint(s) for s in run.stored_steps}
    for segment in segments:
        state = states.get(segment.checkpoints[0])
        for step in segment.checkpoints if state is not None else ():
            old = checkpoints[step]
            checkpoints[step] = Checkpoint(
                step=step,
                params={k: state[k] for k in old.params},
                buffers={k: state[k] for k in old.buffers},
                optimizer=old.optimizer,
            )
    return _cases.rebuild(run, checkpoints=checkpoints)


@pytest.mark.parametrize(
    ("case", "options"),
    [
        ("mlp_momentum", {"curvature": "exact"}),
        ("mlp_adam", {"curvature": "exact"}),
        ("mlp_momentum", {"curvature": "ekfac", "fisher": "expected"}),
        ("mlp_two_stage", {"curvature": "ekfac", "fisher": "expected"}),
    ],
)
def test_fast_variant_is_the_standard_one_at_the_averaged_weights(case, options):
    # With deterministic curvature, the standard variant run on a copy whose checkpoints
    # all hold their segment's average (curvature and gradients averaged over identical
    # copies) is the fast variant: the same numbers, summed in another order.
    run = _cases.trajectory(case)
    queries = _cases.queries(case)
    n_segments = 2  # mlp_two_stage: one segment per stage, of 3 checkpoints each
    fast = SourceAttributor(n_segments=n_segments, average_checkpoints=True, **options, **CPU)
    scores = fast.fit(run).transform(queries)
    copy = _with_averaged_checkpoints(run, n_segments)
    expected = (
        SourceAttributor(n_segments=n_segments, **options, **CPU).fit(copy).transform(queries)
    )
    # float64 sums of a few hundred terms in another order, and a dense eigendecomposition
    # of the same matrix: a few hundred eps of the largest score.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12 * scale)
    # and it differs from the standard variant on the recorded checkpoints
    standard = (
        SourceAttributor(n_segments=n_segments, **options, **CPU).fit(run).transform(queries)
    )
    assert np.abs(standard - scores).max() > 1e-6 * scale


@pytest.fixture(scope="module")
def six_checkpoints():  # type: ignore[no-untyped-def]
    data = _cases.classification_data(24, 1)
    stage = TrainingStage(
        OptimizerSpec("sgd", lr=0.2, momentum=0.9), epochs=4, batch_size=6, n_checkpoints=6
    )
    return train(_cases.make_tanh_mlp, data, [stage], random_state=1, progress=False)


def test_fast_variant_passes_over_the_data_once_per_segment(monkeypatch, six_checkpoints):
    run = six_checkpoints
    requested = []
    original = TrainingGradients.__call__

    def spy(self, step, indices):  # type: ignore[no-untyped-def]
        requested.append(step)
        assert isinstance(self.trajectory, AveragedTrajectory)
        yield from original(self, step, indices)

    monkeypatch.setattr(TrainingGradients, "__call__", spy)
    # memory_limit=1 keeps no factors: scoring streams the data again
    source = SourceAttributor(n_segments=3, average_checkpoints=True, memory_limit=1, **CPU)
    source.fit(run)
    source.transform(_cases.classification_data(1, 5))
    segments = source.segments_
    assert [s.checkpoints for s in segments] == [s.checkpoints for s in run.segments(3)]
    assert all(len(s.checkpoints) == 2 for s in segments)
    assert sorted(requested) == sorted(s.checkpoints[0] for s in segments)


def test_fast_variant_agrees_with_the_standard_one_on_a_stochastic_run(six_checkpoints):
    # Not an identity: two ways of making a segment stationary. On this run (SGD with
    # momentum, 6 checkpoints in 3 segments) they agree closely.
    run = six_checkpoints
    queries = _cases.classification_data(10, 5)
    standard = SourceAttributor(n_segments=3, **CPU).fit(run).transform(queries)
    fast = SourceAttributor(n_segments=3, average_checkpoints=True, **CPU).fit(run)
    r = np.corrcoef(standard.ravel(), fast.transform(queries).ravel())[0, 1]
    assert r > 0.9, r
