"""The ``Trajectory`` constructor: a record is complete and consistent, or it is refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from sourcekit import Examples, OptimizerSpec, Trajectory
from sourcekit.exceptions import TrajectoryError
from sourcekit.trajectory import Checkpoint, Stage

from .. import _cases

CASE = "linear_sgd"  # 8 examples, 6 steps of batches 3, 3, 2


def _parts(**overrides: Any) -> dict[str, Any]:
    """The constructor arguments of the shared case ``CASE``, with some replaced."""
    parts = _cases.arguments(_cases.trajectory(CASE))
    parts.update(overrides)
    return parts


def test_the_parts_make_the_same_trajectory() -> None:
    assert Trajectory(**_parts()).fingerprint == _cases.trajectory(CASE).fingerprint


# --- the training set ----------------------------------------------------------------------
def test_empty_training_set() -> None:
    empty = Examples(torch.zeros(0, 3), torch.zeros(0, 1))
    with pytest.raises(
        TrajectoryError,
        match=r"training set is empty \(0 examples\).*the full training set as train=Examples",
    ):
        Trajectory(**_parts(train=empty))


def test_training_set_must_be_examples() -> None:
    t = _cases.trajectory(CASE)
    with pytest.raises(
        TypeError,
        match=r"'train' argument must be an Examples object; got tuple\. Wrap arrays as Examples",
    ):
        Trajectory(**_parts(train=(t.train.inputs, t.train.targets)))


# --- the schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize("length", [5, 7])
def test_learning_rates_of_the_wrong_length(length: int) -> None:
    with pytest.raises(
        TrajectoryError,
        match=rf"learning_rates list has shape \({length},\), but the stages cover 6 steps; record one learning rate per step \(shape \(6,\)\)",
    ):
        Trajectory(**_parts(learning_rates=np.full(length, 0.1)))


@pytest.mark.parametrize("bad", [float("nan"), -0.1, float("inf")])
def test_learning_rates_must_be_finite_and_non_negative(bad: float) -> None:
    lrs = np.full(6, 0.1)
    lrs[2] = bad
    with pytest.raises(
        TrajectoryError,
        match=rf"learning rate of step 2 is {bad!r}; learning rates must be finite and >= 0",
    ):
        Trajectory(**_parts(learning_rates=lrs))


def test_learning_rates_as_a_tensor() -> None:
    lrs = torch.from_numpy(_cases.trajectory(CASE).learning_rates)
    assert Trajectory(**_parts(learning_rates=lrs)).learning_rates.dtype == np.float64


# --- batches -----------------------------------------------------------------------------------
def test_batch_indices_out_of_range() -> None:
    batches = _parts()["batches"]
    batches[4] = np.array([1, 8])
    with pytest.raises(
        TrajectoryError,
        match=r"batch of step 4 holds example indices from 1 to 8, outside \[0, 8\) for the 8 training examples\. Record indices into the trajectory's training set",
    ):
        Trajectory(**_parts(batches=batches))
    batches[4] = np.array([-1, 2])
    with pytest.raises(TrajectoryError, match=r"from -1 to 2, outside \[0, 8\)"):
        Trajectory(**_parts(batches=batches))


def test_wrong_number_of_batches() -> None:
    batches = _parts()["batches"][:-1]
    with pytest.raises(
        TrajectoryError,
        match=r"batches list has 5 entries, but the stages cover 6 steps; record the example indices of every step",
    ):
        Trajectory(**_parts(batches=batches))


def test_empty_batch() -> None:
    batches = _parts()["batches"]
    batches[1] = np.array([], dtype=np.int64)
    with pytest.raises(
        TrajectoryError,
        match=r"batch of step 1 is empty; record the indices of the examples each step trained on",
    ):
        Trajectory(**_parts(batches=batches))


def test_batch_indices_must_be_integers() -> None:
    batches = _parts()["batches"]
    batches[0] = np.array([0.0, 1.0])
    with pytest.raises(
        TrajectoryError,
        match=r"batch indices of step 0 must be a 1-d array of integer example indices; got an array of dtype float64",
    ):
        Trajectory(**_parts(batches=batches))


def test_batch_outside_its_stage() -> None:
    parts = _parts()
    (stage,) = parts["stages"]
    parts["stages"] = [Stage(stage.name, stage.optimizer, 0, 6, np.arange(7), 3)]
    parts["batches"] = [np.array([0, 1, 2])] * 6
    parts["batches"][3] = np.array([7, 2])
    with pytest.raises(
        TrajectoryError,
        match=r"batch of step 3 holds examples \[7\] that are not in the training set of stage 'train'\. Record each stage's examples",
    ):
        Trajectory(**parts)


def test_batches_are_optional() -> None:
    trajectory = Trajectory(**_parts(batches=None))
    assert not trajectory.has_batches
    assert trajectory.batches is None
    assert trajectory.fingerprint != _cases.trajectory(CASE).fingerprint


# --- stages ----------------------------------------------------------------------------------------
def _stage(start: int, end: int, examples: Any = None, name: str = "s") -> Stage:
    examples = np.arange(8) if examples is None else examples
    return Stage(name, OptimizerSpec("sgd", lr=0.1), start, end, np.asarray(examples), 3)


def test_no_stages() -> None:
    with pytest.raises(TrajectoryError, match="needs at least one stage; got none"):
        Trajectory(**_parts(stages=[]))


def test_stages_must_be_contiguous() -> None:
    with pytest.raises(
        TrajectoryError,
        match=r"Stage 'b' covers steps 4\.\.5; stages must be contiguous and non-empty, so it should start at step 3",
    ):
        Trajectory(**_parts(stages=[_stage(0, 3, name="a"), _stage(4, 6, name="b")]))


def test_stage_examples_out_of_range() -> None:
    with pytest.raises(
        TrajectoryError,
        match=r"Stage 's' names training examples from 0 to 8, outside \[0, 8\).*Use indices into the trajectory's training set",
    ):
        Trajectory(**_parts(stages=[_stage(0, 6, np.arange(9))]))


def test_stage_examples_listed_twice() -> None:
    with pytest.raises(
        TrajectoryError,
        match=r"Stage 's' lists some training examples twice; list each example of the stage once",
    ):
        Trajectory(**_parts(stages=[_stage(0, 6, [0, 1, 2, 3, 4, 5, 6, 7, 7])]))


def test_empty_stage() -> None:
    with pytest.raises(
        TrajectoryError,
        match=r"Stage 's' has an empty training set\. Give every stage at least one",
    ):
        Trajectory(**_parts(stages=[_stage(0, 6, np.array([], dtype=np.int64))]))


def test_stages_given_are_not_modified() -> None:
    examples = np.array([7, 0, 3, 1, 2, 6, 5, 4])
    stage = _stage(0, 6, examples)
    trajectory = Trajectory(**_parts(stages=[stage]))
    np.testing.assert_array_equal(stage.examples, [7, 0, 3, 1, 2, 6, 5, 4])
    np.testing.assert_array_equal(trajectory.stages[0].examples, np.arange(8))


def test_stage_of() -> None:
    t = _cases.trajectory("mlp_two_stage")
    pretrain, finetune = t.stages
    assert t.stage_of(0) is pretrain
    assert t.stage_of(pretrain.end - 1) is pretrain
    assert t.stage_of(pretrain.end) is finetune
    assert t.stage_of(t.n_steps) is finetune
    with pytest.raises(ValueError, match=r"Step 11 is outside \[0, 10\]"):
        t.stage_of(11)


# --- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 6])
def test_initial_and_final_states_are_required(step: int) -> None:
    checkpoints = _parts()["checkpoints"]
    del checkpoints[step]
    with pytest.raises(
        TrajectoryError,
        match=rf"no checkpoint at step {step}; the initial \(step 0\) and final \(step 6\) states must always be recorded",
    ):
        Trajectory(**_parts(checkpoints=checkpoints))


def test_checkpoint_steps_must_precede_the_final_step() -> None:
    with pytest.raises(
        TrajectoryError,
        match=r"checkpoint step 6 is outside \[0, 6\); attribution checkpoints stand for the steps that follow them",
    ):
        Trajectory(**_parts(checkpoint_steps=[0, 6]))


def test_checkpoint_steps_must_be_stored() -> None:
    with pytest.raises(
        TrajectoryError, match=r"checkpoint step 2 is listed but no checkpoint is stored for it"
    ):
        Trajectory(**_parts(checkpoint_steps=[2]))


def test_initial_checkpoint_that_does_not_fit_the_model() -> None:
    checkpoints = _parts()["checkpoints"]
    initial = checkpoints[0]
    checkpoints[0] = Checkpoint(0, {"weight": initial.params["weight"], "bias": torch.zeros(2)})
    with pytest.raises(
        TrajectoryError,
        match=r"checkpoint at step 0 does not fit the architecture \(wrong shapes bias: \(2,\) vs \(1,\)\).*pass the right architecture=",
    ):
        Trajectory(**_parts(checkpoints=checkpoints))
    checkpoints[0] = Checkpoint(0, {"weight": initial.params["weight"]})
    with pytest.raises(TrajectoryError, match=r"missing \['bias'\]"):
        Trajectory(**_parts(checkpoints=checkpoints))


def test_missing_checkpoint_lookup() -> None:
    t = _cases.trajectory(CASE)
    with pytest.raises(
        TrajectoryError,
        match=r"No checkpoint is stored at step 2; stored steps are \[0, 1, 3, 5, 6\]",
    ):
        t.checkpoint(2)


def test_build_model_is_the_callers() -> None:
    t = _cases.trajectory(CASE)
    model = t.build_model()
    final = t.checkpoint(t.n_steps).params
    assert torch.equal(model.weight.detach(), final["weight"])
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(t.build_model().weight.detach(), model.weight.detach())
    assert torch.equal(t.build_model(0).weight.detach(), t.checkpoint(0).params["weight"])


# --- functions and queries -----------------------------------------------------------------------------
def test_unknown_loss_names_the_choices() -> None:
    with pytest.raises(
        ValueError,
        match=r"'loss' parameter must be one of 'cross_entropy', 'mse_loss', 'squared_error', an importable 'module:function' string, or a callable.*got 'hinge'",
    ):
        Trajectory(**_parts(loss="hinge"))


def test_queries_of_the_wrong_shape() -> None:
    t = _cases.trajectory(CASE)
    wide = Examples(torch.zeros(2, 4), torch.zeros(2, 1))
    with pytest.raises(
        ValueError,
        match=r"query inputs have shape \(n, 4\) per example but the training inputs have \(n, 3\)\. Pass queries shaped like the training examples",
    ):
        t.check_queries(wide)
    flat_targets = Examples(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(
        ValueError,
        match=r"query targets have shape \(n, \) per example but the training targets have \(n, 1\)",
    ):
        t.check_queries(flat_targets)


def test_queries_as_a_tuple() -> None:
    t = _cases.trajectory(CASE)
    with pytest.raises(
        TypeError,
        match=r"Queries must be an Examples object; got tuple\. Wrap arrays as Examples\(inputs, targets\) \(a tuple would be counted as 2 samples\)",
    ):
        t.check_queries((torch.zeros(2, 3), torch.zeros(2, 1)))


def test_summary_and_repr() -> None:
    t = _cases.trajectory("mlp_two_stage")
    text = t.summary()
    assert "12 training examples, 10 steps, 2 stage(s)" in text
    assert "stage 'pretrain': steps 0..5, 8 examples, batch 4, sgd (momentum 0.5" in text
    assert "stage 'finetune': steps 6..9, 8 examples, batch 4, adam (betas (0.9, 0.999)" in text
    assert repr(t) == (
        "Trajectory(n_train=12, n_steps=10, stages=['pretrain', 'finetune'], "
        "checkpoint_steps=[1, 3, 5, 6, 8, 9])"
    )
