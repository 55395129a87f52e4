"""The built-in trainer: deterministic runs recorded like a user's loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit import OptimizerSpec, TrainingStage, train
from sourcekit.trajectory import learning_rate_schedule
from sourcekit.trajectory._replay import replay

from .. import _cases

SGD = OptimizerSpec("sgd", lr=0.1)


def _same_checkpoints(a: sourcekit.Trajectory, b: sourcekit.Trajectory) -> bool:
    if a.stored_steps != b.stored_steps:
        return False
    return all(
        a.checkpoint(s).params.keys() == b.checkpoint(s).params.keys()
        and all(
            torch.equal(v, b.checkpoint(s).params[k]) for k, v in a.checkpoint(s).params.items()
        )
        for s in a.stored_steps
    )


@pytest.mark.parametrize("name", ["linear_sgd", "mlp_adamw", "mlp_two_stage"])
def test_deterministic_given_the_seed(name: str) -> None:
    a, b = _cases.record(name, random_state=3), _cases.record(name, random_state=3)
    assert _same_checkpoints(a, b)
    assert all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches, strict=True))
    assert a.fingerprint == b.fingerprint
    c = _cases.record(name, random_state=4)
    first = next(iter(a.checkpoint(0).params))
    assert not torch.equal(a.checkpoint(0).params[first], c.checkpoint(0).params[first])
    assert not all(np.array_equal(x, y) for x, y in zip(a.batches, c.batches, strict=True))


def test_the_global_random_state_is_left_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    trajectory = _cases.record("mlp_sgd")
    trajectory.build_model()
    replay(trajectory)
    assert torch.equal(torch.rand(3), expected)


def test_a_model_template_is_not_modified() -> None:
    template = _cases.make_linear()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    trajectory = train(
        template,
        _cases.train_examples("linear_gd"),
        [TrainingStage(SGD, epochs=2, batch_size=4)],
        loss="squared_error",
        measurement="output",
        progress=False,
    )
    assert all(torch.equal(v, template.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(
        trajectory.checkpoint(trajectory.n_steps).params["weight"], before["weight"]
    )


def test_every_epoch_is_a_permutation_of_the_stage_examples() -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    for stage, per_epoch, epochs in zip(trajectory.stages, (2, 2), (3, 2), strict=True):
        steps = trajectory.batches[stage.start : stage.end]
        assert len(steps) == per_epoch * epochs
        for e in range(epochs):
            epoch = np.concatenate(steps[e * per_epoch : (e + 1) * per_epoch])
            np.testing.assert_array_equal(np.sort(epoch), stage.examples)


def test_the_last_batch_of_an_epoch_is_smaller() -> None:
    trajectory = _cases.trajectory("linear_sgd")  # 8 examples in batches of 3
    assert [b.size for b in trajectory.batches] == [3, 3, 2, 3, 3, 2]
    assert trajectory.stages[0].batch_size == 3


def test_full_batch_gradient_descent() -> None:
    trajectory = _cases.trajectory("linear_gd")
    assert all(np.array_equal(np.sort(b), np.arange(8)) for b in trajectory.batches)


def test_recorded_schedule_and_recipe() -> None:
    trajectory = _cases.trajectory("mlp_momentum")  # cosine, 3 epochs of 3 steps
    np.testing.assert_array_equal(
        trajectory.learning_rates, learning_rate_schedule(0.1, 9, "cosine")
    )
    recipe = trajectory.stages[0].recipe
    assert recipe is not None
    assert {
        k: recipe[k] for k in ("epochs", "batch_size", "schedule", "max_steps", "init_seed")
    } == {"epochs": 3, "batch_size": 4, "schedule": "cosine", "max_steps": None, "init_seed": 0}
    assert OptimizerSpec.from_dict(recipe["optimizer"]) == trajectory.stages[0].optimizer


def test_max_steps_stops_the_schedule_early() -> None:
    stage = TrainingStage(
        SGD, epochs=4, batch_size=2, schedule="linear", max_steps=5, n_checkpoints=2
    )
    trajectory = train(
        _cases.make_linear,
        _cases.train_examples("linear_gd"),
        [stage],
        loss="squared_error",
        measurement="output",
        progress=False,
    )
    assert trajectory.n_steps == 5
    # The schedule is laid out for all 16 steps and cut after 5.
    np.testing.assert_array_equal(
        trajectory.learning_rates, learning_rate_schedule(0.1, 16, "linear")[:5]
    )
    assert trajectory.checkpoint_steps == (1, 3)


@pytest.mark.parametrize(
    ("steps", "n", "expected"), [(8, 2, (2, 6)), (9, 3, (1, 4, 7)), (6, 0, ()), (2, 4, (0, 1))]
)
def test_checkpoints_at_interval_midpoints(steps: int, n: int, expected: tuple[int, ...]) -> None:
    stage = TrainingStage(SGD, epochs=steps, batch_size=8, n_checkpoints=n)
    trajectory = train(
        _cases.make_linear,
        _cases.train_examples("linear_gd"),
        [stage],
        loss="squared_error",
        measurement="output",
        progress=False,
    )
    assert trajectory.checkpoint_steps == expected
    assert trajectory.stored_steps == tuple(sorted({0, *expected, steps}))


def test_learning_rate_schedules() -> None:
    k = np.arange(4)
    np.testing.assert_array_equal(learning_rate_schedule(0.5, 4, "constant"), np.full(4, 0.5))
    np.testing.assert_array_equal(learning_rate_schedule(1.0, 4, "linear"), 1 - k / 4)
    np.testing.assert_allclose(
        learning_rate_schedule(2.0, 4, "cosine"), 1 + np.cos(np.pi * k / 4), rtol=1e-15
    )
    with pytest.raises(
        ValueError, match=r"Unknown schedule 'step'; use one of \('constant', 'linear', 'cosine'\)"
    ):
        learning_rate_schedule(1.0, 4, "step")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"epochs": 0},
            ValueError,
            r"'epochs' parameter of TrainingStage must be an int >= 1; got 0",
        ),
        (
            {"batch_size": True},
            ValueError,
            r"'batch_size' parameter of TrainingStage must be an int >= 1; got True",
        ),
        (
            {"n_checkpoints": -1},
            ValueError,
            r"'n_checkpoints' parameter of TrainingStage must be an int >= 0; got -1",
        ),
        (
            {"schedule": "step"},
            ValueError,
            r"'schedule' parameter of TrainingStage must be one of \('constant', 'linear', 'cosine'\); got 'step'",
        ),
        (
            {"max_steps": 0},
            ValueError,
            r"'max_steps' parameter of TrainingStage must be an int >= 1 or None; got 0",
        ),
        (
            {"optimizer": "sgd"},
            TypeError,
            r"'optimizer' of TrainingStage must be an OptimizerSpec; got str",
        ),
    ],
)
def test_bad_stage_settings(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TrainingStage(**{"optimizer": SGD, **kwargs})


def test_bad_train_arguments() -> None:
    data = _cases.train_examples("linear_gd")
    with pytest.raises(
        TypeError,
        match=r"'train' argument must be an Examples object; got tuple\. Wrap arrays as Examples",
    ):
        train(
            _cases.make_linear, (data.inputs, data.targets), [TrainingStage(SGD)], progress=False
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"train\(\) needs at least one TrainingStage"):
        train(_cases.make_linear, data, [], progress=False)
    with pytest.raises(
        ValueError, match=r"TrainingStage 'train' has no training examples\. Pass examples=None"
    ):
        train(
            _cases.make_linear,
            data,
            [TrainingStage(SGD, examples=[])],
            loss="squared_error",
            progress=False,
        )
    with pytest.raises(
        TypeError,
        match=r"The 'architecture' must be a 'module:factory' string, a callable returning an nn\.Module, or an nn\.Module; got int",
    ):
        train(3, data, [TrainingStage(SGD)], loss="squared_error", progress=False)  # type: ignore[arg-type]


def test_empty_training_set() -> None:
    empty = sourcekit.Examples(torch.zeros(0, 3), torch.zeros(0, 1))
    with pytest.raises(
        sourcekit.exceptions.TrajectoryError, match=r"training set is empty \(0 examples\)"
    ):
        train(_cases.make_linear, empty, [TrainingStage(SGD)], progress=False)


def test_progress_bar_is_silenced(capsys: pytest.CaptureFixture[str]) -> None:
    _cases.record("linear_gd")
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


def test_factory_returning_something_else() -> None:
    with pytest.raises(
        sourcekit.exceptions.TrajectoryError,
        match=r"returned a dict, not an nn\.Module\. Make it return the model",
    ):
        train(
            lambda: {},
            _cases.train_examples("linear_gd"),
            [TrainingStage(SGD)],
            loss="squared_error",
            progress=False,
        )


def test_steps_per_epoch() -> None:
    t = _cases.trajectory("linear_sgd")
    assert t.n_steps == 2 * math.ceil(8 / 3)


def _two_epochs(**kwargs: object) -> sourcekit.Trajectory:
    data = _cases.train_examples("linear_gd")
    stage = TrainingStage(SGD, epochs=2, batch_size=4, n_checkpoints=2)
    return train(_cases.make_linear, data, [stage], loss="squared_error", progress=False, **kwargs)


def test_the_device_argument_runs_there_and_stores_on_the_cpu() -> None:
    on_cpu = _two_epochs(device="cpu")
    assert _same_checkpoints(on_cpu, _two_epochs())  # the CPU is the default
    assert on_cpu.fingerprint == _two_epochs().fingerprint
    assert all(t.device.type == "cpu" for t in on_cpu.checkpoint(0).params.values())
    with pytest.raises(ValueError, match=r"'device' parameter must be .*got 'gpu'"):
        _two_epochs(device="gpu")


@pytest.mark.gpu
def test_a_run_recorded_on_cuda_matches_the_cpu_run_to_rounding() -> None:
    cpu, cuda = _two_epochs(device="cpu"), _two_epochs(device="cuda")
    assert cpu.stored_steps == cuda.stored_steps
    for step in cpu.stored_steps:
        for name, value in cpu.checkpoint(step).params.items():
            other = cuda.checkpoint(step).params[name]
            assert other.device.type == "cpu"
            # float32 SGD on a linear model: a few roundings per step, a handful of steps
            torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6)
