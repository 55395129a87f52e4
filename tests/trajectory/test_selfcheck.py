"""The recording self-check: a record that does not reproduce the loop is refused loudly.

Each row of the table of training-loop features that were once recorded silently gets
two tests: recorded the way sourcekit supports it, the run is reproduced to rounding by
a float64 replay; recorded the old way, recording fails with the self-check's error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sourcekit import Examples, TrajectoryRecorder
from sourcekit.exceptions import TrajectoryError
from sourcekit.objectives import CrossEntropy
from sourcekit.trajectory import _selfcheck
from sourcekit.trajectory._optimizer import OptimizerSpec, optimizer_step, update_magnitude
from sourcekit.trajectory._replay import replay
from sourcekit.trajectory._selfcheck import (
    GRADIENT_ROUNDING,
    UPDATE_OPERATIONS,
    VERIFY_EVERY,
    VERIFY_FIRST,
    verified,
)

from .. import _cases

EPS32 = float(np.finfo(np.float32).eps)
N = 24
BATCHES = [np.arange(s, s + 6) % N for s in range(0, 60, 6)]  # 10 steps
CLASSES = _cases.N_CLASSES


def _data(one_hot: bool = False) -> Examples:
    data = _cases.classification_data(N, seed=3)
    if one_hot:
        return Examples(data.inputs, F.one_hot(data.targets, CLASSES).float())
    return data


def _record(
    model: nn.Module,
    data: Examples,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    loss: Any = "cross_entropy",
    clip: Callable[[TrajectoryRecorder], None] | None = None,
    before_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batches: list[np.ndarray] = BATCHES,
) -> Any:
    recorder = TrajectoryRecorder(model, data, loss=loss, checkpoint_every=4)
    with recorder.stage(optimizer):
        for idx in batches:
            optimizer.zero_grad()
            inputs = data.inputs[idx]
            if before_forward is not None:
                inputs = before_forward(inputs)
            batch_loss(model(inputs), data.targets[idx]).backward()
            if clip is not None:
                clip(recorder)
            optimizer.step()
            recorder.step(idx)
    return recorder.finish()


def _assert_reproduced(trajectory: Any, model: nn.Module) -> None:
    """A float64 replay lands on the trained model, to the rounding of a float32 run.

    As in tests/trajectory/test_replay.py: each of the T float32 updates of these short,
    smooth (tanh) runs commits a handful of roundings relative to the parameter scale,
    which the replay, exact up to 1e-16, does not; 8 T eps32 scale bounds their sum.
    """
    replayed, _ = replay(trajectory)
    final = {n: p.detach() for n, p in model.named_parameters()}
    scale = max(1.0, max(float(v.abs().max()) for v in final.values()))
    tolerance = 8 * trajectory.n_steps * EPS32 * scale
    for name, value in final.items():
        error = float((replayed[name].detach() - value.double()).abs().max())
        assert error <= tolerance, (name, error, tolerance)


def _mlp(make: Callable[[], nn.Module] = _cases.make_tanh_mlp) -> nn.Module:
    torch.manual_seed(0)
    return make()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.3)


def ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


# --- row 1: a frozen layer, optimiser over model.parameters() --------------------------------
def test_a_frozen_layer_is_recorded_and_reproduced() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    initial = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    trajectory = _record(model, _data(), _sgd(model), ce)
    _assert_reproduced(trajectory, model)
    assert trajectory.trained_parameters == ("2.weight", "2.bias")
    (group,) = trajectory.stages[0].groups
    assert group.parameters == ("2.weight", "2.bias")
    replayed, _ = replay(trajectory)
    for name, value in initial.items():  # frozen in the run, fixed in the replay
        assert torch.equal(replayed[f"0.{name}"].detach().float(), value)


def test_freezing_a_layer_inside_a_stage_is_refused() -> None:
    model, data = _mlp(), _data()
    optimizer = _sgd(model)

    def batch_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if len(recorder_steps) == 2:
            model[0].weight.requires_grad_(False)
        return ce(outputs, targets)

    recorder_steps: list[int] = []
    recorder = TrajectoryRecorder(model, data, checkpoint_every=4)
    with pytest.raises(
        TrajectoryError,
        match=r"parameters the optimizer trains changed during stage 'stage0'.*open a new one",
    ):
        with recorder.stage(optimizer):
            for idx in BATCHES:
                optimizer.zero_grad()
                batch_loss(model(data.inputs[idx]), data.targets[idx]).backward()
                optimizer.step()
                recorder.step(idx)
                recorder_steps.append(1)


# --- row 2: nn.Dropout in train mode -----------------------------------------------------------
def test_dropout_is_recorded_and_replayed_with_the_same_masks() -> None:
    model = _mlp(_cases.make_dropout_mlp)
    trajectory = _record(model, _data(), _sgd(model), ce)
    assert trajectory.random_states is not None
    assert trajectory.random_states.steps.tolist() == list(range(len(BATCHES)))
    _assert_reproduced(trajectory, model)


def test_dropout_replay_depends_on_the_recorded_states() -> None:
    # The check above can fail: without the generator states the masks differ.
    model = _mlp(_cases.make_dropout_mlp)
    trajectory = _record(model, _data(), _sgd(model), ce)
    blind = _cases.rebuild(trajectory, random_states=None)
    replayed, _ = replay(blind)
    assert (
        float((replayed["0.weight"].detach() - model[0].weight.detach().double()).abs().max())
        > 1e-3
    )


def test_randomness_outside_the_model_is_refused() -> None:
    model = _mlp()
    with pytest.raises(
        TrajectoryError,
        match=r"(?s)at step 0 of stage 'stage0', the gradient of the recorded loss on the recorded "
        r"batch differs.*inputs the recorder did not see: data augmentation",
    ):
        _record(model, _data(), _sgd(model), ce, before_forward=lambda x: F.dropout(x, 0.3))


# --- row 3: clip_grad_norm_(..., 0.1) -------------------------------------------------------
def test_clipping_through_the_recorder_is_recorded_and_reproduced() -> None:
    model = _mlp()
    trajectory = _record(
        model, _data(), _sgd(model), ce, clip=lambda recorder: recorder.clip_grad_norm_(0.1)
    )
    assert trajectory.clipping is not None
    assert np.all(trajectory.clipping.coefficient < 1)  # 0.1 clips every step here
    assert np.all(trajectory.clipping.max_norm == 0.1)
    _assert_reproduced(trajectory, model)


def test_clipping_with_torch_is_refused_at_the_first_step() -> None:
    model = _mlp()
    with pytest.raises(
        TrajectoryError,
        match=r"gradients of \['0\.weight', '0\.bias', '2\.weight'\] changed between backward\(\) "
        r"and optimizer\.step\(\) at step 0.*"
        r"recorder\.clip_grad_norm_\(max_norm\)",
    ):
        _record(
            model,
            _data(),
            _sgd(model),
            ce,
            clip=lambda _: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1),
        )


# --- row 4: cross_entropy(label_smoothing=0.2) ------------------------------------------------
def smoothed(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, label_smoothing=0.2)


@pytest.mark.parametrize(
    "loss", [CrossEntropy(label_smoothing=0.2), nn.CrossEntropyLoss(label_smoothing=0.2)]
)
def test_label_smoothing_is_recorded_and_reproduced(loss: Any) -> None:
    model = _mlp()
    trajectory = _record(model, _data(), _sgd(model), smoothed, loss=loss)
    assert trajectory.loss == CrossEntropy(label_smoothing=0.2)
    _assert_reproduced(trajectory, model)


def test_label_smoothing_recorded_as_the_plain_loss_is_refused() -> None:
    model = _mlp()
    with pytest.raises(
        TrajectoryError,
        match=r"(?s)at step 0 of stage 'stage0', the gradient of the recorded loss.*"
        r"loss='cross_entropy'.*CrossEntropy\(label_smoothing=\.\.\.",
    ):
        _record(model, _data(), _sgd(model), smoothed, loss="cross_entropy")


# --- row 5: F.mse_loss ------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["mse_loss", nn.MSELoss()])
def test_mse_loss_is_recorded_and_reproduced(loss: Any) -> None:
    model = _mlp()
    trajectory = _record(model, _data(one_hot=True), _sgd(model), F.mse_loss, loss=loss)
    _assert_reproduced(trajectory, model)


def test_mse_loss_recorded_as_half_the_squared_error_is_refused() -> None:
    model = _mlp()
    with pytest.raises(
        TrajectoryError,
        match=r"(?s)gradient of the recorded loss.*loss='squared_error'.*F\.mse_loss is loss='mse_loss'",
    ):
        _record(model, _data(one_hot=True), _sgd(model), F.mse_loss, loss="squared_error")


# --- the checks themselves ----------------------------------------------------------------------
def test_verified_steps() -> None:
    assert VERIFY_FIRST == 4 and VERIFY_EVERY == 50
    assert [k for k in range(105) if verified(k)] == [0, 1, 2, 3, 50, 100]


def test_a_mismatch_after_the_first_steps_is_caught_at_a_later_checked_step() -> None:
    # Label smoothing switched on at the stage's step 10 (not checked): the check at step
    # 50 catches it.
    model, data = _mlp(), _data()
    batches = [np.arange(s, s + 6) % N for s in range(0, 6 * 55, 6)]
    optimizer = _sgd(model)
    recorder = TrajectoryRecorder(model, data, checkpoint_every=4)
    with pytest.raises(TrajectoryError, match=r"at step 50 of stage 'stage0'"):
        with recorder.stage(optimizer):
            for k, idx in enumerate(batches):
                optimizer.zero_grad()
                loss = smoothed if k >= 10 else ce
                loss(model(data.inputs[idx]), data.targets[idx]).backward()
                optimizer.step()
                recorder.step(idx)


def test_verify_false_records_a_mismatched_loop() -> None:
    model, data = _mlp(), _data()
    optimizer = _sgd(model)
    recorder = TrajectoryRecorder(model, data, checkpoint_every=4, verify=False)
    with recorder.stage(optimizer):
        for idx in BATCHES:
            optimizer.zero_grad()
            smoothed(model(data.inputs[idx]), data.targets[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            recorder.step(idx)
    assert recorder.finish().n_steps == len(BATCHES)


@pytest.mark.parametrize("through_data", [False, True])
def test_parameters_changed_between_steps_are_refused(through_data: bool) -> None:
    # In place under no_grad (seen at every step: the version counter moves), or through
    # .data (which keeps the version: seen by the norms compared before a checked step).
    model, data = _mlp(), _data()
    optimizer = _sgd(model)
    recorder = TrajectoryRecorder(model, data, checkpoint_every=4)
    with pytest.raises(
        TrajectoryError, match=r"parameters changed between optimizer steps \(before step 2\)"
    ):
        with recorder.stage(optimizer):
            for k, idx in enumerate(BATCHES):
                optimizer.zero_grad()
                ce(model(data.inputs[idx]), data.targets[idx]).backward()
                optimizer.step()
                recorder.step(idx)
                if k == 1 and through_data:
                    model[0].weight.data.clamp_(-0.1, 0.1)  # weight clipping outside the optimizer
                elif k == 1:
                    with torch.no_grad():
                        model[0].weight.clamp_(-0.1, 0.1)


def test_an_update_the_optimizer_does_not_describe_is_refused() -> None:
    # A hook that changes the parameters during optimizer.step() (after the recorder's
    # pre-hook): the update check sees the step land elsewhere.
    model, data = _mlp(), _data()
    optimizer = _sgd(model)

    def nudge(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            model[2].bias.add_(1e-3)

    optimizer.register_step_post_hook(nudge)
    with pytest.raises(
        TrajectoryError,
        match=r"at step 0 of stage 'stage0', the optimizer moved '2\.bias' differently from the "
        r"recorded update rule",
    ):
        _record(model, data, optimizer, ce)


def test_the_update_bound_holds_for_torch_optimizers() -> None:
    # The update check's bound, 10 u M, against torch.optim's own float32 updates of a
    # momentum, Nesterov, Adam and AdamW step from a state with history (cancellations
    # between the momentum and the new gradient included): measured well inside it.
    torch.manual_seed(0)
    u = EPS32 / 2
    for make in (
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ):
        theta = torch.nn.Parameter(torch.randn(200))
        optimizer = make([theta])
        spec = OptimizerSpec.from_torch(optimizer)
        worst = 0.0
        for _ in range(6):
            before = theta.detach().clone().double()
            state = optimizer.state.get(theta, {})
            buffers = {}
            if "momentum_buffer" in state:
                buffers["t"] = state["momentum_buffer"].double()
            if "exp_avg" in state:
                buffers["t"] = (state["exp_avg"].double(), state["exp_avg_sq"].double())
            history = {"step": int(state.get("step", 0)), "buffers": buffers}
            theta.grad = torch.randn(200)
            grads = {"t": theta.grad.double()}
            optimizer.step()
            exact, _ = optimizer_step(spec, {"t": before}, grads, history, spec.lr)
            magnitude = update_magnitude(spec, {"t": before}, grads, history, spec.lr)["t"]
            bound = u * (magnitude + (theta.detach().double() - before).abs())
            worst = max(worst, float(((exact["t"] - theta.detach().double()).abs() / bound).max()))
        assert worst <= UPDATE_OPERATIONS / 2, (spec.kind, worst)


def test_the_gradient_check_is_exact_for_a_faithful_loop_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The replayed gradient runs the same kernels on the same inputs: on the CPU a faithful
    # loop passes with no allowance at all for rounding (the 2**10 u of GRADIENT_ROUNDING
    # is for the loop's own batch reduction and for GPU kernels that add in varying order).
    assert GRADIENT_ROUNDING == 2.0**10
    monkeypatch.setattr(_selfcheck, "GRADIENT_ROUNDING", 0.0)
    for make in (_cases.make_tanh_mlp, _cases.make_dropout_mlp, _cases.make_batchnorm_mlp):
        model = _mlp(make)
        trajectory = _record(model, _data(), _sgd(model), ce)
        assert trajectory.n_steps == len(BATCHES)
