"""The embedded digits task and its three recorded recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit.datasets import RECIPES, DigitsTask, load_digits_task, make_digits_mlp


def test_split_sizes(digits_task: DigitsTask) -> None:
    # 1797 images; test_size=0.2 rounds the test set up (scikit-learn's ceil): 360 + 1437.
    assert len(digits_task.train) == 1437 and len(digits_task.test) == 360
    assert digits_task.train.inputs.shape == (1437, 64) and digits_task.test.inputs.shape == (
        360,
        64,
    )
    assert digits_task.train.inputs.dtype == torch.float32
    assert digits_task.train.targets.dtype == torch.int64
    assert digits_task.train_images.shape == (1437, 8, 8) and digits_task.test_images.shape == (
        360,
        8,
        8,
    )
    # Stratified: every class is in both parts in about the same proportion.
    train_counts = np.bincount(digits_task.train.targets.numpy(), minlength=10)
    test_counts = np.bincount(digits_task.test.targets.numpy(), minlength=10)
    assert np.all(np.abs(train_counts / 1437 - test_counts / 360) < 0.01)


def test_split_follows_the_seed() -> None:
    a, b = load_digits_task(random_state=1), load_digits_task(random_state=1)
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert not torch.equal(a.train.inputs, load_digits_task(random_state=2).train.inputs)
    assert len(load_digits_task(test_size=0.5).test) == 899


def test_standardisation(digits_task: DigitsTask) -> None:
    raw_train = digits_task.train_images.reshape(-1, 64).astype(np.float64)
    raw_test = digits_task.test_images.reshape(-1, 64).astype(np.float64)
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    constant = std == 0
    assert constant.any()  # some corner pixels are blank in every training image
    expected_train = (raw_train - mean) / np.where(constant, 1.0, std)
    expected_test = (raw_test - mean) / np.where(constant, 1.0, std)
    # The task computes the statistics in float32, summing the 1437 rows one after the
    # other: the mean and the standard deviation carry relative errors up to n·eps32, so a
    # standardised value (x − m)/s is off by at most n·eps32·(|value| + |m|/s), plus eps32
    # for storing it in float32.
    n, eps32 = len(raw_train), float(np.finfo(np.float32).eps)
    ratio = np.abs(mean) / np.where(constant, 1.0, std)
    for got, expected in (
        (digits_task.train.inputs, expected_train),
        (digits_task.test.inputs, expected_test),  # the training statistics, not its own
    ):
        bound = n * eps32 * (np.abs(expected) + ratio) + eps32 * np.abs(expected)
        assert np.all(np.abs(got.double().numpy() - expected) <= bound)
    x = digits_task.train.inputs.double().numpy()
    assert np.all(x[:, constant] == 0)  # constant features are centred, not divided by 0
    assert np.all(np.abs(x.std(axis=0) - 1)[~constant] <= n * eps32 * (1 + ratio)[~constant])
    assert np.all(np.abs(x.mean(axis=0)) <= n * eps32 * (1 + ratio))  # centred on the training set


def test_images_are_the_raw_pixels(digits_task: DigitsTask) -> None:
    assert digits_task.train_images.min() == 0 and digits_task.train_images.max() == 16
    assert digits_task.flipped.shape == (1437,) and not digits_task.flipped.any()
    assert torch.equal(digits_task.clean_train_targets, digits_task.train.targets)


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_label_noise_flips_the_stated_fraction(noise: float) -> None:
    task = load_digits_task(label_noise=noise)
    clean = load_digits_task()
    assert task.flipped.sum() == round(noise * 1437)
    changed = task.train.targets.numpy() != task.clean_train_targets.numpy()
    np.testing.assert_array_equal(changed, task.flipped)  # every flipped label is wrong
    assert torch.equal(task.clean_train_targets, clean.train.targets)
    assert torch.equal(task.train.inputs, clean.train.inputs)
    assert torch.equal(task.test.targets, clean.test.targets)  # queries keep true labels
    assert task.train.targets.min() >= 0 and task.train.targets.max() <= 9
    again = load_digits_task(label_noise=noise)
    np.testing.assert_array_equal(again.flipped, task.flipped)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_size": 1.0}, r"'test_size' parameter must be a float in \(0, 1\); got 1\.0"),
        ({"label_noise": 1.0}, r"'label_noise' parameter must be a float in \[0, 1\); got 1\.0"),
        ({"label_noise": -0.1}, r"'label_noise' parameter must be a float in \[0, 1\); got -0\.1"),
    ],
)
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_digits_task(**kwargs)


def test_unknown_recipe(digits_task: DigitsTask) -> None:
    with pytest.raises(
        ValueError,
        match=r"'recipe' parameter must be one of \('standard', 'early', 'two_stage', 'adamw'\); got 'long'",
    ):
        digits_task.record("long", progress=False)


def test_the_model(digits_task: DigitsTask) -> None:
    model = make_digits_mlp((16,))
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear"]
    assert model(digits_task.test.inputs[:3]).shape == (3, 10)
    assert isinstance(digits_task.make_model(), torch.nn.Sequential)


@pytest.fixture(scope="module")
def recorded(digits_task: DigitsTask, digits_early: sourcekit.Trajectory) -> dict:
    return {
        "standard": digits_task.record("standard", progress=False),
        "early": digits_early,
        "two_stage": digits_task.record("two_stage", progress=False),
        "adamw": digits_task.record("adamw", progress=False),
    }


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_are_deterministic_given_the_seed(
    digits_task: DigitsTask, recorded: dict, recipe: str
) -> None:
    first = recorded[recipe]
    again = digits_task.record(recipe, progress=False)
    assert again.fingerprint == first.fingerprint  # every checkpoint, batch and rate
    final = first.checkpoint(first.n_steps).params
    assert all(torch.equal(v, again.checkpoint(again.n_steps).params[k]) for k, v in final.items())
    other = digits_task.record(recipe, random_state=1, progress=False)
    assert other.fingerprint != first.fingerprint
    assert not torch.equal(
        other.checkpoint(0).params["0.weight"], first.checkpoint(0).params["0.weight"]
    )


def test_early_has_a_quarter_of_the_steps(recorded: dict) -> None:
    standard, early = recorded["standard"], recorded["early"]
    assert standard.n_steps == 32 * 23 == 736  # 32 epochs of ceil(1437 / 64) batches
    assert early.n_steps * 4 == standard.n_steps
    # Stopped early, not shortened: the same schedule, seed and batches as the start of
    # the standard run.
    assert all(np.array_equal(a, b) for a, b in zip(early.batches, standard.batches, strict=False))
    np.testing.assert_array_equal(early.learning_rates, standard.learning_rates[: early.n_steps])
    assert len(early.checkpoint_steps) == len(standard.checkpoint_steps) == 6


def test_recipe_settings(recorded: dict) -> None:
    (stage,) = recorded["standard"].stages
    assert stage.optimizer == sourcekit.OptimizerSpec(
        "sgd", lr=0.01, momentum=0.9, weight_decay=1e-3
    )
    assert stage.batch_size == 64
    assert recorded["standard"].loss_spec == "cross_entropy"
    assert recorded["standard"].measurement_spec == "margin"


def test_the_adamw_recipe(recorded: dict, digits_task: DigitsTask) -> None:
    trajectory = recorded["adamw"]
    (stage,) = trajectory.stages
    assert stage.optimizer == sourcekit.OptimizerSpec("adamw", lr=0.003, weight_decay=0.1)
    assert trajectory.n_steps == 10 * 23
    # The cosine schedule decays to 0 over the run; Adam's moments are recorded.
    assert trajectory.learning_rates[0] == pytest.approx(0.003)
    assert trajectory.learning_rates[-1] < 1e-5
    state = trajectory.checkpoint(trajectory.checkpoint_steps[-1]).optimizer
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(state)
    model = trajectory.build_model().eval()
    with torch.no_grad():
        accuracy = (
            (model(digits_task.test.inputs).argmax(1) == digits_task.test.targets).float().mean()
        )
    assert accuracy > 0.9  # it learns (about 95% on the test split)


def test_two_stage_uses_disjoint_halves(recorded: dict) -> None:
    trajectory = recorded["two_stage"]
    pretrain, finetune = trajectory.stages
    assert (pretrain.name, finetune.name) == ("pretrain", "finetune")
    assert np.intersect1d(pretrain.examples, finetune.examples).size == 0
    np.testing.assert_array_equal(
        np.union1d(pretrain.examples, finetune.examples), np.arange(1437)
    )
    assert abs(pretrain.n_examples - finetune.n_examples) <= 1
    assert finetune.optimizer.lr == 0.003 and pretrain.optimizer.lr == 0.01
    assert pretrain.n_steps == 32 * 12 and finetune.n_steps == 10 * 12  # ceil(718 / 64) = 12
    # Every batch draws from its own stage's half.
    for stage in (pretrain, finetune):
        used = np.concatenate(trajectory.batches[stage.start : stage.end])
        assert np.isin(used, stage.examples).all()
    # Checkpoints in both stages, so segments can follow the stage boundary.
    assert any(s < pretrain.end for s in trajectory.checkpoint_steps)
    assert any(s >= finetune.start for s in trajectory.checkpoint_steps)


def test_the_standard_recipe_learns(recorded: dict, digits_task: DigitsTask) -> None:
    model = recorded["standard"].build_model().eval()
    with torch.no_grad():
        accuracy = (
            (model(digits_task.test.inputs).argmax(1) == digits_task.test.targets).float().mean()
        )
    # A 2-hidden-layer MLP reaches ~97% on digits; 90% is far above chance (10%).
    assert accuracy > 0.9
