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
  position per example. The weights may differ from 1 with one position too (a
  class-weighted cross-entropy weighs each example by its class's weight).
- ``loss.fisher_loss``: the loss whose gradients at targets drawn by
  ``sample_targets`` have the curvature of ``per_position``'s values as their
  covariance, when that is not the loss itself (a label-smoothed or class-weighted
  cross-entropy names the plain one: drawn labels must not be smoothed).
- ``loss.class_targets = True``: the targets are class indices; floating targets with
  a fractional part are refused rather than truncated.

Built-in losses match ``torch.nn.functional``'s per-example losses: ``"cross_entropy"``
is ``F.cross_entropy(..., reduction="none")``, ``"mse_loss"`` is ``F.mse_loss``'s mean of
squares over each example's outputs, :class:`CrossEntropy` adds torch's class weights and
label smoothing; ``"squared_error"`` is one half of the summed square (its gradient is the
residual). ``torch.nn.CrossEntropyLoss`` and ``torch.nn.MSELoss`` objects given as
``loss=`` are read as the matching built-in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._imports import import_object, importable_name

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "MEASUREMENTS",
    "CrossEntropy",
    "absolute_error",
    "check_class_targets",
    "cross_entropy",
    "function_spec",
    "margin",
    "mse_loss",
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
cross_entropy.class_targets = True  # type: ignore[attr-defined]


class CrossEntropy:
    """Cross-entropy with torch's class weights and label smoothing, one value per example.

    ``CrossEntropy(weight=w, label_smoothing=ε)(outputs, targets)`` is
    ``F.cross_entropy(outputs, targets, weight=w, label_smoothing=ε, reduction="none")``
    per position, averaged over each example's counted positions (targets other than
    ``IGNORE_INDEX``) like :func:`cross_entropy`. The loop must minimise its batch mean:
    ``F.cross_entropy(..., reduction="none").mean()``, or torch's default ``"mean"``
    reduction when there are no class weights (with class weights torch's ``"mean"``
    divides by the batch's total weight, a different objective that the recorder's
    self-check refuses).

    The curvature reads it as the plain cross-entropy weighted per position: the Hessian of
    each position's loss with respect to its logits is κ (diag p − p pᵀ), with
    κ = (1 − ε) w_y + (ε/C) Σ_k w_k, so ``per_position`` returns the loss divided by κ
    with the weight κ/T, and Fisher labels are drawn and scored with the plain
    cross-entropy (``fisher_loss``): smoothing the drawn labels would bias the Fisher.

    Parameters
    ----------
    weight : sequence of float, optional
        A weight per class (torch's ``weight``); None weighs every class 1.
    label_smoothing : float, default=0.0
        torch's ``label_smoothing``, in [0, 1].

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from sourcekit.objectives import CrossEntropy
    >>> loss = CrossEntropy(weight=[1.0, 2.0, 0.5], label_smoothing=0.1)
    >>> logits, labels = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1])
    >>> loss(logits, labels)
    tensor([0.4102, 0.5591])
    >>> F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 2.0, 0.5]),
    ...                 label_smoothing=0.1, reduction="none")
    tensor([0.4102, 0.5591])
    >>> loss
    CrossEntropy(weight=[1.0, 2.0, 0.5], label_smoothing=0.1)
    """

    class_targets = True

    def __init__(self, weight: Any = None, label_smoothing: float = 0.0) -> None:
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
            raise TypeError(
                "The 'label_smoothing' parameter of CrossEntropy must be a float in [0, 1]; got "
                f"{label_smoothing!r}."
            )
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(
                "The 'label_smoothing' parameter of CrossEntropy must be a float in [0, 1]; got "
                f"{label_smoothing!r}."
            )
        self.label_smoothing = float(label_smoothing)
        self.weight: tuple[float, ...] | None = None
        if weight is not None:
            values = np.asarray(
                weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else weight,
                dtype=np.float64,
            )
            if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
                raise ValueError(
                    "The 'weight' parameter of CrossEntropy must be a non-empty 1-d sequence of "
                    f"finite floats, one per class; got {weight!r}."
                )
            if np.any(values < 0):
                raise ValueError(
                    f"The 'weight' parameter of CrossEntropy must be >= 0 for every class; got "
                    f"{values[values < 0][0]} for class {int(np.flatnonzero(values < 0)[0])}."
                )
            self.weight = tuple(float(v) for v in values)

    # --- the loss ------------------------------------------------------------------
    def _weight(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.weight is None:
            return None
        if like.shape[-1] != len(self.weight):
            raise ValueError(
                f"CrossEntropy has {len(self.weight)} class weights but the model has "
                f"{like.shape[-1]} outputs per position; give one weight per class."
            )
        return torch.tensor(self.weight, dtype=like.dtype, device=like.device)

    def _positions(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each position's torch loss (n, T), its mean weight 1/T_counted, and its labels."""
        logits, labels, positions = _flatten_positions(outputs, targets)
        labels = labels.long()
        _check_labels(labels, logits.shape[-1], positions)
        values = F.cross_entropy(
            logits,
            labels,
            weight=self._weight(logits),
            label_smoothing=self.label_smoothing,
            reduction="none",
            ignore_index=IGNORE_INDEX,
        )
        weights = _class_position_weights(labels, positions).to(values)
        return values.reshape(-1, positions), weights, labels.reshape(-1, positions)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        values, weights, _ = self._positions(outputs, targets)
        return (values * weights).sum(dim=1)

    def curvature_scale(self, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
        """κ = (1 − ε) w_y + (ε/C) Σ_k w_k per label: the loss's Hessian is κ (diag p − ppᵀ)."""
        eps = self.label_smoothing
        if self.weight is None:
            return torch.ones(labels.shape, dtype=torch.float64, device=labels.device)
        w = torch.tensor(self.weight, dtype=torch.float64, device=labels.device)
        own = w[labels.clamp(0, n_classes - 1)]
        return (1 - eps) * own + eps * w.mean()

    def per_position(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓ, w) with L = Σ_t w_t ℓ_t, ℓ_t = L_t/κ_t and w_t = κ_t/T_counted."""
        values, weights, labels = self._positions(outputs, targets)
        kappa = self.curvature_scale(labels, outputs.shape[-1]).to(values)
        scaled = torch.where(kappa > 0, values / torch.where(kappa > 0, kappa, 1.0), 0.0)
        return scaled, weights * kappa

    sample_targets = staticmethod(_sample_categorical)
    noise_shape = staticmethod(_categorical_noise_shape)
    output_hessian_sqrt = staticmethod(_softmax_hessian_sqrt)

    @property
    def fisher_loss(self) -> Callable:
        """The plain cross-entropy: drawn Fisher labels are scored without smoothing."""
        return cross_entropy

    # --- naming ----------------------------------------------------------------------
    def spec(self) -> dict[str, Any] | str:
        """A JSON description for a saved manifest (``"cross_entropy"`` with the defaults)."""
        if self.weight is None and self.label_smoothing == 0.0:
            return "cross_entropy"
        out: dict[str, Any] = {"name": "cross_entropy"}
        if self.weight is not None:
            out["weight"] = list(self.weight)
        if self.label_smoothing:
            out["label_smoothing"] = self.label_smoothing
        return out

    def __repr__(self) -> str:
        parts = []
        if self.weight is not None:
            parts.append(f"weight={list(self.weight)}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing:g}")
        return f"CrossEntropy({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, CrossEntropy)
            and other.weight == self.weight
            and other.label_smoothing == self.label_smoothing
        )

    def __hash__(self) -> int:
        return hash((CrossEntropy, self.weight, self.label_smoothing))


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


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over each example's outputs: mean (f(x) − y)², as ``F.mse_loss``.

    Its batch mean is ``F.mse_loss(outputs, targets)`` with torch's default reduction
    (examples with equally many outputs), so a loop that minimises ``F.mse_loss`` is
    recorded with ``loss="mse_loss"``. Its Hessian with respect to a position's D
    outputs is (2/(T·D)) I for T positions: ``per_position`` returns ½‖z_t − y_t‖² with
    the weight 2/(T·D), ``sample_targets`` draws y ~ N(f(x), I) and
    ``output_hessian_sqrt`` is the identity, as for :func:`squared_error`.

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
    >>> import torch.nn.functional as F
    >>> from sourcekit.objectives import mse_loss
    >>> outputs, targets = torch.tensor([[1.0, 0.0], [3.0, 1.0]]), torch.zeros(2, 2)
    >>> mse_loss(outputs, targets)
    tensor([0.5000, 5.0000])
    >>> mse_loss(outputs, targets).mean(), F.mse_loss(outputs, targets)
    (tensor(2.7500), tensor(2.7500))
    """
    diff = outputs - targets.reshape(outputs.shape).to(outputs.dtype)
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def _mse_per_position(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    values, _ = _squared_error_per_position(outputs, targets)
    per_example = outputs[0].numel() if outputs.ndim > 1 else 1
    return values, torch.full_like(values, 2.0 / per_example)


mse_loss.sample_targets = _sample_gaussian  # type: ignore[attr-defined]
mse_loss.output_hessian_sqrt = _identity_hessian_sqrt  # type: ignore[attr-defined]
mse_loss.per_position = _mse_per_position  # type: ignore[attr-defined]


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


margin.class_targets = True  # type: ignore[attr-defined]


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
    "mse_loss": mse_loss,
    "squared_error": squared_error,
}
"""The built-in training losses, by the name ``loss=`` accepts."""
MEASUREMENTS: dict[str, PerExample] = {
    "margin": margin,
    "cross_entropy": cross_entropy,
    "mse_loss": mse_loss,
    "squared_error": squared_error,
    "absolute_error": absolute_error,
    "output": output,
}
"""The built-in query measurements, by the name ``measurement=`` accepts."""


def _from_torch_module(module: nn.Module, name: str) -> PerExample:
    """The built-in matching a ``torch.nn`` loss object, or a ValueError saying why none does."""
    reduction = getattr(module, "reduction", "mean")
    kind = type(module).__name__
    if reduction == "sum":
        raise ValueError(
            f"The {name!r} is a {kind}(reduction='sum'): its gradient is the batch size times the "
            "mean's, while sourcekit's objective is the batch mean. Train with reduction='mean' "
            "(or 'none' followed by .mean())."
        )
    if isinstance(module, nn.MSELoss):
        return mse_loss
    settings: Any = module  # an nn.CrossEntropyLoss: its attributes are plain values
    if int(settings.ignore_index) != IGNORE_INDEX:
        raise ValueError(
            f"The {name!r} is a {kind} with ignore_index={settings.ignore_index}; sourcekit's "
            f"losses and measurements skip targets equal to {IGNORE_INDEX} (torch's default). "
            f"Mark ignored positions with {IGNORE_INDEX}."
        )
    weight = settings.weight
    if weight is not None and reduction == "mean":
        raise ValueError(
            f"The {name!r} is a {kind} with class weights and reduction='mean', which divides "
            "each batch's loss by the batch's total class weight: an example's weight in the "
            "objective then depends on the rest of its batch. sourcekit's objective is the mean "
            "over examples: train with F.cross_entropy(outputs, targets, weight=w, "
            "reduction='none').mean() and pass loss=CrossEntropy(weight=w)."
        )
    return CrossEntropy(weight=weight, label_smoothing=float(settings.label_smoothing))


_PARAMETERISED = {"cross_entropy": CrossEntropy}


def resolve_function(spec: Any, registry: dict[str, PerExample], name: str) -> PerExample:
    """Turn a built-in name, an importable ``"module:qualname"`` or a callable into a callable.

    Parameters
    ----------
    spec : str, dict or callable
        A key of ``registry``, ``"module:qualname"``, a description of a parameterised
        built-in (``{"name": "cross_entropy", "label_smoothing": 0.1}``, what a saved
        manifest holds for a :class:`CrossEntropy`), a ``torch.nn.CrossEntropyLoss`` or
        ``torch.nn.MSELoss`` object (read as the matching built-in), or a callable
        (returned as is).
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
    >>> import torch
    >>> from sourcekit.objectives import LOSSES, MEASUREMENTS, margin, resolve_function
    >>> resolve_function("margin", MEASUREMENTS, "measurement") is margin
    True
    >>> resolve_function("sourcekit.objectives:squared_error", LOSSES, "loss").__name__
    'squared_error'
    >>> resolve_function(torch.nn.CrossEntropyLoss(label_smoothing=0.1), LOSSES, "loss")
    CrossEntropy(label_smoothing=0.1)
    >>> resolve_function(torch.nn.MSELoss(), LOSSES, "loss").__name__
    'mse_loss'
    >>> resolve_function("hinge", LOSSES, "loss")
    Traceback (most recent call last):
    ...
    ValueError: The 'loss' parameter must be one of 'cross_entropy', 'mse_loss', 'squared_error', an importable 'module:function' string, or a callable (outputs, targets) -> per-example tensor; got 'hinge'.
    """
    if isinstance(spec, (nn.CrossEntropyLoss, nn.MSELoss)):
        return _from_torch_module(spec, name)
    if callable(spec):
        return spec
    if isinstance(spec, dict) and spec.get("name") in _PARAMETERISED:
        options = {k: v for k, v in spec.items() if k != "name"}
        try:
            return _PARAMETERISED[spec["name"]](**options)
        except TypeError as err:
            raise ValueError(f"The {name!r} description {spec!r} is malformed ({err}).") from err
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


def function_spec(fn: Any, registry: dict[str, PerExample]) -> str | dict[str, Any] | None:
    """What names ``fn`` in a saved manifest, or None if it has no importable name.

    A string (a built-in's name or ``"module:qualname"``), or for a parameterised
    built-in such as :class:`CrossEntropy` a JSON description that
    :func:`resolve_function` reads back.

    Examples
    --------
    >>> from sourcekit.objectives import MEASUREMENTS, CrossEntropy, function_spec, margin
    >>> function_spec(margin, MEASUREMENTS)
    'margin'
    >>> function_spec(CrossEntropy(label_smoothing=0.1), MEASUREMENTS)
    {'name': 'cross_entropy', 'label_smoothing': 0.1}
    >>> function_spec(lambda outputs, targets: outputs[:, 0], MEASUREMENTS) is None
    True
    """

    if isinstance(fn, (str, dict)):
        return fn
    if isinstance(fn, (nn.CrossEntropyLoss, nn.MSELoss)):
        fn = _from_torch_module(fn, "loss")
    if isinstance(fn, CrossEntropy):
        return fn.spec()
    for key, value in registry.items():
        if value is fn:
            return key
    return importable_name(fn)


def check_class_targets(fn: Any, targets: torch.Tensor, what: str) -> None:
    """Refuse floating class targets with a fractional part (they would be truncated).

    ``fn`` is a loss or measurement; only those with ``class_targets = True`` (the
    cross-entropies and the margin) read their targets as class indices.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.objectives import check_class_targets, cross_entropy
    >>> check_class_targets(cross_entropy, torch.tensor([0.0, 2.0]), "training targets")
    >>> check_class_targets(cross_entropy, torch.tensor([0.0, 2.5]), "training targets")
    Traceback (most recent call last):
    ...
    ValueError: The training targets are class indices for this loss or measurement, but target 1 is 2.5, which is not an integer (it would be truncated). Pass integer class labels (targets.long() after checking them).
    """
    if not getattr(fn, "class_targets", False) or not targets.is_floating_point():
        return
    fractional = targets != torch.round(targets)
    if bool(fractional.any()):
        flat = fractional.reshape(targets.shape[0], -1).any(dim=1) if targets.ndim else fractional
        index = int(torch.nonzero(flat)[0, 0]) if targets.ndim else 0
        value = targets[index] if targets.ndim else targets
        shown = (
            float(value.reshape(-1)[fractional[index].reshape(-1)][0])
            if targets.ndim
            else float(value)
        )
        raise ValueError(
            f"The {what} are class indices for this loss or measurement, but target {index} is "
            f"{shown!r}, which is not an integer (it would be truncated). Pass integer class "
            "labels (targets.long() after checking them)."
        )
