"""The optimiser of a recorded stage: its description and a functional replay.

``OptimizerSpec`` describes SGD (momentum, dampening, Nesterov, weight decay), Adam and
AdamW exactly as ``torch.optim`` implements them. ``optimizer_step`` replays one update
out of place, so that autograd can differentiate through a whole recorded run
(exact unrolling) and the same update can retrain a recipe on a subset of the data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..exceptions import TrajectoryError

__all__ = ["OptimizerSpec", "initial_state", "optimizer_step"]

_KINDS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerSpec:
    """How parameters are updated in one stage of training.

    Parameters
    ----------
    kind : {"sgd", "adam", "adamw"}, default="sgd"
        The update rule, as in ``torch.optim.SGD``, ``torch.optim.Adam`` and
        ``torch.optim.AdamW``.
    lr : float, default=0.1
        Base learning rate. The learning rate actually used at every step is recorded
        in the trajectory's schedule; this value is the one a retraining starts from.
    momentum : float, default=0.0
        SGD's heavy-ball coefficient β.
    dampening : float, default=0.0
        SGD's dampening d of the momentum buffer.
    nesterov : bool, default=False
        SGD's Nesterov variant.
    weight_decay : float, default=0.0
        L2 penalty (coupled, for SGD and Adam) or decoupled decay (AdamW).
    betas : tuple of float, default=(0.9, 0.999)
        Adam's moment coefficients (β₁, β₂).
    eps : float, default=1e-8
        Adam's denominator guard ε.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import OptimizerSpec
    >>> spec = OptimizerSpec("sgd", lr=0.1, momentum=0.9)
    >>> spec.effective_lr_factor  # the long-run step is 1/(1 - β) times the learning rate
    10.000000000000002
    >>> optimizer = spec.build(torch.nn.Linear(3, 2).parameters())  # a torch.optim.SGD
    >>> optimizer.defaults["lr"], optimizer.defaults["momentum"]
    (0.1, 0.9)

    >>> OptimizerSpec.from_torch(torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3))
    OptimizerSpec(kind='adam', lr=0.001, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-08)
    """

    kind: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = field(default=(0.9, 0.999))
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(
                f"The 'kind' parameter of OptimizerSpec must be one of {_KINDS}; got "
                f"{self.kind!r}. Record SGD, Adam or AdamW runs."
            )
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        checks = [
            ("lr", self.lr, self.lr > 0, "a float > 0"),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "a float in [0, 1)"),
            ("dampening", self.dampening, 0 <= self.dampening < 1, "a float in [0, 1)"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "a float >= 0"),
            ("eps", self.eps, self.eps >= 0, "a float >= 0"),
            (
                "betas",
                self.betas,
                len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                "two floats in [0, 1)",
            ),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(
                    f"The {name!r} parameter of OptimizerSpec must be {allowed}; got {value!r}."
                )
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "OptimizerSpec(nesterov=True) needs momentum > 0 and dampening == 0, as in "
                f"torch.optim.SGD; got momentum={self.momentum}, dampening={self.dampening}."
            )

    @property
    def is_adaptive(self) -> bool:
        """True for Adam and AdamW."""
        return self.kind in ("adam", "adamw")

    @property
    def effective_lr_factor(self) -> float:
        """Factor turning a step's learning rate into its long-run effective step.

        Heavy-ball momentum β with dampening d accumulates (1 − d)/(1 − β) times the
        gradient; Adam's first moment is an average, so its factor is 1.
        """
        if self.kind == "sgd" and self.momentum > 0:
            return (1.0 - self.dampening) / (1.0 - self.momentum)
        return 1.0

    # --- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizerSpec:
        data = dict(data)
        data["betas"] = tuple(data.get("betas", (0.9, 0.999)))
        return cls(**data)

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer) -> OptimizerSpec:
        """Describe a ``torch.optim`` optimiser; raise for settings replay cannot follow."""
        name = type(optimizer).__name__
        groups = optimizer.param_groups
        keys = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps")
        first = {k: groups[0].get(k) for k in keys}
        for g in groups[1:]:
            if any(g.get(k) != first[k] for k in keys):
                raise TrajectoryError(
                    f"The optimizer has {len(groups)} parameter groups with different "
                    "hyperparameters; sourcekit records one setting per stage. Use a single "
                    "parameter group (the learning rate may follow a schedule)."
                )
        group = groups[0]
        for flag in ("maximize", "amsgrad", "capturable", "differentiable"):
            if group.get(flag):
                raise TrajectoryError(
                    f"The optimizer uses {flag}=True, which sourcekit cannot replay. "
                    f"Train with {name}({flag}=False)."
                )
        # The base learning rate: a scheduler's starting value (a warm-up may start at 0).
        lr = float(group.get("initial_lr", group["lr"]))
        if isinstance(optimizer, torch.optim.SGD):
            return cls(
                "sgd",
                lr=lr,
                momentum=float(group["momentum"]),
                dampening=float(group["dampening"]),
                nesterov=bool(group["nesterov"]),
                weight_decay=float(group["weight_decay"]),
            )
        if isinstance(optimizer, torch.optim.AdamW):
            kind = "adamw"
        elif isinstance(optimizer, torch.optim.Adam):
            kind = "adamw" if group.get("decoupled_weight_decay") else "adam"
        else:
            raise TrajectoryError(
                f"The optimizer is a {name}; sourcekit records torch.optim.SGD, Adam and AdamW. "
                "Train with one of those."
            )
        return cls(
            kind,
            lr=lr,
            weight_decay=float(group["weight_decay"]),
            betas=(float(group["betas"][0]), float(group["betas"][1])),
            eps=float(group["eps"]),
        )

    def build(self, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        """Create the matching ``torch.optim`` optimiser."""
        lr = self.lr if lr is None else lr
        if self.kind == "sgd":
            return torch.optim.SGD(
                params,
                lr=lr,
                momentum=self.momentum,
                dampening=self.dampening,
                nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
        cls = torch.optim.AdamW if self.kind == "adamw" else torch.optim.Adam
        return cls(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


def initial_state(spec: OptimizerSpec) -> dict[str, Any]:
    """The optimiser state at the start of a stage (nothing accumulated yet)."""
    return {"step": 0, "buffers": {}}


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0; where the second moment is exactly zero
    # (a parameter that never received a gradient) the derivative is taken as zero.
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0 * x)


def optimizer_step(
    spec: OptimizerSpec,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    state: dict[str, Any],
    lr: float,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One optimiser update, out of place and differentiable.

    Follows ``torch.optim``'s single-tensor implementations:

    - SGD: g ← g + λθ; b ← g (first step) or βb + (1 − d)g; θ ← θ − η(g + βb if Nesterov
      else b).
    - Adam: g ← g + λθ; AdamW: θ ← (1 − ηλ)θ. Then m ← β₁m + (1 − β₁)g,
      v ← β₂v + (1 − β₂)g², θ ← θ − (η / (1 − β₁ᵗ)) m / (√v / √(1 − β₂ᵗ) + ε).

    Returns the new parameters and the new state; the inputs are not modified.

    Parameters
    ----------
    spec : OptimizerSpec
        The update rule and its hyperparameters (its ``lr`` is not used).
    params : dict of str to tensor
        θ, by parameter name.
    grads : dict of str to tensor
        The gradient of the mean batch loss for each parameter.
    state : dict
        ``{"step": t, "buffers": {...}}``: the number of updates made so far and the
        accumulated buffers by parameter name; ``{"step": 0, "buffers": {}}`` at the
        start of a stage.
    lr : float
        The learning rate η of this step.

    Returns
    -------
    params : dict of str to tensor
    state : dict

    Examples
    --------
    Two steps of SGD with momentum 0.9 on a constant gradient: the momentum buffer
    grows from g to 1.9 g.

    >>> import torch
    >>> from sourcekit.trajectory import OptimizerSpec, optimizer_step
    >>> spec = OptimizerSpec("sgd", momentum=0.9)
    >>> params, state = {"w": torch.tensor([1.0, -2.0])}, {"step": 0, "buffers": {}}
    >>> for _ in range(2):
    ...     params, state = optimizer_step(spec, params, {"w": torch.ones(2)}, state, lr=0.1)
    >>> params["w"], state["step"]
    (tensor([ 0.7100, -2.2900]), 2)
    """

    step = state["step"] + 1
    buffers = state["buffers"]
    new_params: dict[str, torch.Tensor] = {}
    new_buffers: dict[str, Any] = {}
    for name, theta in params.items():
        g = grads[name]
        if spec.kind == "sgd":
            if spec.weight_decay:
                g = g + spec.weight_decay * theta
            if spec.momentum:
                buf = buffers.get(name)
                buf = g if buf is None else spec.momentum * buf + (1 - spec.dampening) * g
                new_buffers[name] = buf
                g = g + spec.momentum * buf if spec.nesterov else buf
            new_params[name] = theta - lr * g
            continue
        beta1, beta2 = spec.betas
        if spec.weight_decay:
            if spec.kind == "adamw":
                theta = theta * (1 - lr * spec.weight_decay)
            else:
                g = g + spec.weight_decay * theta
        m, v = buffers.get(name, (None, None))
        m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
        v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
        new_buffers[name] = (m, v)
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = _safe_sqrt(v) / (bias2**0.5) + spec.eps
        new_params[name] = theta - (lr / bias1) * m / denom
    return new_params, {"step": step, "buffers": new_buffers}
