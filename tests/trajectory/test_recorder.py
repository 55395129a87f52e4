"""``TrajectoryRecorder``: recording a user's own loop, one call per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sourcekit import Examples, OptimizerSpec, TrajectoryRecorder
from sourcekit.exceptions import TrajectoryError
from sourcekit.gradients import cross_entropy
from sourcekit.trajectory._replay import replay

from .. import _cases

N = 12
BATCHES = [np.arange(s, s + 4) % N for s in range(0, 24, 4)]  # 6 steps, 2 epochs


def _data() -> Examples:
    return _cases.classification_data(N, seed=0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _cases.make_tanh_mlp()


def _update(model: nn.Module, optimizer: torch.optim.Optimizer, data: Examples, idx: Any) -> None:
    optimizer.zero_grad()
    batch = torch.as_tensor(idx)
    cross_entropy(model(data.inputs[batch]), data.targets[batch]).mean().backward()
    optimizer.step()


def _run(
    recorder: TrajectoryRecorder,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Examples,
    batches: list[np.ndarray] = BATCHES,
    after_step: Callable[[], None] | None = None,
    **stage: Any,
) -> None:
    with recorder.stage(optimizer, **stage):
        for idx in batches:
            _update(model, optimizer, data, idx)
            recorder.step(idx)
            if after_step is not None:
                after_step()


def _recorder(model: nn.Module, data: Examples, **kwargs: Any) -> TrajectoryRecorder:
    kwargs.setdefault("checkpoint_every", 2)
    return TrajectoryRecorder(model, data, architecture="tests._cases:make_tanh_mlp", **kwargs)


# --- what is recorded ----------------------------------------------------------------------
def test_one_call_per_step_records_everything() -> None:
    data, model = _data(), _model()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder = _recorder(model, data, checkpoint_every=2)
    seen = {}

    def remember() -> None:
        seen[recorder.n_steps] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    _run(recorder, model, optimizer, data, after_step=remember, name="only")
    trajectory = recorder.finish()
    assert trajectory.n_steps == len(BATCHES) == 6
    assert trajectory.checkpoint_steps == (0, 2, 4)
    assert trajectory.stored_steps == (0, 2, 4, 6)
    for recorded, given in zip(trajectory.batches, BATCHES, strict=True):
        np.testing.assert_array_equal(recorded, given)
    np.testing.assert_array_equal(trajectory.learning_rates, np.full(6, 0.1))
    (stage,) = trajectory.stages
    assert (stage.name, stage.start, stage.end, stage.batch_size) == ("only", 0, 6, 4)
    assert stage.optimizer == OptimizerSpec("sgd", lr=0.1, momentum=0.9)
    assert stage.recipe is None
    for name, value in initial.items():
        assert torch.equal(trajectory.checkpoint(0).params[name], value)
    for step in (2, 4, 6):
        for name, value in seen[step].items():
            assert torch.equal(trajectory.checkpoint(step).params[name], value)


def test_adam_state_is_recorded() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    recorder = _recorder(model, data)
    held = {}

    def remember() -> None:
        if recorder.n_steps == 4:
            for name, p in model.named_parameters():
                held[name] = optimizer.state[p]["exp_avg_sq"].clone()

    _run(recorder, model, optimizer, data, after_step=remember)
    state = recorder.finish().checkpoint(4).optimizer
    assert state["step"] == 4
    assert state["exp_avg_sq"].keys() == held.keys() == dict(model.named_parameters()).keys()
    for name, value in held.items():
        assert torch.equal(state["exp_avg_sq"][name], value)


def test_momentum_state_is_recorded() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder = _recorder(model, data)
    held = {}

    def remember() -> None:
        if recorder.n_steps == 2:
            for name, p in model.named_parameters():
                held[name] = optimizer.state[p]["momentum_buffer"].clone()

    _run(recorder, model, optimizer, data, after_step=remember)
    state = recorder.finish().checkpoint(2).optimizer
    assert state["momentum_buffer"].keys() == held.keys() == dict(model.named_parameters()).keys()
    for name, value in held.items():
        assert torch.equal(state["momentum_buffer"][name], value)


def test_recording_does_not_change_the_run() -> None:
    data = _data()
    plain, recorded = _model(), _model()
    opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
    opt_recorded = torch.optim.Adam(recorded.parameters(), lr=0.01)
    for idx in BATCHES:
        _update(plain, opt_plain, data, idx)
    recorder = _recorder(recorded, data)
    _run(recorder, recorded, opt_recorded, data)
    for (name, a), b in zip(
        plain.state_dict().items(), recorded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # The recorder's hook is gone once the stage is closed.
    assert not opt_recorded._optimizer_step_pre_hooks
    trajectory = recorder.finish()
    assert torch.equal(trajectory.checkpoint(6).params["0.weight"], recorded[0].weight.detach())


def test_learning_rates_follow_a_torch_scheduler() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    used = []
    recorder = _recorder(model, data)
    with recorder.stage(optimizer):
        for idx in BATCHES:
            used.append(scheduler.get_last_lr()[0])
            _update(model, optimizer, data, idx)
            recorder.step(idx)
            scheduler.step()
    trajectory = recorder.finish()
    assert trajectory.learning_rates.tolist() == used == [0.2, 0.2, 0.1, 0.1, 0.05, 0.05]
    assert trajectory.stages[0].optimizer.lr == 0.2


def test_warm_up_from_zero() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, k / 3))
    recorder = _recorder(model, data)
    _run(recorder, model, optimizer, data, after_step=scheduler.step)
    trajectory = recorder.finish()
    expected = [0.01 * min(1.0, k / 3) for k in range(6)]
    np.testing.assert_array_equal(trajectory.learning_rates, expected)  # the values torch used
    assert trajectory.stages[0].optimizer.lr == 0.01  # the scheduler's base learning rate
    final = replay(trajectory)[0]
    # float64 replay of 6 float32 updates: a few float32 roundings per step (justified in
    # tests/trajectory/test_replay.py).
    for name, value in final.items():
        np.testing.assert_allclose(
            value.detach().float(), model.state_dict()[name], rtol=0, atol=1e-6
        )


def test_two_stages_of_a_user_loop() -> None:
    data, model = _data(), _model()
    recorder = _recorder(model, data, checkpoint_every=None, checkpoint_steps=[1, 5])
    first = [np.array([0, 1, 2]), np.array([3, 4, 5])] * 2
    second = [np.array([6, 7, 8, 9]), np.array([10, 11, 6, 7])]
    _run(
        recorder,
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        data,
        first,
        examples=np.arange(6),
        name="pretrain",
    )
    _run(
        recorder,
        model,
        torch.optim.AdamW(model.parameters(), lr=0.01),
        data,
        second,
        examples=np.arange(6, 12),
        batch_size=4,
        name="finetune",
    )
    trajectory = recorder.finish()
    pretrain, finetune = trajectory.stages
    assert (pretrain.start, pretrain.end, pretrain.batch_size) == (0, 4, 3)
    assert (finetune.start, finetune.end, finetune.optimizer.kind) == (4, 6, "adamw")
    assert trajectory.checkpoint_steps == (1, 5)
    assert trajectory.stored_steps == (0, 1, 5, 6)
    np.testing.assert_array_equal(pretrain.examples, np.arange(6))
    np.testing.assert_array_equal(finetune.examples, np.arange(6, 12))


def test_train_mode_is_recorded() -> None:
    data, model = _data(), _model()
    model.eval()
    recorder = _recorder(model, data)
    _run(recorder, model, torch.optim.SGD(model.parameters(), lr=0.1), data)
    assert recorder.finish().train_mode is False


def test_a_failing_loop_leaves_no_hook() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = _recorder(model, data)
    with pytest.raises(KeyError), recorder.stage(optimizer):
        raise KeyError("user error")
    assert not optimizer._optimizer_step_pre_hooks


# --- misuse --------------------------------------------------------------------------------
def test_step_without_an_optimizer_step() -> None:
    data, model = _data(), _model()
    recorder = _recorder(model, data)
    with (
        pytest.raises(
            TrajectoryError,
            match=r"recorder\.step\(\) was called without a preceding optimizer\.step\(\); call it once right after each optimizer step",
        ),
        recorder.stage(torch.optim.SGD(model.parameters(), lr=0.1)),
    ):
        recorder.step(BATCHES[0])


def test_two_optimizer_steps_without_a_recorder_step() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = _recorder(model, data)
    with recorder.stage(optimizer):
        _update(model, optimizer, data, BATCHES[0])
        with pytest.raises(
            TrajectoryError,
            match=r"optimizer\.step\(\) was called twice without recorder\.step\(indices\) in between; call recorder\.step once after every optimizer step",
        ):
            _update(model, optimizer, data, BATCHES[1])
        recorder.step(BATCHES[0])


def test_last_optimizer_step_not_recorded() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = _recorder(model, data)
    with pytest.raises(
        TrajectoryError,
        match=r"last optimizer step of the stage was not followed by recorder\.step\(indices\)",
    ):
        with recorder.stage(optimizer):
            _update(model, optimizer, data, BATCHES[0])


def test_optimizer_that_already_took_steps() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _update(model, optimizer, data, BATCHES[0])
    recorder = _recorder(model, data)
    with pytest.raises(
        TrajectoryError,
        match=r"optimizer already holds state \(it has taken steps\).*create a new one for each stage",
    ):
        with recorder.stage(optimizer):
            pass


def test_an_optimizer_over_a_subset_trains_only_it() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    recorder = _recorder(model, data)
    _run(recorder, model, optimizer, data)
    trajectory = recorder.finish()
    assert trajectory.trained_parameters == ("2.weight", "2.bias")
    (group,) = trajectory.stages[0].groups
    assert group.parameters == ("2.weight", "2.bias")
    replayed, _ = replay(trajectory)
    assert torch.equal(
        replayed["0.weight"].detach().float(), trajectory.checkpoint(0).params["0.weight"]
    )
    # float64 replay of 6 float32 steps (tests/trajectory/test_replay.py).
    np.testing.assert_allclose(
        replayed["2.weight"].detach().float(), model[2].weight.detach(), rtol=0, atol=1e-6
    )


def test_parameter_groups_with_their_own_settings() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
            {"params": model[2].parameters(), "lr": 0.2},
        ]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda k: 1.0, lambda k: 0.5**k])
    recorder = _recorder(model, data)
    _run(recorder, model, optimizer, data, after_step=scheduler.step)
    trajectory = recorder.finish()
    body, head = trajectory.stages[0].groups
    assert body.parameters == ("0.weight", "0.bias")
    assert (body.optimizer.momentum, body.optimizer.weight_decay) == (0.9, 1e-2)
    assert head.optimizer.momentum == 0.0
    np.testing.assert_array_equal(body.schedule["lr"], np.full(6, 0.1))
    np.testing.assert_allclose(head.schedule["lr"], 0.2 * 0.5 ** np.arange(6))
    np.testing.assert_array_equal(
        trajectory.learning_rates, body.schedule["lr"]
    )  # the first group's
    replayed, _ = replay(trajectory)
    for name, value in model.named_parameters():
        np.testing.assert_allclose(
            replayed[name].detach().float(), value.detach(), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_one_cycle_with_its_defaults_records_momentum_at_every_step(kind: str) -> None:
    data, model = _data(), _model()
    optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "sgd"
        else torch.optim.Adam(model.parameters(), lr=0.01)
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=6)
    recorder = _recorder(model, data)
    _run(recorder, model, optimizer, data, after_step=scheduler.step)
    trajectory = recorder.finish()
    (group,) = trajectory.stages[0].groups
    changing = "momentum" if kind == "sgd" else "beta1"
    assert set(group.schedule) == {"lr", changing}
    assert len(set(group.schedule[changing].tolist())) > 1  # cycled
    replayed, _ = replay(trajectory)
    for name, value in model.named_parameters():
        np.testing.assert_allclose(
            replayed[name].detach().float(), value.detach(), rtol=0, atol=1e-6
        )


def test_a_plain_run_keeps_the_plain_form() -> None:
    data, model = _data(), _model()
    recorder = _recorder(model, data)
    _run(recorder, model, torch.optim.SGD(model.parameters(), lr=0.1), data)
    trajectory = recorder.finish()
    assert trajectory.stages[0].groups is None
    assert trajectory.clipping is None and trajectory.random_states is None


def test_an_optimizer_over_tensors_outside_the_model() -> None:
    data, model = _data(), _model()
    extra = torch.nn.Parameter(torch.zeros(3))
    recorder = _recorder(model, data)
    with pytest.raises(
        TrajectoryError,
        match=r"trains 1 tensor\(s\) that are not parameters of the model \(shapes \[\(3,\)\]\)",
    ):
        with recorder.stage(torch.optim.SGD([*model.parameters(), extra], lr=0.1)):
            pass


def test_a_trained_parameter_without_a_gradient() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = _recorder(model, data)
    with pytest.raises(TrajectoryError, match="recorded no steps"), recorder.stage(optimizer):
        optimizer.zero_grad()
        batch = torch.as_tensor(BATCHES[0])
        model[2](
            torch.tanh(data.inputs[batch] @ torch.ones(3, 5))
        ).sum().backward()  # layer 0 unused
        with pytest.raises(
            TrajectoryError,
            match=r"parameters \['0\.weight', '0\.bias'\] have no gradient at step 0.*optimizer skips them",
        ):
            optimizer.step()


def test_several_random_forward_passes_in_one_step() -> None:
    data = _data()
    torch.manual_seed(0)
    model = _cases.make_dropout_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = TrajectoryRecorder(model, data, checkpoint_every=2)
    with pytest.raises(TrajectoryError, match="recorded no steps"), recorder.stage(optimizer):
        optimizer.zero_grad()
        for half in np.array_split(BATCHES[0], 2):  # gradient accumulation with dropout
            batch = torch.as_tensor(half)
            (0.5 * cross_entropy(model(data.inputs[batch]), data.targets[batch]).mean()).backward()
        with pytest.raises(
            TrajectoryError,
            match=r"drew random numbers 2 times during step 0.*one forward pass per step",
        ):
            optimizer.step()


def test_clip_grad_norm_misuse() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = _recorder(model, data)
    with pytest.raises(TrajectoryError, match=r"clip_grad_norm_\(\) was called outside a stage"):
        recorder.clip_grad_norm_(1.0)
    with recorder.stage(optimizer):
        optimizer.zero_grad()
        batch = torch.as_tensor(BATCHES[0])
        cross_entropy(model(data.inputs[batch]), data.targets[batch]).mean().backward()
        with pytest.raises(
            ValueError,
            match=r"'max_norm' parameter of clip_grad_norm_ must be a float > 0; got -1",
        ):
            recorder.clip_grad_norm_(-1)
        norm = recorder.clip_grad_norm_(0.5)
        want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert float(norm) > 0.5 and float(want) <= 0.5 + 1e-6  # the norm before, clipped to 0.5
        with pytest.raises(
            TrajectoryError, match=r"called twice before step 0; clip once per step"
        ):
            recorder.clip_grad_norm_(0.5)
        optimizer.step()
        with pytest.raises(TrajectoryError, match=r"called after optimizer\.step\(\)"):
            recorder.clip_grad_norm_(0.5)
        recorder.step(BATCHES[0])
    trajectory = recorder.finish()
    assert trajectory.clipping.max_norm.tolist() == [0.5]
    assert 0 < trajectory.clipping.coefficient[0] < 1


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda p: torch.optim.RMSprop(p),
            r"optimizer is a RMSprop; sourcekit records torch\.optim\.SGD, Adam and AdamW\. Train with one of those",
        ),
        (
            lambda p: torch.optim.Adam(p, amsgrad=True),
            r"uses amsgrad=True, which sourcekit cannot replay\. Train with Adam\(amsgrad=False\)",
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, maximize=True),
            r"uses maximize=True.*Train with SGD\(maximize=False\)",
        ),
    ],
)
def test_optimizers_replay_cannot_follow(make: Callable, match: str) -> None:
    data, model = _data(), _model()
    recorder = _recorder(model, data)
    with pytest.raises(TrajectoryError, match=match):
        with recorder.stage(make(model.parameters())):
            pass


def test_batch_indices_out_of_range() -> None:
    data, model = _data(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = _recorder(model, data)
    with recorder.stage(optimizer):
        _update(model, optimizer, data, BATCHES[0])
        with pytest.raises(
            TrajectoryError,
            match=r"batch indices of step 0 must be non-empty and lie in \[0, 12\); got 2 indices from 11 to 12",
        ):
            recorder.step(np.array([11, 12]))
        with pytest.raises(
            TrajectoryError, match=r"must be non-empty and lie in \[0, 12\); got 0 indices\."
        ):
            recorder.step(np.array([], dtype=np.int64))
        recorder.step(BATCHES[0])


def test_step_outside_a_stage() -> None:
    recorder = _recorder(_model(), _data())
    with pytest.raises(
        TrajectoryError,
        match=r"called outside a stage; wrap the loop in `with recorder\.stage\(optimizer\):`",
    ):
        recorder.step(BATCHES[0])


def test_nested_stages() -> None:
    data, model = _data(), _model()
    recorder = _recorder(model, data)
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrajectoryError, match="recorded no steps"), recorder.stage(outer):
        with pytest.raises(
            TrajectoryError, match="A stage is already open; stages cannot be nested"
        ):
            with recorder.stage(torch.optim.SGD(model.parameters(), lr=0.1)):
                pass


def test_stage_without_steps() -> None:
    data, model = _data(), _model()
    recorder = _recorder(model, data)
    with pytest.raises(
        TrajectoryError,
        match=r"Stage 'warmup' recorded no steps; call recorder\.step\(indices\) after every optimizer step",
    ):
        with recorder.stage(torch.optim.SGD(model.parameters(), lr=0.1), name="warmup"):
            pass


def test_finish_misuse() -> None:
    data, model = _data(), _model()
    recorder = _recorder(model, data)
    with pytest.raises(
        TrajectoryError, match="Nothing was recorded: open a stage and record at least one step"
    ):
        recorder.finish()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with recorder.stage(optimizer):
        with pytest.raises(
            TrajectoryError,
            match=r"Close the open stage \(leave its `with` block\) before finish\(\)",
        ):
            recorder.finish()
        _update(model, optimizer, data, BATCHES[0])
        recorder.step(BATCHES[0])
    recorder.finish()
    with pytest.raises(
        TrajectoryError, match="This recorder has finished; create a new TrajectoryRecorder"
    ):
        with recorder.stage(torch.optim.SGD(model.parameters(), lr=0.1)):
            pass


def test_checkpoint_requested_beyond_the_run() -> None:
    data, model = _data(), _model()
    recorder = _recorder(model, data, checkpoint_every=None, checkpoint_steps=[2, 9])
    _run(recorder, model, torch.optim.SGD(model.parameters(), lr=0.1), data)
    with pytest.raises(
        TrajectoryError,
        match=r"Checkpoint step 9 was requested but the run has only 6 steps; request steps in \[0, 6\)",
    ):
        recorder.finish()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"checkpoint_every": None},
            ValueError,
            r"needs to know where to keep checkpoints: pass checkpoint_every=k or checkpoint_steps=\[\.\.\.\]",
        ),
        (
            {"checkpoint_every": 0},
            ValueError,
            r"'checkpoint_every' parameter must be an int >= 1; got 0",
        ),
        (
            {"checkpoint_every": True},
            ValueError,
            r"'checkpoint_every' parameter must be an int >= 1; got True",
        ),
        (
            {"checkpoint_every": None, "checkpoint_steps": [-1, 2]},
            ValueError,
            r"Checkpoint steps must be >= 0; got -1",
        ),
    ],
)
def test_bad_checkpoint_settings(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _recorder(_model(), _data(), **kwargs)


def test_bad_model_and_training_set() -> None:
    with pytest.raises(TypeError, match=r"'model' must be an nn\.Module; got function"):
        TrajectoryRecorder(_cases.make_tanh_mlp, _data(), checkpoint_every=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'train' argument must be an Examples object; got tuple"):
        TrajectoryRecorder(_model(), (torch.zeros(2, 3), torch.zeros(2)), checkpoint_every=1)  # type: ignore[arg-type]
    with pytest.raises(
        TrajectoryError,
        match=r"training set is empty \(0 examples\)\. Pass the examples the model trains on",
    ):
        TrajectoryRecorder(
            _model(), Examples(torch.zeros(0, 3), torch.zeros(0)), checkpoint_every=1
        )
