"""Parameter groups, clipping and random states: recorded, validated, saved and read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sourcekit import Examples, OptimizerSpec, Trajectory, TrajectoryRecorder
from sourcekit.exceptions import TrajectoryError
from sourcekit.trajectory import (
    GradientClipping,
    ParameterGroup,
    RandomStates,
    effective_learning_rates,
    weight_decays,
)
from sourcekit.trajectory._replay import replay

from .. import _cases

N = 24
BATCHES = [np.arange(s, s + 6) % N for s in range(0, 48, 6)]  # 8 steps


def _fine_tuning_run() -> tuple[Trajectory, torch.nn.Module]:
    """Dropout, AdamW without decay on biases, a per-group schedule and clipping."""
    data = _cases.classification_data(N, seed=3)
    torch.manual_seed(0)
    model = _cases.make_dropout_mlp()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.01,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda k: 1 / (1 + k), lambda k: 1.0]
    )
    recorder = TrajectoryRecorder(
        model, data, architecture="tests._cases:make_dropout_mlp", checkpoint_every=2
    )
    with recorder.stage(optimizer):
        for idx in BATCHES:
            optimizer.zero_grad()
            F.cross_entropy(model(data.inputs[idx]), data.targets[idx]).backward()
            recorder.clip_grad_norm_(0.5)
            optimizer.step()
            recorder.step(idx)
            scheduler.step()
    return recorder.finish(), model


def test_a_fine_tuning_run_is_saved_and_read_back(tmp_path: Path) -> None:
    trajectory, model = _fine_tuning_run()
    loaded = Trajectory.load(trajectory.save(tmp_path / "run"))
    assert loaded.fingerprint == trajectory.fingerprint
    assert loaded._compute_fingerprint() == trajectory.fingerprint  # recomputed from the files
    for got, want in zip(loaded.stages[0].groups, trajectory.stages[0].groups, strict=True):
        assert got.parameters == want.parameters and got.optimizer == want.optimizer
        assert got.schedule.keys() == want.schedule.keys()
        for key in want.schedule:
            np.testing.assert_array_equal(got.schedule[key], want.schedule[key])
    np.testing.assert_array_equal(loaded.clipping.coefficient, trajectory.clipping.coefficient)
    assert loaded.random_states.device == "cpu"
    assert torch.equal(loaded.random_states.states, trajectory.random_states.states)
    replayed, _ = replay(loaded)  # dropout masks, groups and clipping from the files
    for name, value in model.named_parameters():
        # float64 replay of 8 float32 steps (tests/trajectory/test_replay.py).
        np.testing.assert_allclose(
            replayed[name].detach().float(), value.detach(), rtol=0, atol=1e-6
        )


def test_a_plain_run_saves_the_manifest_older_versions_read(tmp_path: Path) -> None:
    # The new fields are written only when a run has them: a plain run's manifest and
    # schedule file are those of earlier versions, which therefore load as before.
    trajectory = _cases.trajectory("mlp_momentum")
    directory = trajectory.save(tmp_path / "plain")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert "random_device" not in manifest
    assert all("groups" not in stage for stage in manifest["stages"])
    schedule = torch.load(directory / "schedule.pt", weights_only=True)
    assert not [k for k in schedule if k.startswith(("stage.", "clipping.", "random."))]
    loaded = Trajectory.load(directory)
    assert loaded.stages[0].groups is None and loaded.clipping is None
    assert loaded.fingerprint == trajectory.fingerprint


def test_effective_learning_rates_and_weight_decays() -> None:
    trajectory, _ = _fine_tuning_run()
    rates = effective_learning_rates(trajectory, 0, 8)
    clip = trajectory.clipping.coefficient
    np.testing.assert_allclose(rates["0.weight"], 0.01 / (1 + np.arange(8)) * clip)
    np.testing.assert_allclose(rates["0.bias"], np.full(8, 0.01) * clip)
    decays = weight_decays(trajectory, 0, 8)
    assert decays["0.weight"] == (0.0, 0.1) and decays["0.bias"] == (0.0, 0.0)


def test_frozen_parameters_have_no_rate() -> None:
    data = _cases.classification_data(N, seed=3)
    torch.manual_seed(0)
    model = _cases.make_tanh_mlp()
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.5)
    recorder = TrajectoryRecorder(model, data, checkpoint_every=2)
    with recorder.stage(optimizer):
        for idx in BATCHES:
            optimizer.zero_grad()
            F.cross_entropy(model(data.inputs[idx]), data.targets[idx]).backward()
            optimizer.step()
            recorder.step(idx)
    rates = effective_learning_rates(recorder.finish(), 2, 5)
    np.testing.assert_array_equal(rates["0.weight"], np.zeros(3))
    np.testing.assert_allclose(rates["2.weight"], np.full(3, 0.2))  # 0.1 / (1 - 0.5)


def test_parameter_group_validation() -> None:
    sgd = OptimizerSpec("sgd", lr=0.1)
    with pytest.raises(
        TrajectoryError, match=r"'momentum' of step 1 of a parameter group is 1\.0"
    ):
        ParameterGroup(("w",), sgd, {"lr": np.ones(2), "momentum": np.array([0.5, 1.0])})
    with pytest.raises(TrajectoryError, match="must hold 'lr', one per step"):
        ParameterGroup(("w",), sgd, {"momentum": np.zeros(2)})
    with pytest.raises(TrajectoryError, match="holds 'nesterov'; the settings that may change"):
        ParameterGroup(("w",), sgd, {"lr": np.ones(2), "nesterov": np.zeros(2)})
    with pytest.raises(TrajectoryError, match="settings of different lengths"):
        ParameterGroup(("w",), sgd, {"lr": np.ones(2), "momentum": np.zeros(3)})
    with pytest.raises(TrajectoryError, match=r"clip coefficient of step 0 is 1\.5"):
        GradientClipping([1.0], [2.0], [1.5])
    with pytest.raises(TrajectoryError, match="strictly increasing"):
        RandomStates("cpu", [2, 1], torch.zeros(2, 4, dtype=torch.uint8))


def test_trajectory_checks_its_groups() -> None:
    trajectory, _ = _fine_tuning_run()
    stage = trajectory.stages[0]
    weights, biases = stage.groups
    renamed = ParameterGroup(("nope",), weights.optimizer, weights.schedule)
    with pytest.raises(
        TrajectoryError, match=r"names parameters the model does not have \['nope'\]"
    ):
        _cases.rebuild(trajectory, stages=[_replace_groups(stage, (renamed, biases))])
    twice = ParameterGroup(("0.weight",), biases.optimizer, biases.schedule)
    with pytest.raises(
        TrajectoryError, match=r"names parameters of another group \['0\.weight'\]"
    ):
        _cases.rebuild(trajectory, stages=[_replace_groups(stage, (weights, twice))])
    with pytest.raises(TrajectoryError, match="differ from those of its first parameter group"):
        _cases.rebuild(trajectory, learning_rates=trajectory.learning_rates * 2)
    with pytest.raises(
        TrajectoryError, match=r"clipping record covers 3 steps, but the run has 8"
    ):
        _cases.rebuild(trajectory, clipping=GradientClipping(np.ones(3), np.ones(3), np.ones(3)))


def _replace_groups(stage, groups):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(stage, groups=groups, examples=stage.examples.copy())


def test_replay_of_random_forward_passes_needs_their_device() -> None:
    trajectory, _ = _fine_tuning_run()
    other = _cases.rebuild(
        trajectory,
        random_states=RandomStates(
            "cuda", trajectory.random_states.steps, trajectory.random_states.states
        ),
    )
    with pytest.raises(TrajectoryError, match=r"recorded on 'cuda'.*Pass device='cuda'"):
        replay(other)


def test_examples_with_nan_are_refused_with_their_index() -> None:
    inputs = torch.zeros(4, 2)
    inputs[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"The inputs of example 2 hold nan \(1 example\(s\)"):
        Examples(inputs, torch.zeros(4, dtype=torch.long))
    targets = torch.zeros(4, 1)
    targets[3] = float("inf")
    with pytest.raises(ValueError, match=r"The targets of example 3 hold inf"):
        Examples(torch.zeros(4, 2), targets)


def test_fractional_class_targets_are_refused_with_their_index() -> None:
    from sourcekit import TrainingStage, train

    data = Examples(torch.randn(6, 3), torch.tensor([0.0, 1.0, 2.0, 1.5, 0.0, 1.0]))
    stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=1, batch_size=3)
    match = r"training targets are class indices.*target 3 is 1\.5, which is not an integer"
    with pytest.raises(ValueError, match=match):
        train(torch.nn.Linear(3, 3), data, [stage], progress=False)
    with pytest.raises(ValueError, match=match):
        TrajectoryRecorder(torch.nn.Linear(3, 3), data, checkpoint_every=1)
    whole = Examples(data.inputs, torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0, 1.0]))
    trajectory = train(torch.nn.Linear(3, 3), whole, [stage], progress=False)  # integral: kept
    with pytest.raises(ValueError, match=r"query targets are class indices.*target 3 is 1\.5"):
        trajectory.check_queries(data)


def test_the_summary_says_what_each_step_did() -> None:
    trajectory, _ = _fine_tuning_run()
    summary = trajectory.summary()
    assert "2 parameter group(s) training 4 of 4 parameters" in summary
    assert "gradient norms clipped at" in summary
    assert "random forward pass (dropout) at 8 steps" in summary
