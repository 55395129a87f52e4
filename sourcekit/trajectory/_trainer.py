"""The built-in trainer: a minibatch loop that records itself.

``train`` runs one or more :class:`TrainingStage` recipes (shuffled epochs, a learning
rate schedule, an optimiser) and records them through :class:`TrajectoryRecorder`, so a
trajectory from the built-in trainer holds exactly what a user's recorded loop holds,
plus the recipe needed to retrain the run on a subset of its data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._device import resolve_device
from ..objectives import LOSSES, check_class_targets, resolve_function
from ._architecture import Architecture
from ._examples import Examples, check_training_set
from ._optimizer import OptimizerSpec
from ._recorder import TrajectoryRecorder
from ._trajectory import Trajectory

__all__ = ["TrainingStage", "learning_rate_schedule", "train"]

_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainingStage:
    """The recipe of one stage for :func:`train`.

    Parameters
    ----------
    optimizer : OptimizerSpec
        The optimiser and its base learning rate.
    epochs : int, default=10
        Passes over the stage's examples (shuffled each epoch; the last batch of an
        epoch may be smaller).
    batch_size : int, default=64
        Examples per step.
    name : str, default="train"
        The stage's name in the trajectory.
    examples : array-like of int, optional
        Indices of the training examples of this stage (default: all).
    schedule : {"constant", "linear", "cosine"}, default="constant"
        Learning rate over the stage's full length: constant, linear decay to 0, or
        cosine decay to 0.
    max_steps : int, optional
        Stop after this many steps although the schedule is laid out for all epochs
        (a run stopped early, far from convergence).
    stop_fraction : float, optional
        Stop after this fraction of the scheduled steps (rounded down, at least one).
        Unlike ``max_steps`` it scales with the data, so a retraining on a subset stops
        at the same point of its schedule. With both, the earlier stop wins.
    n_checkpoints : int, default=6
        Checkpoints kept for attribution, at the midpoints of equal step intervals.

    Examples
    --------
    The digits task's ``"early"`` recipe: 32 epochs scheduled, stopped after a quarter.

    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> sgd = OptimizerSpec("sgd", lr=0.01, momentum=0.9, weight_decay=1e-3)
    >>> stage = TrainingStage(sgd, epochs=32, batch_size=64, stop_fraction=0.25)
    >>> stage.n_checkpoints, stage.schedule
    (6, 'constant')

    On 128 examples (2 steps per epoch, 64 scheduled) the stage stops after 16 steps,
    with its 6 checkpoints at the midpoints of equal intervals:

    >>> data = Examples(torch.randn(128, 3), torch.randint(0, 2, (128,)))
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> trajectory.n_steps, trajectory.checkpoint_steps
    (16, (1, 4, 6, 9, 12, 14))
    """

    optimizer: OptimizerSpec
    epochs: int = 10
    batch_size: int = 64
    name: str = "train"
    examples: Any = field(default=None, compare=False, repr=False)
    schedule: str = "constant"
    max_steps: int | None = None
    stop_fraction: float | None = None
    n_checkpoints: int = 6

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "n_checkpoints"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, np.integer))
                or value < (0 if name == "n_checkpoints" else 1)
            ):
                raise ValueError(
                    f"The {name!r} parameter of TrainingStage must be an int >= "
                    f"{0 if name == 'n_checkpoints' else 1}; got {value!r}."
                )
        if self.schedule not in _SCHEDULES:
            raise ValueError(
                f"The 'schedule' parameter of TrainingStage must be one of {_SCHEDULES}; got {self.schedule!r}."
            )
        if self.max_steps is not None and (
            not isinstance(self.max_steps, (int, np.integer)) or self.max_steps < 1
        ):
            raise ValueError(
                f"The 'max_steps' parameter of TrainingStage must be an int >= 1 or None; got {self.max_steps!r}."
            )
        if self.stop_fraction is not None and not (
            isinstance(self.stop_fraction, (int, float)) and 0 < self.stop_fraction <= 1
        ):
            raise ValueError(
                "The 'stop_fraction' parameter of TrainingStage must be a float in (0, 1] or "
                f"None; got {self.stop_fraction!r}."
            )
        if not isinstance(self.optimizer, OptimizerSpec):
            raise TypeError(
                f"The 'optimizer' of TrainingStage must be an OptimizerSpec; got {type(self.optimizer).__name__}."
            )

    def recipe(self, seed: int) -> dict[str, Any]:
        """The JSON description stored with the recorded stage."""
        return {
            "epochs": int(self.epochs),
            "batch_size": int(self.batch_size),
            "schedule": self.schedule,
            "max_steps": None if self.max_steps is None else int(self.max_steps),
            "stop_fraction": None if self.stop_fraction is None else float(self.stop_fraction),
            "n_checkpoints": int(self.n_checkpoints),
            "seed": int(seed),
            "optimizer": self.optimizer.to_dict(),
        }


def learning_rate_schedule(base_lr: float, total_steps: int, schedule: str) -> np.ndarray:
    """Learning rate of each of ``total_steps`` steps.

    Examples
    --------
    >>> learning_rate_schedule(1.0, 4, "linear").tolist()
    [1.0, 0.75, 0.5, 0.25]
    """
    k = np.arange(total_steps, dtype=np.float64)
    if schedule == "constant":
        return np.full(total_steps, base_lr, dtype=np.float64)
    if schedule == "linear":
        return base_lr * (1.0 - k / total_steps)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + np.cos(np.pi * k / total_steps))
    raise ValueError(f"Unknown schedule {schedule!r}; use one of {_SCHEDULES}.")


def _stage_seed(random_state: int, stage_index: int) -> int:
    return int(np.random.SeedSequence([int(random_state), stage_index]).generate_state(1)[0])


def _checkpoint_steps(start: int, n_steps: int, n_checkpoints: int) -> list[int]:
    if n_checkpoints == 0:
        return []
    return sorted(
        {start + math.floor((j + 0.5) * n_steps / n_checkpoints) for j in range(n_checkpoints)}
    )


def _init_model(architecture: Architecture, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return architecture.build()


def train(
    architecture: str | Callable[..., nn.Module] | nn.Module,
    train: Examples,
    stages: Sequence[TrainingStage],
    *,
    loss: str | Callable = "cross_entropy",
    measurement: str | Callable = "margin",
    architecture_kwargs: dict | None = None,
    random_state: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    verify: bool = True,
) -> Trajectory:
    """Train a model stage by stage and return the recorded :class:`Trajectory`.

    A factory (or ``"module:factory"``) is called under ``torch.manual_seed(random_state)``
    (without touching the global random state), so the initial weights follow the seed;
    an ``nn.Module`` given instead is copied with the weights it has (a pretrained
    starting point stays as it is). Each stage shuffles with its own seed derived from
    ``random_state``, so the run is deterministic given its seed and starting weights.

    ``device`` is where the steps run (``"cpu"``, the default, ``"cuda"``, ``"auto"`` or a
    ``torch.device``); batches are moved there one at a time, and checkpoints are always
    stored on the CPU. Runs on different devices round differently, so a run is
    reproducible on the device it was recorded on.

    ``verify`` runs the recorder's self-check (see :class:`TrajectoryRecorder`): the
    first and last steps of every stage are replayed from the record and compared with
    the trained model; ``verify=False`` skips it.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> g = torch.Generator().manual_seed(0)
    >>> data = Examples(torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g))
    >>> stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=10, n_checkpoints=2)
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> trajectory.n_steps, trajectory.checkpoint_steps
    (8, (2, 6))
    """
    check_training_set(train)
    stages = list(stages)
    if not stages:
        raise ValueError("train() needs at least one TrainingStage.")
    arch = Architecture(architecture, architecture_kwargs)
    loss_fn = resolve_function(loss, LOSSES, "loss")
    check_class_targets(loss_fn, train.targets, "training targets")
    try:
        where = resolve_device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"The 'device' argument of train() must be 'cpu', 'cuda', 'auto', 'cuda:<index>' or "
            f"a torch.device; got {device!r} ({err})."
        ) from err
    model = _init_model(arch, int(random_state)).to(where)
    model.train()
    n = len(train)
    plan = []
    start = 0
    for stage in stages:
        examples = (
            np.arange(n, dtype=np.int64)
            if stage.examples is None
            else np.unique(np.asarray(stage.examples, dtype=np.int64))
        )
        if examples.size == 0:
            raise ValueError(
                f"TrainingStage {stage.name!r} has no training examples. Pass examples=None "
                "(all training examples) or a non-empty array of indices."
            )
        per_epoch = math.ceil(examples.size / stage.batch_size)
        total = stage.epochs * per_epoch
        steps = total if stage.max_steps is None else min(total, stage.max_steps)
        if stage.stop_fraction is not None:
            steps = min(steps, max(1, math.floor(stage.stop_fraction * total)))
        plan.append((stage, examples, per_epoch, total, steps, start))
        start += steps
    checkpoint_steps = [
        s
        for (stage, _, _, _, steps, begin) in plan
        for s in _checkpoint_steps(begin, steps, stage.n_checkpoints)
    ]
    recorder = TrajectoryRecorder(
        model,
        train,
        loss=loss,
        measurement=measurement,
        architecture=arch.source,
        architecture_kwargs=arch.kwargs or None,
        checkpoint_steps=checkpoint_steps,
        verify=verify,
    )
    bar = tqdm(total=start, desc="training", disable=not progress, unit="step", leave=False)
    try:
        for i, (stage, examples, per_epoch, total, steps, _) in enumerate(plan):
            seed = _stage_seed(random_state, i)
            generator = torch.Generator().manual_seed(seed)
            lrs = learning_rate_schedule(stage.optimizer.lr, total, stage.schedule)
            optimizer = stage.optimizer.build(model.parameters())
            recipe = stage.recipe(seed)
            if i == 0:
                recipe["init_seed"] = int(random_state)
            done = 0
            with recorder.stage(
                optimizer,
                name=stage.name,
                examples=examples,
                batch_size=stage.batch_size,
                recipe=recipe,
            ):
                while done < steps:
                    order = examples[torch.randperm(examples.size, generator=generator).numpy()]
                    for b in range(per_epoch):
                        if done >= steps:
                            break
                        idx = order[b * stage.batch_size : (b + 1) * stage.batch_size]
                        for group in optimizer.param_groups:
                            group["lr"] = float(lrs[done])
                        optimizer.zero_grad(set_to_none=True)
                        data = train[idx].to(where)
                        outputs = model(data.inputs)
                        loss_fn(outputs, data.targets).mean().backward()
                        optimizer.step()
                        recorder.step(idx)
                        done += 1
                        bar.update(1)
    finally:
        bar.close()
    return recorder.finish()
