"""What each recorded step did beyond its batch: parameter groups, clipping, randomness.

A stage's optimiser may train a subset of the model's parameters (the others stay
fixed: a frozen body under a new head, adapters), split them into parameter groups with
their own learning rate and weight decay (AdamW without decay on biases and norms), and
change any setting at every step (a scheduler per group, OneCycleLR cycling momentum or
Adam's β₁). A step may clip the gradient norm, and its forward pass may draw random
numbers (dropout). The trajectory keeps all of it:

- :class:`ParameterGroup`: per stage, the parameters of each group, its settings at the
  stage's start and the value of every setting that changes, at every step;
- :class:`GradientClipping`: per step, the largest norm allowed, the norm's order and the
  coefficient the gradients were multiplied by (1 where the step did not clip);
- :class:`RandomStates`: for the steps whose forward pass drew random numbers, the state
  of torch's generator before that pass, so that a replay draws the same dropout masks.

A stage with one group holding every parameter, whose only changing setting is the
learning rate, keeps ``Stage.groups = None``: the run is described, as before, by
``Stage.optimizer`` and ``Trajectory.learning_rates``.

The functions at the end are what replay and the approximate methods read:
:func:`stage_groups` (the groups of a stage, either form), :func:`effective_learning_rates`
(per parameter, the learning rate of every step times its clip coefficient and the
heavy-ball factor) and :func:`weight_decays` (per parameter, the coupled and decoupled
coefficients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from ..exceptions import TrajectoryError
from ._optimizer import OptimizerSpec

__all__ = [
    "SCHEDULED",
    "GradientClipping",
    "ParameterGroup",
    "RandomStates",
    "effective_learning_rates",
    "stage_groups",
    "weight_decays",
]

SCHEDULED = ("lr", "momentum", "beta1", "beta2", "weight_decay")
"""The settings a parameter group may change at every step."""

_RANGES = {
    "lr": (0.0, np.inf, "finite and >= 0"),
    "momentum": (0.0, 1.0, "in [0, 1)"),
    "beta1": (0.0, 1.0, "in [0, 1)"),
    "beta2": (0.0, 1.0, "in [0, 1)"),
    "weight_decay": (0.0, np.inf, "finite and >= 0"),
}


@dataclass(frozen=True, eq=False)
class ParameterGroup:
    """One parameter group of a stage's optimiser.

    Attributes
    ----------
    parameters : tuple of str
        The names (as in ``model.named_parameters()``) of the parameters it trains.
    optimizer : OptimizerSpec
        Its settings at the stage's first step (``lr``: the base learning rate).
    schedule : dict of str to ndarray
        ``"lr"``, the learning rate of each of the stage's steps, and any of
        ``"momentum"``, ``"beta1"``, ``"beta2"``, ``"weight_decay"`` that change during
        the stage, one value per step.

    Examples
    --------
    >>> import numpy as np
    >>> from sourcekit.trajectory import OptimizerSpec, ParameterGroup
    >>> group = ParameterGroup(
    ...     ("0.weight",), OptimizerSpec("sgd", lr=0.1, momentum=0.9),
    ...     {"lr": np.array([0.1, 0.05]), "momentum": np.array([0.9, 0.95])},
    ... )
    >>> spec, lr = group.at(1)
    >>> spec.momentum, lr
    (0.95, 0.05)
    """

    parameters: tuple[str, ...]
    optimizer: OptimizerSpec
    schedule: dict[str, np.ndarray] = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", tuple(str(p) for p in self.parameters))
        if not self.parameters:
            raise TrajectoryError("A parameter group must train at least one parameter.")
        if "lr" not in self.schedule:
            raise TrajectoryError("A parameter group's schedule must hold 'lr', one per step.")
        checked = {}
        length = None
        for key, values in self.schedule.items():
            if key not in SCHEDULED:
                raise TrajectoryError(
                    f"A parameter group's schedule holds {key!r}; the settings that may change per "
                    f"step are {SCHEDULED}."
                )
            array = np.asarray(values, dtype=np.float64).reshape(-1)
            low, high, allowed = _RANGES[key]
            bad = ~np.isfinite(array) | (array < low) | (array >= high)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise TrajectoryError(
                    f"The {key!r} of step {i} of a parameter group is {float(array[i])!r}; it must "
                    f"be {allowed}."
                )
            if length is not None and array.size != length:
                raise TrajectoryError(
                    "The schedule of a parameter group holds settings of different lengths; "
                    "record one value per step for each."
                )
            length = array.size
            checked[key] = array
        object.__setattr__(self, "schedule", checked)

    @property
    def n_steps(self) -> int:
        return int(self.schedule["lr"].size)

    def at(self, k: int) -> tuple[OptimizerSpec, float]:
        """The settings of the stage's ``k``-th step (from 0) and its learning rate."""
        changes: dict[str, Any] = {}
        s = self.schedule
        if "momentum" in s:
            changes["momentum"] = float(s["momentum"][k])
        if "weight_decay" in s:
            changes["weight_decay"] = float(s["weight_decay"][k])
        if "beta1" in s or "beta2" in s:
            b1 = float(s["beta1"][k]) if "beta1" in s else self.optimizer.betas[0]
            b2 = float(s["beta2"][k]) if "beta2" in s else self.optimizer.betas[1]
            changes["betas"] = (b1, b2)
        spec = replace(self.optimizer, **changes) if changes else self.optimizer
        return spec, float(s["lr"][k])

    def values(self, key: str) -> np.ndarray:
        """One setting at every step of the stage (constant ones repeated)."""
        if key in self.schedule:
            return self.schedule[key]
        spec = self.optimizer
        constant = {
            "momentum": spec.momentum,
            "weight_decay": spec.weight_decay,
            "beta1": spec.betas[0],
            "beta2": spec.betas[1],
        }[key]
        return np.full(self.n_steps, constant, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        """The JSON part of a saved manifest (the per-step values go to the schedule file)."""
        return {
            "parameters": list(self.parameters),
            "optimizer": self.optimizer.to_dict(),
            "scheduled": sorted(self.schedule),
        }


@dataclass(frozen=True, eq=False)
class GradientClipping:
    """The gradient-norm clipping of every step (``recorder.clip_grad_norm_``).

    Attributes
    ----------
    max_norm : ndarray of shape (T,)
        The largest norm allowed at each step (infinity where the step did not clip).
    norm_type : ndarray of shape (T,)
        The order p of the norm (2 for the Euclidean norm, infinity for the largest entry).
    coefficient : ndarray of shape (T,)
        What the step multiplied its gradients by: min(1, max_norm / (‖g‖_p + 1e-6)),
        as ``torch.nn.utils.clip_grad_norm_`` does; 1 where the step did not clip.

    Examples
    --------
    >>> import numpy as np
    >>> from sourcekit.trajectory import GradientClipping
    >>> clipping = GradientClipping([1.0, np.inf], [2.0, 2.0], [0.25, 1.0])
    >>> clipping.clips(0), clipping.clips(1)
    (True, False)
    """

    max_norm: np.ndarray
    norm_type: np.ndarray
    coefficient: np.ndarray

    def __post_init__(self) -> None:
        arrays = {}
        for name in ("max_norm", "norm_type", "coefficient"):
            arrays[name] = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
        sizes = {a.size for a in arrays.values()}
        if len(sizes) != 1:
            raise TrajectoryError(
                "The gradient clipping record holds arrays of different lengths."
            )
        c = arrays["coefficient"]
        if not np.all((c > 0) & (c <= 1)):
            i = int(np.flatnonzero(~((c > 0) & (c <= 1)))[0])
            raise TrajectoryError(
                f"The clip coefficient of step {i} is {float(c[i])!r}; coefficients lie in (0, 1]."
            )
        if not np.all(arrays["max_norm"] > 0) or not np.all(arrays["norm_type"] > 0):
            raise TrajectoryError("Clipping norms and their orders must be > 0.")
        for name, array in arrays.items():
            object.__setattr__(self, name, array)

    def clips(self, step: int) -> bool:
        return bool(np.isfinite(self.max_norm[step]))


@dataclass(frozen=True, eq=False)
class RandomStates:
    """torch's generator state before each random forward pass.

    Attributes
    ----------
    device : str
        The device type the run drew its random numbers on ("cpu" or "cuda"); a replay
        draws the same numbers only there.
    steps : ndarray of int64
        The steps whose forward pass drew random numbers (in increasing order).
    states : tensor of uint8, shape (len(steps), S)
        ``torch.get_rng_state()`` (CPU) or ``torch.cuda.get_rng_state()`` before each
        of those passes.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.trajectory import RandomStates
    >>> states = RandomStates("cpu", [3], torch.get_rng_state()[None])
    >>> states.get(3).shape == torch.get_rng_state().shape, states.get(4) is None
    (True, True)
    """

    device: str
    steps: np.ndarray
    states: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        steps = np.asarray(self.steps, dtype=np.int64).reshape(-1)
        if self.device not in ("cpu", "cuda"):
            raise TrajectoryError(
                f"Random states are recorded for 'cpu' or 'cuda'; got {self.device!r}."
            )
        if steps.size and np.any(np.diff(steps) <= 0):
            raise TrajectoryError("The steps of the random states must be strictly increasing.")
        states = torch.as_tensor(self.states)
        if states.dtype != torch.uint8 or states.ndim != 2 or states.shape[0] != steps.size:
            raise TrajectoryError(
                "The random states must be a uint8 tensor with one row per recorded step."
            )
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "states", states)

    def get(self, step: int) -> torch.Tensor | None:
        """The state before the forward pass of ``step``, or None if it drew nothing."""
        i = int(np.searchsorted(self.steps, step))
        if i < self.steps.size and self.steps[i] == step:
            return self.states[i].clone()  # a tensor of its own: set_rng_state reads its storage
        return None


# --- what replay and the approximate methods read ----------------------------------------
class _Stage(Protocol):
    """What the functions below read of a stage (``Stage``'s fields)."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def optimizer(self) -> OptimizerSpec: ...
    @property
    def groups(self) -> tuple[ParameterGroup, ...] | None: ...


class _Run(Protocol):
    """What the functions below read of a run (``Trajectory``'s attributes; this module
    is below the trajectory's, which holds these settings)."""

    @property
    def parameter_names(self) -> tuple[str, ...]: ...
    @property
    def learning_rates(self) -> np.ndarray: ...
    @property
    def stages(self) -> Sequence[_Stage]: ...
    @property
    def clipping(self) -> GradientClipping | None: ...


def stage_groups(trajectory: _Run, stage: _Stage) -> tuple[ParameterGroup, ...]:
    """The parameter groups of ``stage``: its recorded ones, or one group of every parameter."""
    if stage.groups is not None:
        return stage.groups
    return (
        ParameterGroup(
            trajectory.parameter_names,
            stage.optimizer,
            {"lr": trajectory.learning_rates[stage.start : stage.end]},
        ),
    )


def _stage_holding(trajectory: _Run, start: int, end: int) -> _Stage:
    for stage in trajectory.stages:
        if stage.start <= start and end <= stage.end:
            return stage
    raise ValueError(f"The steps {start}..{end - 1} do not lie inside one stage.")


def effective_learning_rates(
    trajectory: _Run,
    start: int,
    end: int,
    *,
    momentum_correction: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """The effective learning rate of every parameter at the steps ``start .. end-1``.

    For a parameter of group g at step k: η_{g,k} × c_k × (1 − d_g)/(1 − β_{g,k}), with
    c_k the step's clip coefficient (1 without clipping) and the heavy-ball factor only
    for SGD with momentum and only when ``momentum_correction``. Parameters the stage
    does not train get zeros. The steps must lie in one stage. Parameters of one group
    share one array.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> from sourcekit.trajectory import effective_learning_rates
    >>> data = Examples(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> stage = TrainingStage(OptimizerSpec("sgd", lr=0.1, momentum=0.5), epochs=1, batch_size=4)
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> effective_learning_rates(trajectory, 0, 2)["weight"]  # 0.1 / (1 - 0.5)
    array([0.2, 0.2])
    """
    stage = _stage_holding(trajectory, start, end)
    k0, k1 = start - stage.start, end - stage.start
    clip = (
        np.ones(end - start)
        if trajectory.clipping is None
        else trajectory.clipping.coefficient[start:end]
    )
    out: dict[str, np.ndarray] = {}
    for group in stage_groups(trajectory, stage):
        rates = group.schedule["lr"][k0:k1] * clip
        spec = group.optimizer
        if momentum_correction and spec.kind == "sgd":
            beta = group.values("momentum")[k0:k1]
            rates = np.where(beta > 0, rates * ((1.0 - spec.dampening) / (1.0 - beta)), rates)
        for name in group.parameters:
            out[name] = rates
    zeros = np.zeros(end - start)
    wanted = trajectory.parameter_names if names is None else names
    return {name: out.get(name, zeros) for name in wanted}


def weight_decays(
    trajectory: _Run, start: int, end: int, *, names: Sequence[str] | None = None
) -> dict[str, tuple[float, float]]:
    """Per parameter, the (coupled, decoupled) weight decay over the steps ``start .. end-1``.

    Coupled decay (SGD, Adam) adds λθ to the gradient; decoupled decay (AdamW) shrinks
    θ by ηλ directly. Values that change per step are averaged over the steps.
    Parameters the stage does not train get (0, 0).

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> from sourcekit.trajectory import weight_decays
    >>> data = Examples(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> stage = TrainingStage(OptimizerSpec("adamw", lr=0.01, weight_decay=0.1), epochs=1, batch_size=4)
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> weight_decays(trajectory, 0, 2)["bias"]  # (coupled, decoupled)
    (0.0, 0.1)
    """
    stage = _stage_holding(trajectory, start, end)
    k0, k1 = start - stage.start, end - stage.start
    out: dict[str, tuple[float, float]] = {}
    for group in stage_groups(trajectory, stage):
        values = group.values("weight_decay")[k0:k1]
        # A constant decay is taken as it is (a mean of equal floats may round off it).
        decay = float(values[0]) if np.all(values == values[0]) else float(values.mean())
        pair = (0.0, decay) if group.optimizer.kind == "adamw" else (decay, 0.0)
        for name in group.parameters:
            out[name] = pair
    wanted = trajectory.parameter_names if names is None else names
    return {name: out.get(name, (0.0, 0.0)) for name in wanted}


def group_of(trajectory: _Run, stage: _Stage, name: str) -> ParameterGroup | None:
    """The group of ``stage`` that trains parameter ``name`` (None if it is frozen)."""
    for group in stage_groups(trajectory, stage):
        if name in group.parameters:
            return group
    return None


def clip_coefficient(
    grads: Sequence[torch.Tensor], max_norm: float, norm_type: float
) -> torch.Tensor:
    """min(1, max_norm / (‖g‖_p + 1e-6)) over all ``grads``, as ``clip_grad_norm_`` computes it.

    Differentiable (the replay of exact unrolling differentiates through it).
    """
    if not grads:
        raise ValueError("Clipping needs at least one gradient.")
    if np.isinf(norm_type):
        total = torch.stack([g.abs().max() for g in grads]).max()
    else:
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type
        )
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)
