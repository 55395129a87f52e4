"""Per-example training losses and query measurements.

A user describes a task with two small callables, each mapping the model's outputs and
the targets of n examples to a tensor of shape (n,):

- the per-example training loss L(z, θ); the objective is its mean;
- the measurement f(z_q, θ) whose change attribution explains.

Built-in ones are named by strings (so that a saved trajectory can name them); any
importable function ``module:qualname`` works too. A loss may also define, as
attributes of the callable:

- ``loss.sample_targets(outputs, uniforms)``: targets drawn from the model's predictive
  distribution, given uniform noise in [0, 1) (the true Fisher). The noise is shaped
  like the outputs unless ``loss.noise_shape(shape)`` maps one example's output shape
  to its noise shape (cross-entropy draws one uniform per position, not one per class).
- ``loss.output_hessian_sqrt(outputs)``: a factor M with M Mᵀ = ∇²_z ℓ, the Hessian of
  one position's loss ℓ with respect to that position's outputs z (shape
  (..., C, C)), for the exact expected Fisher (the Gauss-Newton matrix).
- ``loss.per_position(outputs, targets)``: for outputs with positions (a sequence
  model's (n, T, C) logits), the pair (ℓ, w) of shape (n, T) with
  L = Σ_t w_t ℓ_t: each position's own loss and the weight the per-example loss gives
  it (1/T for a mean over positions, 0 for an ignored position). The curvature of the
  objective is then Σ_t w_t J_tᵀ ∇²ℓ_t J_t per example, and the Fisher is formed per
  position with these weights (see the curvature page of the documentation). The
  built-in losses define it; a loss over positions that does not is treated as one
  position per example.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ._imports import import_object, importable_name

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "MEASUREMENTS",
    "absolute_error",
    "cross_entropy",
    "function_spec",
    "margin",
    "output",
    "resolve_function",
    "squared_error",
]

PerExample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


IGNORE_INDEX = -100
"""Class targets equal to this value mark positions that no built-in loss or measurement
counts (padding, prompt tokens), as ``torch.nn.functional.cross_entropy`` does."""


def _flatten_positions(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    # (n, T, C) logits with (n, T) targets: sequence models, one class per position.
    if outputs.ndim == 3 and targets.ndim == 2:
        n, t, c = outputs.shape
        return outputs.reshape(n * t, c), targets.reshape(n * t), t
    return outputs, targets, 1


def _check_labels(labels: torch.Tensor, n_classes: int, positions: int) -> None:
    """Class targets (flattened over ``positions`` per example) must index the outputs'
    classes, or be ``IGNORE_INDEX``."""
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= n_classes))
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        where = f"example {first // positions}"
        if positions > 1:
            where += f", position {first % positions}"
        raise ValueError(
            f"A class target is {int(labels[first])}, outside [0, {n_classes}) for outputs with "
            f"{n_classes} classes ({where}). Class targets must be indices of the model's "
            f"outputs, or {IGNORE_INDEX} for a position to ignore: check the labels, and that "
            "the model has an output per class."
        )


def _class_position_weights(labels: torch.Tensor, positions: int) -> torch.Tensor:
    """(n, T) weights of a mean over each example's counted positions (0 where ignored)."""
    counted = (labels != IGNORE_INDEX).reshape(-1, positions).to(torch.float64)
    return counted / counted.sum(dim=1, keepdim=True).clamp_min(1.0)


def _cross_entropy_per_position(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels, positions = _flatten_positions(outputs, targets)
    labels = labels.long()
    _check_labels(labels, logits.shape[-1], positions)
    values = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    weights = _class_position_weights(labels, positions).to(values.device)
    return values.reshape(-1, positions), weights.to(values.dtype)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against integer class targets, one value per example.

    For sequence outputs (n, T, C) with targets (n, T), the mean over the example's
    positions whose target is not ``IGNORE_INDEX`` (-100, torch's default: padding and
    prompt tokens); an example with no counted position has loss 0. It defines
    ``sample_targets`` (labels drawn from the softmax by inverse transform sampling, one
    uniform per position, for the true Fisher), ``noise_shape``, ``output_hessian_sqrt``
    (for the expected Fisher) and ``per_position`` (each position's loss and its weight
    1/T_counted, so that the Fisher is formed per position at the objective's scale).

    Parameters
    ----------
    outputs : tensor of shape (n, C) or (n, T, C)
        Logits.
    targets : tensor of shape (n,) or (n, T)
        Class indices.

    Returns
    -------
    tensor of shape (n,)

    Examples
    --------
    >>> import torch
    >>> from sourcekit.objectives import cross_entropy
    >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    >>> cross_entropy(logits, torch.tensor([0, 0]))
    tensor([0.2395, 2.2395])

    A sequence of two positions whose second target is ignored counts the first only:

    >>> cross_entropy(logits[None], torch.tensor([[0, -100]]))
    tensor([0.2395])
    """
    values, weights = _cross_entropy_per_position(outputs, targets)
    return (values * weights).sum(dim=1)


def _sample_categorical(outputs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    # Inverse CDF: one uniform per position picks the class whose cumulative probability
    # interval [c_{k-1}, c_k) holds it. A class of zero probability has an empty interval
    # and is never drawn. The uniform is scaled by the last cumulative sum, so rounding of
    # the sum (1 ± a few eps) cannot push it past the last class.
    cumulative = torch.softmax(outputs.detach().double(), dim=-1).cumsum(dim=-1)
    values = uniforms.to(cumulative.device, torch.float64).unsqueeze(-1) * cumulative[..., -1:]
    draws = torch.searchsorted(cumulative, values, right=True).squeeze(-1)
    return draws.clamp_max(outputs.shape[-1] - 1)


def _categorical_noise_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    # One uniform per position: an example's logits (..., C) need noise of shape (...).
    return tuple(shape[:-1])


def _softmax_hessian_sqrt(outputs: torch.Tensor) -> torch.Tensor:
    # ∇²_z CE = diag(p) − ppᵀ = M Mᵀ with M = diag(√p) − p √pᵀ (since Σp = 1).
    p = torch.softmax(outputs.detach().double(), dim=-1)
    root = p.sqrt()
    return torch.diag_embed(root) - p[..., :, None] * root[..., None, :]


cross_entropy.sample_targets = _sample_categorical  # type: ignore[attr-defined]
cross_entropy.noise_shape = _categorical_noise_shape  # type: ignore[attr-defined]
cross_entropy.output_hessian_sqrt = _softmax_hessian_sqrt  # type: ignore[attr-defined]
cross_entropy.per_position = _cross_entropy_per_position  # type: ignore[attr-defined]


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Half the squared error, summed over output dimensions: ½‖f(x) − y‖².

    It defines ``sample_targets`` (y ~ N(f(x), I), for the true Fisher),
    ``output_hessian_sqrt`` (the identity, for the expected Fisher) and
    ``per_position`` (outputs (n, T, D): each position's ½‖z_t − y_t‖², weight 1).

    Parameters
    ----------
    outputs : tensor of shape (n, ...)
    targets : tensor with n × (the per-example size of ``outputs``) entries

    Returns
    -------
    tensor of shape (n,)

    Examples
    --------
    >>> import torch
    >>> from sourcekit.objectives import squared_error
    >>> squared_error(torch.tensor([[1.0, 0.0], [3.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    tensor([0.5000, 2.0000])
    """
    diff = outputs - targets.reshape(outputs.shape).to(outputs.dtype)
    return 0.5 * diff.pow(2).reshape(diff.shape[0], -1).sum(dim=1)


def _squared_error_per_position(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # The last axis is a position's output; the axes between the first and the last are
    # positions (none for (n, D) outputs: one position per example).
    diff = outputs - targets.reshape(outputs.shape).to(outputs.dtype)
    positions = 1 if diff.ndim < 3 else int(torch.tensor(diff.shape[1:-1]).prod())
    values = 0.5 * diff.pow(2).reshape(diff.shape[0], positions, -1).sum(dim=2)
    return values, torch.ones_like(values)


def _sample_gaussian(outputs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    # y ~ N(f(x), I): the predictive distribution of the squared-error loss.
    normal = torch.special.ndtri(uniforms.double().clamp(1e-12, 1 - 1e-12))
    return (outputs.detach().double() + normal).to(outputs.dtype)


def _identity_hessian_sqrt(outputs: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(outputs.shape[-1], dtype=torch.float64, device=outputs.device)
    return eye.expand(*outputs.shape, outputs.shape[-1])


squared_error.sample_targets = _sample_gaussian  # type: ignore[attr-defined]
squared_error.output_hessian_sqrt = _identity_hessian_sqrt  # type: ignore[attr-defined]
squared_error.per_position = _squared_error_per_position  # type: ignore[attr-defined]


def margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct-class margin: logit_y − logsumexp over the other classes.

    Positive when the model prefers the correct class; it is the default measurement for
    classification (the paper's). Sequence outputs are averaged over the positions
    whose target is not ``IGNORE_INDEX`` (-100). It equals log p_y − log(1 − p_y) for the softmax probability p_y of the correct class,
    so a margin of 0 means p_y = ½.

    Parameters
    ----------
    outputs : tensor of shape (n, C) or (n, T, C)
        Logits.
    targets : tensor of shape (n,) or (n, T)
        Class indices.

    Returns
    -------
    tensor of shape (n,)

    Examples
    --------
    >>> import torch
    >>> from sourcekit.objectives import margin
    >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    >>> margin(logits, torch.tensor([0, 0]))
    tensor([ 1.3069, -2.1269])
    >>> p = logits.softmax(dim=1)[0, 0]
    >>> round(float(torch.log(p / (1 - p))), 4)  # the same number, from the probability
    1.3069

    """
    logits, labels, positions = _flatten_positions(outputs, targets)
    labels = labels.long()
    _check_labels(labels, logits.shape[-1], positions)
    counted = labels != IGNORE_INDEX
    labels = torch.where(counted, labels, 0)
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    values = correct - torch.logsumexp(others, dim=1)
    weights = _class_position_weights(labels.masked_fill(~counted, IGNORE_INDEX), positions)
    values = values.masked_fill(~counted, 0.0).reshape(-1, positions)
    return (values * weights.to(values)).sum(dim=1)


def absolute_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Absolute error ‖f(x) − y‖₁ (regression measurement).

    Examples
    --------
    >>> import torch
    >>> from sourcekit.objectives import absolute_error
    >>> absolute_error(torch.tensor([[1.0, -1.0], [3.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    tensor([2., 2.])
    """
    diff = outputs - targets.reshape(outputs.shape).to(outputs.dtype)
    return diff.abs().reshape(diff.shape[0], -1).sum(dim=1)


def output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's scalar output itself (targets are ignored).

    For regression models with one output: the scores then explain the prediction.

    Raises
    ------
    ValueError
        If the model has more than one output per example.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.objectives import output
    >>> output(torch.tensor([[0.5], [-1.0]]), torch.zeros(2, 1))
    tensor([ 0.5000, -1.0000])
    """
    if outputs[0].numel() != 1:
        raise ValueError(
            "The 'output' measurement needs a scalar output per example; got outputs of "
            f"shape {tuple(outputs.shape)}. Use 'margin' for classifiers."
        )
    return outputs.reshape(outputs.shape[0])


LOSSES: dict[str, PerExample] = {
    "cross_entropy": cross_entropy,
    "squared_error": squared_error,
}
"""The built-in training losses, by the name ``loss=`` accepts."""
MEASUREMENTS: dict[str, PerExample] = {
    "margin": margin,
    "cross_entropy": cross_entropy,
    "squared_error": squared_error,
    "absolute_error": absolute_error,
    "output": output,
}
"""The built-in query measurements, by the name ``measurement=`` accepts."""


def resolve_function(spec: Any, registry: dict[str, PerExample], name: str) -> PerExample:
    """Turn a built-in name, an importable ``"module:qualname"`` or a callable into a callable.

    Parameters
    ----------
    spec : str or callable
        A key of ``registry``, ``"module:qualname"``, or a callable (returned as is).
    registry : dict
        :data:`LOSSES` or :data:`MEASUREMENTS`.
    name : str
        The parameter's name, for the error message.

    Raises
    ------
    ValueError
        If ``spec`` is none of these, or cannot be imported.

    Examples
    --------
    >>> from sourcekit.objectives import LOSSES, MEASUREMENTS, margin, resolve_function
    >>> resolve_function("margin", MEASUREMENTS, "measurement") is margin
    True
    >>> resolve_function("sourcekit.objectives:squared_error", LOSSES, "loss").__name__
    'squared_error'
    >>> resolve_function("hinge", LOSSES, "loss")
    Traceback (most recent call last):
    ...
    ValueError: The 'loss' parameter must be one of 'cross_entropy', 'squared_error', an importable 'module:function' string, or a callable (outputs, targets) -> per-example tensor; got 'hinge'.
    """
    if callable(spec):
        return spec
    if isinstance(spec, str):
        if spec in registry:
            return registry[spec]
        if ":" in spec:
            try:
                obj = import_object(spec)
            except LookupError as err:
                raise ValueError(
                    f"The {name!r} function {spec!r} cannot be imported ({err}). Make the "
                    "module importable (installed or on sys.path) or pass the callable."
                ) from err
            if not callable(obj):
                raise ValueError(f"The {name!r} function {spec!r} is not callable.")
            return obj
    allowed = ", ".join(repr(k) for k in registry)
    raise ValueError(
        f"The {name!r} parameter must be one of {allowed}, an importable 'module:function' "
        f"string, or a callable (outputs, targets) -> per-example tensor; got {spec!r}."
    )


def function_spec(fn: Any, registry: dict[str, PerExample]) -> str | None:
    """A string that names ``fn`` in a saved manifest, or None if it has no importable name.

    Examples
    --------
    >>> from sourcekit.objectives import MEASUREMENTS, function_spec, margin
    >>> function_spec(margin, MEASUREMENTS)
    'margin'
    >>> function_spec(lambda outputs, targets: outputs[:, 0], MEASUREMENTS) is None
    True
    """

    if isinstance(fn, str):
        return fn
    for key, value in registry.items():
        if value is fn:
            return key
    return importable_name(fn)
