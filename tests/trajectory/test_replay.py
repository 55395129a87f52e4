"""Replay re-executes the recorded updates and reproduces the recorded run."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sourcekit import OptimizerSpec, TrainingStage, train
from sourcekit.exceptions import TrajectoryError
from sourcekit.trajectory._replay import replay

from .. import _cases

EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("name", _cases.CASE_NAMES)
def test_replay_reproduces_the_recorded_final_parameters(name: str) -> None:
    trajectory = _cases.trajectory(name)
    final = trajectory.checkpoint(trajectory.n_steps).params
    replayed, _ = replay(trajectory)  # float64, from the recorded initial state
    scale = max(float(v.abs().max()) for v in final.values())
    # The recorded run is float32: each of its T updates commits a handful of roundings
    # (the batch and feature reductions, <= 5 terms here, and the optimiser's update), each
    # at most eps32 relative to the parameter scale; the short, stable runs do not amplify
    # them, so the recorded state is within 8·T·eps32·scale of exact arithmetic, which the
    # float64 replay computes up to 1e-16.
    tolerance = 8 * trajectory.n_steps * EPS32 * max(scale, 1.0)
    assert tolerance < 1e-3 * scale  # far tighter than any wrong update would give
    for key, value in final.items():
        error = float((replayed[key].detach() - value.double()).abs().max())
        assert error <= tolerance, (key, error, tolerance)


def test_replay_depends_on_every_update() -> None:
    # The check above can fail: a replay with another momentum misses the recorded state.
    trajectory = _cases.trajectory("mlp_momentum")
    (stage,) = trajectory.stages
    other = replace(stage, optimizer=replace(stage.optimizer, momentum=0.8))
    changed = _cases.rebuild(trajectory, stages=[other])
    final = trajectory.checkpoint(trajectory.n_steps).params["0.weight"].double()
    replayed = replay(changed)[0]["0.weight"].detach()
    assert float((replayed - final).abs().max()) > 1e-3


def test_unit_weights_are_the_default() -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    default, _ = replay(trajectory)
    ones, _ = replay(trajectory, weights=torch.ones(12, dtype=torch.float64))
    for key in default:
        assert torch.equal(default[key], ones[key])


def test_weights_enter_the_loss() -> None:
    trajectory = _cases.trajectory("linear_gd")
    default, _ = replay(trajectory)
    weights = torch.ones(8, dtype=torch.float64)
    weights[3] = 0.0
    dropped, _ = replay(trajectory, weights=weights)
    assert not torch.allclose(default["weight"], dropped["weight"])


def test_replay_in_float32() -> None:
    trajectory = _cases.trajectory("mlp_adam")
    params, _ = replay(trajectory, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in params.values())


def test_replay_is_differentiable_in_the_weights() -> None:
    trajectory = _cases.trajectory("linear_sgd")
    weights = torch.ones(8, dtype=torch.float64, requires_grad=True)
    params, _ = replay(trajectory, weights=weights, create_graph=True)
    (grad,) = torch.autograd.grad(params["bias"].sum(), weights)
    assert grad.shape == (8,) and torch.all(grad != 0)


def test_weights_of_the_wrong_shape() -> None:
    with pytest.raises(
        ValueError, match=r"'weights' must have shape \(8,\), one per training example; got \(7,\)"
    ):
        replay(_cases.trajectory("linear_gd"), weights=torch.ones(7, dtype=torch.float64))


def test_replay_needs_batches() -> None:
    trajectory = _cases.rebuild(_cases.trajectory("linear_gd"), batches=None)
    with pytest.raises(
        TrajectoryError,
        match=r"Replay replays the recorded batches, but this trajectory has no batch indices\. Record the run with TrajectoryRecorder",
    ):
        replay(trajectory)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_replay_leaves_the_stored_buffers_alone(dtype: torch.dtype) -> None:
    data = _cases.classification_data(12, seed=0)
    stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=4)
    trajectory = train(_cases.make_batchnorm_mlp, data, [stage], progress=False)
    fingerprint = trajectory.fingerprint
    initial = {k: v.clone() for k, v in trajectory.checkpoint(0).buffers.items()}
    _, buffers = replay(trajectory, dtype=dtype)
    for name, value in initial.items():
        assert torch.equal(trajectory.checkpoint(0).buffers[name], value), name
    assert trajectory._compute_fingerprint() == fingerprint
    # The replayed batch-norm statistics are the recorded ones (float32 rounding of 6
    # running-average updates, each a few eps32 relative: 1e-5 absolute on O(1) values).
    final = trajectory.checkpoint(trajectory.n_steps).buffers
    assert int(buffers["1.num_batches_tracked"]) == int(final["1.num_batches_tracked"]) == 6
    for name in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(buffers[name].double(), final[name].double(), rtol=0, atol=1e-5)
