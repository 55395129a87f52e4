"""The recording self-check: does the record reproduce the run it describes?

Every attribution method explains the run the trajectory describes. If the loop did
something the record does not hold (a loss other than the recorded one, randomness the
recorder did not see, gradients changed between ``backward`` and the optimiser step,
parameters changed by hand), every method explains a different run, without a sign.
While it records, :class:`~sourcekit.TrajectoryRecorder` therefore checks:

- at every step, that the gradients the optimiser uses are those ``backward`` left
  (clipping goes through ``recorder.clip_grad_norm_``, which records it), and that no
  parameter changed between one optimiser step and the next;
- at the first :data:`VERIFY_FIRST` steps of every stage and every
  :data:`VERIFY_EVERY`-th step after them, that the step is reproduced from the state
  the loop started it from: the gradient (:func:`check_gradients`) and the update
  (:func:`check_update`).

Checking single steps from the loop's own state, rather than replaying a stretch of
the run and comparing where it ends, keeps the tolerances those of one step's rounding:
over several steps, rounding differences are amplified where a ReLU's input crosses zero
on one side and not the other, and by Adam where a gradient is as small as its own
rounding error (a bias before a batch norm), by factors no bound can tell from a real
difference.

The gradient check
------------------
The step's forward and backward passes run again, in the precision and on the device of
the run, with the recorded loss on the recorded batch, from the parameters and buffers
the step started from and (for a random forward pass) the recorded generator state, and
the recorded clipping. The same kernels on the same inputs give the same numbers; what
may differ is how the loop reduced its batch loss (torch's ``"mean"`` reduction or the
mean of per-example values), which perturbs the outputs' gradient by a few units of
roundoff u per entry, and kernels that add in a varying order (atomic additions on a
GPU). The backward pass is linear in the outputs' gradient, so the check allows, over
all trained parameters together,

    ‖g_replayed − g_loop‖₂ ≤ 2¹⁰ u ‖g_loop‖₂,

the rounding bound γ_n ≈ n u of sums of about a thousand terms. A faithful record on the
CPU meets it with no difference at all. A different loss, a dropout mask or an input the
recorder did not see changes the gradient by a sizeable fraction of itself.

The update check
----------------
The recorded update rule with this step's recorded settings, applied in float64 to the
loop's parameters, optimiser state and gradients, must give the loop's new parameters.
The check reads at most :data:`UPDATE_ENTRIES` evenly spaced entries of each parameter
(the rule acts entry by entry, so another rule or setting shows in any of them).
``torch.optim`` computes each entry with at most ten floating-point operations whose
operands have magnitudes summing to M (:func:`~sourcekit.trajectory._optimizer.
update_magnitude`, evaluated in float64) and whose result is as large as the update
Δθ, so each entry may differ by

    |θ_replayed − θ_loop| ≤ 10 u (M + |Δθ|) + (the smallest normal number, for zeros).

A faithful record meets it with a margin: measured over 50 SGD, momentum, Nesterov, Adam
and AdamW runs of MLPs, a convolutional network and a batch-normalised network on the
digits, every update was within 2.6 u (M + |Δθ|).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..exceptions import TrajectoryError
from ._examples import Examples
from ._optimizer import optimizer_step, state_from_checkpoint, update_magnitude
from ._replay import StepPlan, _forward
from ._settings import clip_coefficient

__all__ = [
    "VERIFY_EVERY",
    "VERIFY_FIRST",
    "StepCapture",
    "check_gradients",
    "check_update",
    "verified",
]

VERIFY_FIRST = 4
"""The first steps of every stage that the self-check reproduces."""
VERIFY_EVERY = 50
"""After them, every this many steps of a stage is reproduced too."""

GRADIENT_ROUNDING = 2.0**10
"""The gradient check's tolerance, in units of roundoff, relative to the gradient's norm."""
UPDATE_OPERATIONS = 10
"""The update check's tolerance, in units of roundoff, relative to the operands' magnitude."""


def verified(step_in_stage: int) -> bool:
    """Whether the self-check reproduces the stage's step ``step_in_stage`` (from 0).

    Examples
    --------
    >>> from sourcekit.trajectory._selfcheck import verified
    >>> [k for k in range(160) if verified(k)]
    [0, 1, 2, 3, 50, 100, 150]
    """
    return step_in_stage < VERIFY_FIRST or step_in_stage % VERIFY_EVERY == 0


def _causes(loss_name: str) -> str:
    return (
        "Likely causes, and their fixes:\n"
        f"  - the loop's loss is not the recorded loss={loss_name}: F.mse_loss is "
        "loss='mse_loss' (loss='squared_error' is half the squared error); label smoothing "
        "or class weights are loss=sourcekit.objectives.CrossEntropy(label_smoothing=..., "
        "weight=...) (with class weights, train with reduction='none' and .mean()); the loop "
        "must minimise the batch mean of the per-example loss;\n"
        "  - inputs the recorder did not see: data augmentation or noise applied outside the "
        "model (record the inputs the model trained on as the training examples), or batch "
        "indices that do not match the batch;\n"
        "  - randomness outside torch's generator on the model's device, or a forward pass "
        "in lower precision (torch.autocast): record without them;\n"
        "  - a model other than the one the recorder watches, or a loss on more than the "
        "model's outputs (an extra regulariser: add it to the per-example loss).\n"
        "Pass verify=False to record anyway: attribution then explains the recorded "
        "description of the run, not the run itself."
    )


@dataclass
class StepCapture:
    """The loop's state at the start of a step that the self-check reproduces.

    Attributes
    ----------
    step : int
    params, buffers : dict of str to tensor
        Every parameter, and the buffers before the step's forward pass.
    grads : dict of str to tensor
        The gradient of every trained parameter, as the optimiser uses it.
    optimizer : dict
        The optimiser's state before the step, in a checkpoint's format.
    """

    step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def check_gradients(
    model: nn.Module,
    capture: StepCapture,
    plan: StepPlan,
    train: Examples,
    loss: Any,
    train_mode: bool,
    *,
    stage: str,
    loss_name: str,
) -> None:
    """Recompute the step's gradient from the record; raise a TrajectoryError if it differs.

    ``model`` is a module of the architecture on the run's device (its own weights are
    not used).
    """
    trained = list(capture.grads)
    first = capture.grads[trained[0]]
    device, dtype = first.device, first.dtype
    # Fresh leaves for the trained parameters; the others (frozen) are read as they are.
    params = {
        n: t.detach().clone().requires_grad_(True) if n in capture.grads else t.detach()
        for n, t in capture.params.items()
    }
    buffers = {n: t.detach().clone() for n, t in capture.buffers.items()}
    batch = train[plan.batch].to(device, dtype)
    model.train(train_mode)
    with torch.enable_grad():
        outputs = _forward(model, {**params, **buffers}, batch.inputs, plan.random_state)
        value = loss(outputs, batch.targets).mean()
        grads = torch.autograd.grad(value, [params[n] for n in trained], allow_unused=True)
    replayed = [
        torch.zeros_like(params[n]) if g is None else g
        for n, g in zip(trained, grads, strict=True)
    ]
    if plan.clip is not None:
        coefficient = clip_coefficient(replayed, *plan.clip)
        replayed = [g * coefficient for g in replayed]
    difference = torch.linalg.vector_norm(
        torch.stack(
            [
                torch.linalg.vector_norm(r - capture.grads[n]).double()
                for r, n in zip(replayed, trained, strict=True)
            ]
        )
    )
    size = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(capture.grads[n]).double() for n in trained])
    )
    u = torch.finfo(dtype).eps / 2
    allowed = GRADIENT_ROUNDING * u * float(size) + torch.finfo(torch.float64).tiny
    if not float(difference) <= allowed:  # NaN fails too
        raise TrajectoryError(
            f"The record does not reproduce the training run: at step {capture.step} of stage "
            f"{stage!r}, the gradient of the recorded loss on the recorded batch differs from the "
            f"gradient the optimizer used by {float(difference):.3g} in norm ({float(difference) / max(float(size), 1e-300):.2%} of "
            f"it; rounding explains {allowed:.3g}). Every attribution method would explain a "
            f"different run.\n{_causes(loss_name)}"
        )


UPDATE_ENTRIES = 2**14
"""The update check reads at most this many entries of each parameter, evenly spaced."""


def _entries(numel: int, device: torch.device) -> torch.Tensor:
    """Evenly spaced flat indices, at most UPDATE_ENTRIES of them (all of a small tensor).

    The update rule acts entry by entry, so a rule or a setting other than the recorded
    one shows in any entry: a sample keeps the check's cost that of a small tensor.
    """
    if numel <= UPDATE_ENTRIES:
        return torch.arange(numel, device=device)
    return torch.linspace(0, numel - 1, UPDATE_ENTRIES, device=device).round().long()


def check_update(
    capture: StepCapture,
    plan: StepPlan,
    after: dict[str, torch.Tensor],
    *,
    stage: str,
) -> None:
    """Apply the recorded update to the captured state; raise if the loop's result differs.

    ``after`` holds the trained parameters after the loop's optimiser step.
    """
    worst: tuple[float, str, float, float] | None = None
    entries = {n: _entries(capture.params[n].numel(), capture.params[n].device) for n in after}

    def pick(t: torch.Tensor, name: str) -> torch.Tensor:
        return t.detach().reshape(-1)[entries[name]].double()

    for members, spec, lr in plan.groups:
        theta = {n: pick(capture.params[n], n) for n in members}
        grads = {n: pick(capture.grads[n], n) for n in members}
        state = state_from_checkpoint(spec, capture.optimizer)
        state = {
            "step": state["step"],
            "buffers": {
                n: tuple(pick(t, n) for t in b) if isinstance(b, tuple) else pick(b, n)
                for n, b in state["buffers"].items()
                if n in theta
            },
        }
        replayed, _ = optimizer_step(spec, theta, grads, state, lr)
        magnitude = update_magnitude(spec, theta, grads, state, lr)
        for name in members:
            live = pick(after[name], name)
            u = torch.finfo(after[name].dtype).eps / 2
            bound = magnitude[name] + (live - theta[name]).abs()
            allowed = UPDATE_OPERATIONS * u * bound + torch.finfo(after[name].dtype).tiny
            excess = (replayed[name] - live).abs() / allowed
            ratio = float(excess.max()) if excess.numel() else 0.0
            if not ratio <= 1.0 and (worst is None or not ratio <= worst[0]):
                i = int(torch.nan_to_num(excess, nan=float("inf")).reshape(-1).argmax())
                worst = (
                    ratio,
                    name,
                    float((replayed[name] - live).abs().reshape(-1)[i]),
                    float(allowed.reshape(-1)[i]),
                )
    if worst is not None:
        _, name, worst_difference, worst_allowed = worst
        raise TrajectoryError(
            f"The record does not reproduce the training run: at step {capture.step} of stage "
            f"{stage!r}, the optimizer moved {name!r} differently from the recorded update rule "
            f"and settings (by {worst_difference:.3g}, where rounding explains "
            f"{worst_allowed:.3g}). The "
            "optimizer does something sourcekit does not replay (a feature of another optimizer "
            "class, a hook that changes parameters during optimizer.step()), or the parameters "
            "were changed during the step. Train with torch.optim.SGD, Adam or AdamW and change "
            "parameters only through them, or pass verify=False to record anyway."
        )
