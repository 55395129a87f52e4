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

__all__ = [
    "OptimizerSpec",
    "initial_state",
    "optimizer_step",
    "state_from_checkpoint",
    "update_magnitude",
]

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
    def from_torch(
        cls, optimizer: torch.optim.Optimizer, group: int | None = None
    ) -> OptimizerSpec:
        """Describe a ``torch.optim`` optimiser; raise for settings replay cannot follow.

        With ``group=None`` every parameter group must share its settings (the first
        group's are returned); with ``group=i`` the settings of group ``i`` are.
        """
        name = type(optimizer).__name__
        groups = optimizer.param_groups
        if group is None:
            keys = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps")
            first = {k: groups[0].get(k) for k in keys}
            for g in groups[1:]:
                if any(g.get(k) != first[k] for k in keys):
                    raise TrajectoryError(
                        f"The optimizer has {len(groups)} parameter groups with different "
                        "hyperparameters; describe one group at a time with "
                        "OptimizerSpec.from_torch(optimizer, group=i)."
                    )
        settings = groups[0 if group is None else group]
        for flag in ("maximize", "amsgrad", "capturable", "differentiable"):
            if settings.get(flag):
                raise TrajectoryError(
                    f"The optimizer uses {flag}=True, which sourcekit cannot replay. "
                    f"Train with {name}({flag}=False)."
                )
        # The base learning rate: a scheduler's starting value (a warm-up may start at 0).
        lr = float(settings.get("initial_lr", settings["lr"]))
        if lr <= 0:  # the rate of every step is recorded; the base must only be positive
            lr = 1.0
        if isinstance(optimizer, torch.optim.SGD):
            return cls(
                "sgd",
                lr=lr,
                momentum=float(settings["momentum"]),
                dampening=float(settings["dampening"]),
                nesterov=bool(settings["nesterov"]),
                weight_decay=float(settings["weight_decay"]),
            )
        if isinstance(optimizer, torch.optim.AdamW):
            kind = "adamw"
        elif isinstance(optimizer, torch.optim.Adam):
            kind = "adamw" if settings.get("decoupled_weight_decay") else "adam"
        else:
            raise TrajectoryError(
                f"The optimizer is a {name}; sourcekit records torch.optim.SGD, Adam and AdamW. "
                "Train with one of those."
            )
        return cls(
            kind,
            lr=lr,
            weight_decay=float(settings["weight_decay"]),
            betas=(float(settings["betas"][0]), float(settings["betas"][1])),
            eps=float(settings["eps"]),
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


def state_from_checkpoint(spec: OptimizerSpec, saved: dict[str, Any]) -> dict[str, Any]:
    """The replay state ``{"step", "buffers"}`` of an optimiser state kept in a checkpoint.

    ``saved`` is :attr:`Checkpoint.optimizer`: ``"momentum_buffer"`` by parameter name for
    SGD, ``"step"``, ``"exp_avg"`` and ``"exp_avg_sq"`` for Adam and AdamW; empty before
    the stage's first update.
    """
    if not saved:
        return initial_state(spec)
    if spec.kind == "sgd":
        return {
            "step": int(saved.get("step", 0)),
            "buffers": dict(saved.get("momentum_buffer", {})),
        }
    first, second = saved.get("exp_avg", {}), saved.get("exp_avg_sq", {})
    return {
        "step": int(saved.get("step", 0)),
        "buffers": {name: (first[name], second[name]) for name in first},
    }


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


def update_magnitude(
    spec: OptimizerSpec,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    state: dict[str, Any],
    lr: float,
) -> dict[str, torch.Tensor]:
    """Per entry, the sum of the magnitudes of the terms that form one update.

    The same formulas as :func:`optimizer_step` with every term taken by its absolute
    value, so that an update computed in floating point with unit roundoff u (by
    ``torch.optim``, a few operations per entry) is within a small multiple of u times
    this magnitude of the exact one: |θ| + η(|g| + λ|θ| + β|b|) (SGD, Nesterov adding
    its look-ahead), or |θ|(1 + ηλ_w) + (η/(1 − β₁ᵗ)) (β₁|m| + (1 − β₁)(|g| + λ|θ|)) /
    (√v̂ + ε) (Adam, AdamW's decoupled λ_w). Cancellations between the terms (a momentum
    buffer against the new gradient) do not shrink it, as they do not shrink the
    rounding errors.
    """
    step = state["step"] + 1
    buffers = state["buffers"]
    out = {}
    for name, theta in params.items():
        a_theta, g = theta.abs(), grads[name]
        a_g = g.abs()
        if spec.kind == "sgd":
            decayed = a_g + spec.weight_decay * a_theta
            total = decayed
            if spec.momentum:
                buf = buffers.get(name)
                held = torch.zeros_like(a_g) if buf is None else spec.momentum * buf.abs()
                total = held + decayed
                if spec.nesterov:
                    total = decayed + spec.momentum * total
            out[name] = a_theta + lr * total
            continue
        beta1, beta2 = spec.betas
        coupled = spec.kind == "adam" and spec.weight_decay
        decayed = a_g + spec.weight_decay * a_theta if coupled else a_g
        m, v = buffers.get(name, (None, None))
        held = torch.zeros_like(a_g) if m is None else beta1 * m.abs()
        g2 = (g + spec.weight_decay * theta) ** 2 if coupled else g * g
        v_new = (1 - beta2) * g2 if v is None else beta2 * v + (1 - beta2) * g2
        denom = _safe_sqrt(v_new) / (1 - beta2**step) ** 0.5 + spec.eps
        shrink = lr * spec.weight_decay * a_theta if spec.kind == "adamw" else 0.0
        out[name] = (
            a_theta + shrink + (lr / (1 - beta1**step)) * (held + (1 - beta1) * decayed) / denom
        )
    return out
