"""Replaying a recorded run: the recorded batches through the recorded optimiser.

``replay`` re-executes every update of a trajectory functionally (out of place), with an
optional weight per training example in the minibatch loss,

    θ_{k+1} = update(θ_k, c_k · (1/|B_k|) Σ_{i∈B_k} w_i ∇L(z_i, θ_k)),

so that it can be differentiated with respect to the weights (exact unrolling) or run
with perturbed weights (finite differences, checks that a record is faithful). Each step
follows what was recorded: the parameter groups and their settings at that step (a
parameter in no group stays fixed), the clip coefficient c_k recomputed from the
replayed gradient with the recorded norm bound (differentiably: exact unrolling sees how
clipping depends on the data), and the generator state of a random forward pass
(dropout draws the same masks). :func:`replay_steps` runs any range of steps from any
state; the recorder's self-check uses it on the steps it verifies.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .._device import resolve_device
from ..exceptions import TrajectoryError
from ._examples import Examples
from ._optimizer import OptimizerSpec, initial_state, optimizer_step
from ._settings import clip_coefficient, stage_groups
from ._trajectory import Trajectory

__all__ = ["StepPlan", "replay", "replay_steps", "require_batches", "step_plans"]


def require_batches(trajectory: Trajectory, who: str) -> None:
    if not trajectory.has_batches:
        raise TrajectoryError(
            f"{who} replays the recorded batches, but this trajectory has no batch indices. "
            "Record the run with TrajectoryRecorder (recorder.step(indices) after every "
            "optimizer step) or with sourcekit.train."
        )


@dataclass(frozen=True)
class StepPlan:
    """What replaying one recorded update needs.

    Attributes
    ----------
    step : int
        The global step.
    batch : ndarray of int64
        The training examples of its batch.
    groups : tuple of (names, OptimizerSpec, learning rate)
        Each parameter group with its settings at this step; parameters in no group
        stay fixed.
    clip : (max_norm, norm_type) or None
        The gradient-norm bound of the step, when it clipped.
    random_state : uint8 tensor or None
        The generator state before the step's forward pass, when it drew random numbers.
    """

    step: int
    batch: np.ndarray
    groups: tuple[tuple[tuple[str, ...], OptimizerSpec, float], ...]
    clip: tuple[float, float] | None = None
    random_state: torch.Tensor | None = None


def step_plans(trajectory: Trajectory, start: int, end: int) -> Iterator[StepPlan]:
    """The plans of the steps ``start .. end-1`` of ``trajectory`` (which has batches)."""
    assert trajectory.batches is not None
    clipping, states = trajectory.clipping, trajectory.random_states
    for stage in trajectory.stages:
        groups = stage_groups(trajectory, stage)
        for step in range(max(start, stage.start), min(end, stage.end)):
            k = step - stage.start
            yield StepPlan(
                step=step,
                batch=trajectory.batches[step],
                groups=tuple((g.parameters, *g.at(k)) for g in groups),
                clip=(
                    (float(clipping.max_norm[step]), float(clipping.norm_type[step]))
                    if clipping is not None and clipping.clips(step)
                    else None
                ),
                random_state=None if states is None else states.get(step),
            )


def _forward(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    random_state: torch.Tensor | None,
) -> torch.Tensor:
    """The model's outputs; a random forward pass draws from ``random_state``.

    The generator is forked, so the caller's random state is left as it was.
    """
    if random_state is None:
        return functional_call(model, tensors, (inputs,))
    if inputs.device.type == "cuda":
        index = inputs.device.index if inputs.device.index is not None else 0
        with torch.random.fork_rng(devices=[index]):
            torch.cuda.set_rng_state(random_state, index)
            return functional_call(model, tensors, (inputs,))
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(random_state)
        return functional_call(model, tensors, (inputs,))


def replay_steps(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    state: dict[str, Any],
    data: Examples,
    loss: Any,
    plans: Iterable[StepPlan],
    *,
    weights: torch.Tensor,
    create_graph: bool = False,
    bar: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Replay ``plans`` from ``params``, ``buffers`` and the optimiser ``state``.

    ``params`` hold every parameter of ``model`` (requiring grad), ``data`` the training
    examples on the device and in the precision of the replay. Returns the parameters,
    buffers and optimiser state after the last plan; buffers a module updates in place
    (batch-norm statistics) are updated in the tensors given.
    """
    for plan in plans:
        idx = torch.from_numpy(plan.batch).to(data.inputs.device)
        names = [n for group in plan.groups for n in group[0]]
        # The step's gradient is the partial derivative at this step's parameters: each
        # trained parameter enters the forward pass through a view of its own, so that a
        # tensor reused from earlier steps (a parameter frozen until now) is not
        # differentiated through the earlier steps that read it.
        current = {**params, **{n: params[n].view_as(params[n]) for n in names}}
        outputs = _forward(model, {**current, **buffers}, data.inputs[idx], plan.random_state)
        per_example = loss(outputs, data.targets[idx])
        batch_loss = (weights[idx] * per_example).mean()
        grads = torch.autograd.grad(
            batch_loss,
            [current[n] for n in names],
            create_graph=create_graph,
            allow_unused=True,
        )
        grads = tuple(
            torch.zeros_like(params[n]) if g is None else g
            for n, g in zip(names, grads, strict=True)
        )
        if plan.clip is not None:
            coefficient = clip_coefficient(list(grads), *plan.clip)
            grads = tuple(g * coefficient for g in grads)
        if not create_graph:
            grads = tuple(g.detach() for g in grads)
            params = {n: p.detach() for n, p in params.items()}
        by_name = dict(zip(names, grads, strict=True))
        new_params = dict(params)
        new_buffers: dict[str, Any] = dict(state["buffers"])
        for members, spec, lr in plan.groups:
            updated, group_state = optimizer_step(
                spec,
                {n: params[n] for n in members},
                {n: by_name[n] for n in members},
                {"step": state["step"], "buffers": state["buffers"]},
                lr,
            )
            new_params.update(updated)
            new_buffers.update(group_state["buffers"])
        params = new_params
        state = {"step": state["step"] + 1, "buffers": new_buffers}
        if not create_graph:
            params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        if bar is not None:
            bar.update(1)
    return params, buffers, state


def check_random_device(trajectory: Trajectory, device: torch.device, who: str) -> None:
    """A run whose forward pass drew random numbers replays only on its own device type."""
    states = trajectory.random_states
    if states is not None and states.steps.size and states.device != device.type:
        raise TrajectoryError(
            f"{who} replays this run's random forward passes (dropout) with the generator states "
            f"recorded on {states.device!r}, which draw the same numbers only there; it was asked "
            f"to run on {device.type!r}. Pass device={states.device!r}."
        )


def replay(
    trajectory: Trajectory,
    *,
    weights: torch.Tensor | None = None,
    create_graph: bool = False,
    dtype: torch.dtype = torch.float64,
    device: Any = "cpu",
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the recorded updates again and return the final parameters and buffers.

    Parameters
    ----------
    trajectory : Trajectory
        A run with recorded batches.
    weights : tensor of shape (n_train,), optional
        Per-example weights w_i in the minibatch loss (default: all ones). When
        ``create_graph`` is true and ``weights`` requires grad, the returned parameters
        are differentiable functions of the weights.
    create_graph : bool
        Keep the autograd graph of every update (memory grows with the number of steps).
    dtype, device
        Precision and device of the replay. A run whose forward pass drew random
        numbers (dropout) replays on the device type it was recorded on.
    """
    require_batches(trajectory, "Replay")
    device = resolve_device(device)
    check_random_device(trajectory, device, "Replay")
    model = trajectory.architecture.build().to(device=device, dtype=dtype)
    model.train(trajectory.train_mode)
    initial = trajectory.checkpoint(0)
    # Copies: requires_grad_ must not flag the stored checkpoint's own tensors.
    params = {
        k: v.to(device=device, dtype=dtype, copy=True).requires_grad_(True)
        for k, v in initial.params.items()
    }
    # Copies: modules update buffers in place (batch-norm statistics), and the stored
    # checkpoint must not change.
    buffers = {
        k: v.to(device=device, dtype=dtype, copy=True)
        if v.is_floating_point()
        else v.to(device, copy=True)
        for k, v in initial.buffers.items()
    }
    data = trajectory.train.to(device, dtype)
    if weights is None:
        weights = torch.ones(trajectory.n_train, dtype=dtype, device=device)
    if weights.shape != (trajectory.n_train,):
        raise ValueError(
            f"The 'weights' must have shape ({trajectory.n_train},), one per training example; got "
            f"{tuple(weights.shape)}."
        )
    bar = tqdm(
        total=trajectory.n_steps, desc="replaying", disable=not progress, unit="step", leave=False
    )
    with torch.enable_grad():
        for stage in trajectory.stages:
            params, buffers, _ = replay_steps(
                model,
                params,
                buffers,
                initial_state(stage.optimizer),
                data,
                trajectory.loss,
                step_plans(trajectory, stage.start, stage.end),
                weights=weights,
                create_graph=create_graph,
                bar=bar,
            )
    bar.close()
    return params, buffers
