"""Reading a recorded recipe back and replaying it on subsets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit import Trajectory
from sourcekit.evaluation import retrain_measurements, retrain_model, stages_from_recipe
from sourcekit.exceptions import TrajectoryError

from .. import _cases


def _same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_stages_read_back_every_recorded_field(case_name: str) -> None:
    trajectory = _cases.trajectory(case_name)
    recipe_stages = _cases.CASES[case_name].stages()
    stages = stages_from_recipe(trajectory)
    assert len(stages) == len(recipe_stages)
    for got, recorded, stage in zip(stages, recipe_stages, trajectory.stages, strict=True):
        assert got.optimizer == recorded.optimizer
        for field in ("epochs", "batch_size", "schedule", "max_steps", "stop_fraction", "name"):
            assert getattr(got, field) == getattr(recorded, field)
        assert got.n_checkpoints == 0
        np.testing.assert_array_equal(got.examples, stage.examples)


def test_the_full_set_with_the_recorded_seed_reproduces_the_run(case_name: str) -> None:
    trajectory = _cases.trajectory(case_name)
    seed = trajectory.stages[0].recipe["init_seed"]
    assert _same_parameters(retrain_model(trajectory, None, seed), trajectory.build_model())


def test_another_seed_changes_the_initialisation() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    assert not _same_parameters(retrain_model(trajectory, None, 1), trajectory.build_model())
    assert _same_parameters(
        retrain_model(trajectory, None, 1), _cases.record("mlp_sgd", 1).build_model()
    )


def test_a_subset_intersects_every_stage_and_keeps_the_stopping_rule(
    digits_early: Trajectory,
) -> None:
    keep = np.zeros(digits_early.n_train, dtype=bool)
    keep[::2] = True
    [stage] = stages_from_recipe(digits_early, keep)
    assert stage.stop_fraction == 0.25
    np.testing.assert_array_equal(stage.examples, np.arange(0, digits_early.n_train, 2))

    two_stage = _cases.trajectory("mlp_two_stage")  # pretrain 0..7, finetune 4..11
    keep = np.isin(np.arange(12), [1, 5, 9])
    pretrain, finetune = stages_from_recipe(two_stage, keep)
    assert pretrain.examples.tolist() == [1, 5]
    assert finetune.examples.tolist() == [5, 9]


def test_a_stage_left_without_examples_is_skipped() -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    keep = np.arange(12) >= 8  # only fine-tuning examples
    [stage] = stages_from_recipe(trajectory, keep)
    assert stage.name == "finetune"
    direct = sourcekit.train(
        trajectory.architecture.source,
        trajectory.train,
        [replace(_cases.CASES["mlp_two_stage"].stages()[1], examples=np.arange(8, 12))],
        loss=trajectory.loss_spec,
        random_state=3,
        progress=False,
    )
    assert _same_parameters(retrain_model(trajectory, keep, 3), direct.build_model())


def test_a_subset_that_empties_every_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="keeps no training example of any stage"):
        stages_from_recipe(_cases.trajectory("mlp_sgd"), np.zeros(12, dtype=bool))


def test_a_keep_mask_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="have 5 columns but the trajectory has 12"):
        stages_from_recipe(_cases.trajectory("mlp_sgd"), np.ones(5, dtype=bool))


def test_the_recipe_survives_saving_and_loading(tmp_path: Path) -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    loaded = Trajectory.load(trajectory.save(tmp_path / "run"))
    assert stages_from_recipe(loaded) == stages_from_recipe(trajectory)
    assert _same_parameters(retrain_model(loaded, None, 0), trajectory.build_model())


def _without_recipe(trajectory: Trajectory) -> Trajectory:
    return _cases.rebuild(trajectory, stages=[replace(s, recipe=None) for s in trajectory.stages])


def test_a_run_from_a_users_own_loop_cannot_be_replayed() -> None:
    trajectory = _without_recipe(_cases.trajectory("mlp_two_stage"))
    masks = np.ones((2, 12), dtype=bool)
    for call in (
        lambda: stages_from_recipe(trajectory),
        lambda: retrain_model(trajectory, None, 0),
        lambda: retrain_measurements(trajectory, _cases.queries("mlp_sgd"), masks, progress=False),
    ):
        with pytest.raises(TrajectoryError, match="cannot be replayed") as info:
            call()
        message = str(info.value)
        assert "stage 'pretrain' has no training recipe" in message
        assert "sourcekit.train" in message and "retrain=" in message


def test_a_recorder_run_names_the_fix() -> None:
    train = _cases.train_examples("mlp_sgd")
    model = _cases.make_tanh_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = sourcekit.TrajectoryRecorder(model, train, checkpoint_every=2)
    with recorder.stage(optimizer, batch_size=4):
        for start in range(0, 12, 4):
            idx = torch.arange(start, start + 4)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(
                model(train.inputs[idx]), train.targets[idx]
            ).backward()
            optimizer.step()
            recorder.step(idx)
    trajectory = recorder.finish()
    with pytest.raises(
        TrajectoryError, match="recorded from your own loop with TrajectoryRecorder"
    ):
        retrain_measurements(
            trajectory, _cases.queries("mlp_sgd"), np.ones((2, 12), bool), progress=False
        )


def test_a_recipe_missing_fields_is_reported() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    broken = _cases.rebuild(
        trajectory, stages=[replace(s, recipe={"epochs": 3}) for s in trajectory.stages]
    )
    with pytest.raises(TrajectoryError, match=r"lacks \['batch_size', 'schedule', 'optimizer'\]"):
        stages_from_recipe(broken)
