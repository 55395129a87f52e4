"""Replaying a recorded run: the recorded batches through the recorded optimiser.

``replay`` re-executes every update of a trajectory functionally (out of place), with an
optional weight per training example in the minibatch loss,

    θ_{k+1} = update(θ_k, (1/|B_k|) Σ_{i∈B_k} w_i ∇L(z_i, θ_k)),

so that it can be differentiated with respect to the weights (exact unrolling) or run
with perturbed weights (finite differences, checks that a record is faithful).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from .._device import resolve_device
from ..exceptions import TrajectoryError
from ._optimizer import initial_state, optimizer_step
from ._trajectory import Trajectory

__all__ = ["replay", "require_batches"]


def require_batches(trajectory: Trajectory, who: str) -> None:
    if not trajectory.has_batches:
        raise TrajectoryError(
            f"{who} replays the recorded batches, but this trajectory has no batch indices. "
            "Record the run with TrajectoryRecorder (recorder.step(indices) after every "
            "optimizer step) or with sourcekit.train."
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
        Precision and device of the replay.
    """
    require_batches(trajectory, "Replay")
    device = resolve_device(device)
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
    assert trajectory.batches is not None
    bar = tqdm(
        total=trajectory.n_steps, desc="replaying", disable=not progress, unit="step", leave=False
    )
    with torch.enable_grad():
        for stage in trajectory.stages:
            state = initial_state(stage.optimizer)
            for step in range(stage.start, stage.end):
                idx = torch.from_numpy(trajectory.batches[step]).to(device)
                outputs = functional_call(model, {**params, **buffers}, (data.inputs[idx],))
                per_example = trajectory.loss(outputs, data.targets[idx])
                batch_loss = (weights[idx] * per_example).mean()
                names = list(params)
                grads = torch.autograd.grad(
                    batch_loss, [params[n] for n in names], create_graph=create_graph
                )
                if not create_graph:
                    grads = tuple(g.detach() for g in grads)
                    params = {n: p.detach() for n, p in params.items()}
                params, state = optimizer_step(
                    stage.optimizer,
                    params,
                    dict(zip(names, grads, strict=True)),
                    state,
                    float(trajectory.learning_rates[step]),
                )
                if not create_graph:
                    params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
                bar.update(1)
    bar.close()
    return params, buffers
