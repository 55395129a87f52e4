"""The registry of tiny, seeded training runs shared by every test file.

Each case is a small problem (a linear regression or a tanh MLP classifier) trained by
:func:`sourcekit.train` with a fixed recipe, so that its trajectory is deterministic,
records in a few milliseconds and can be saved (the model factories are importable as
``tests._cases:make_...``).

Usage::

    from tests import _cases

    trajectory = _cases.trajectory("mlp_adam")  # cached: do not modify it
    fresh = _cases.record("mlp_adam")  # a new recording
    queries = _cases.queries("mlp_adam")
    no_batches = _cases.rebuild(trajectory, batches=None)  # a variant of a recording

Cases
-----
linear_gd
    ``nn.Linear(3, 1)``, loss ``"squared_error"``, measurement ``"output"``, full-batch
    gradient descent with a linearly decaying learning rate (the setting of the closed
    form in METHOD.md section 3).
linear_sgd
    The same model with minibatches of 3 out of 8 (the last batch of each epoch is
    smaller).
mlp_sgd, mlp_momentum, mlp_nesterov, mlp_adam, mlp_adamw
    A 3-5-3 tanh MLP, cross-entropy loss, margin measurement, minibatches of 4 out of
    12, trained with plain SGD, SGD with heavy-ball momentum and weight decay (cosine
    schedule), Nesterov momentum, Adam (with L2 weight decay) and AdamW.
mlp_two_stage
    Pretraining on examples 0..7 with SGD and momentum, then fine-tuning on examples
    4..11 with Adam: examples 0..3 belong to the first stage only, 8..11 to the second
    only, 4..7 to both.
mlp_dict, mlp_tuple
    Models called with several inputs: ``model(features=..., mask=...)`` (a dict of
    inputs, :class:`MaskedMLP`) and ``model(a, b)`` (a tuple, :class:`TwoTowerMLP`),
    trained with SGD and momentum like ``mlp_sgd``.

Besides the registry, :func:`stationary_run` builds full-batch runs that start at a
stationary point of every stage's update rule, so that curvature, per-example gradients
and Adam's moments are constant along the whole run (the regime in which SOURCE's
discrete form must equal exact unrolling).

Each stage keeps 3 checkpoints for attribution, at the midpoints of equal step intervals
(steps 1, 4, 7 of the 9-step MLP runs). Every loss and measurement above is smooth in the
parameters (tanh, not ReLU), so the cases can be checked against finite differences.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

import sourcekit
from sourcekit import Examples, OptimizerSpec, TrainingStage, Trajectory

__all__ = [
    "CASES",
    "CASE_NAMES",
    "MLP_CASES",
    "Case",
    "arguments",
    "classification_data",
    "make_batchnorm_mlp",
    "make_dict_mlp",
    "make_dropout_mlp",
    "make_linear",
    "make_tanh_mlp",
    "make_tuple_mlp",
    "queries",
    "rebuild",
    "record",
    "regression_data",
    "stationary_run",
    "train_examples",
    "trajectory",
]

N_FEATURES = 3
N_CLASSES = 3
HIDDEN = 5


# --- model factories (importable, so trajectories can be saved) -----------------------
def make_linear(n_features: int = N_FEATURES, n_outputs: int = 1) -> nn.Linear:
    """A linear model (regression)."""
    return nn.Linear(n_features, n_outputs)


def make_tanh_mlp(
    n_features: int = N_FEATURES, hidden: int = HIDDEN, n_classes: int = N_CLASSES
) -> nn.Sequential:
    """A one-hidden-layer tanh classifier: smooth, so finite differences apply."""
    return nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))


def make_batchnorm_mlp(n_features: int = N_FEATURES, n_classes: int = N_CLASSES) -> nn.Sequential:
    """A classifier with batch normalisation: buffers that change during training."""
    return nn.Sequential(
        nn.Linear(n_features, HIDDEN),
        nn.BatchNorm1d(HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, n_classes),
    )


def make_dropout_mlp(
    n_features: int = N_FEATURES, hidden: int = HIDDEN, n_classes: int = N_CLASSES, p: float = 0.3
) -> nn.Sequential:
    """The tanh classifier with dropout after its hidden layer: a random forward pass."""
    return nn.Sequential(
        nn.Linear(n_features, hidden), nn.Tanh(), nn.Dropout(p), nn.Linear(hidden, n_classes)
    )


class MaskedMLP(nn.Module):
    """The tanh classifier called with keyword inputs: ``features`` times a 0/1 ``mask``."""

    def __init__(
        self, n_features: int = N_FEATURES, hidden: int = HIDDEN, n_classes: int = N_CLASSES
    ) -> None:
        super().__init__()
        self.body = nn.Linear(n_features, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(features * mask)))


class TwoTowerMLP(nn.Module):
    """A classifier called with two positional inputs, each through a layer of its own."""

    def __init__(
        self, n_features: int = N_FEATURES, hidden: int = HIDDEN, n_classes: int = N_CLASSES
    ) -> None:
        super().__init__()
        self.left = nn.Linear(n_features, hidden)
        self.right = nn.Linear(2, hidden, bias=False)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.left(a) + self.right(b)))


def make_dict_mlp() -> MaskedMLP:
    """:class:`MaskedMLP`: inputs given as a dict."""
    return MaskedMLP()


def make_tuple_mlp() -> TwoTowerMLP:
    """:class:`TwoTowerMLP`: inputs given as a tuple."""
    return TwoTowerMLP()


# --- data ---------------------------------------------------------------------------------
def regression_data(n: int, seed: int, n_features: int = N_FEATURES) -> Examples:
    """Gaussian inputs and noisy targets of a fixed linear teacher, shape (n, 1)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.linspace(-1.0, 1.0, n_features)
    x = torch.randn(n, n_features, generator=g)
    y = x @ teacher + 0.5 + 0.1 * torch.randn(n, generator=g)
    return Examples(x, y[:, None])


def classification_data(
    n: int, seed: int, n_features: int = N_FEATURES, n_classes: int = N_CLASSES
) -> Examples:
    """Gaussian inputs labelled by a fixed linear teacher, with some label noise."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.arange(n_features * n_classes, dtype=torch.float32).reshape(
        n_features, n_classes
    )
    teacher = torch.cos(teacher)  # fixed, not random
    x = torch.randn(n, n_features, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, n_classes, generator=g)).argmax(dim=1)
    return Examples(x, y)


def dict_classification_data(n: int, seed: int) -> Examples:
    """:func:`classification_data` as inputs by keyword: the features and a 0/1 mask that
    hides about a quarter of them (integer, as attention masks are)."""
    plain = classification_data(n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    mask = (torch.rand(n, N_FEATURES, generator=g) > 0.25).to(torch.int64)
    return Examples({"features": plain.inputs, "mask": mask}, plain.targets)


def tuple_classification_data(n: int, seed: int) -> Examples:
    """:func:`classification_data` with a second positional input of two features."""
    plain = classification_data(n, seed)
    g = torch.Generator().manual_seed(seed + 200)
    return Examples((plain.inputs, torch.randn(n, 2, generator=g)), plain.targets)


# --- the registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A tiny recorded run: its model, data, recipe, loss and measurement."""

    name: str
    architecture: str
    data: Callable[[int, int], Examples]
    stages: Callable[[], list[TrainingStage]]
    loss: str
    measurement: str
    n_train: int
    n_queries: int = 4
    full_batch: bool = False
    optimizers: tuple[str, ...] = field(default=())

    def record(self, random_state: int = 0) -> Trajectory:
        return sourcekit.train(
            self.architecture,
            self.train(),
            self.stages(),
            loss=self.loss,
            measurement=self.measurement,
            random_state=random_state,
            progress=False,
        )

    def train(self) -> Examples:
        return self.data(self.n_train, 0)

    def queries(self, n: int | None = None) -> Examples:
        return self.data(self.n_queries if n is None else n, 1)


def _sgd_stage(**kwargs) -> TrainingStage:  # type: ignore[no-untyped-def]
    return TrainingStage(**{"name": "train", "n_checkpoints": 3, **kwargs})


_MLP = "tests._cases:make_tanh_mlp"
_LINEAR = "tests._cases:make_linear"

CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case(
            "linear_gd",
            _LINEAR,
            regression_data,
            lambda: [
                _sgd_stage(
                    optimizer=OptimizerSpec("sgd", lr=0.3),
                    epochs=6,
                    batch_size=8,
                    schedule="linear",
                )
            ],
            loss="squared_error",
            measurement="output",
            n_train=8,
            full_batch=True,
            optimizers=("sgd",),
        ),
        Case(
            "linear_sgd",
            _LINEAR,
            regression_data,
            lambda: [_sgd_stage(optimizer=OptimizerSpec("sgd", lr=0.2), epochs=2, batch_size=3)],
            loss="squared_error",
            measurement="output",
            n_train=8,
            optimizers=("sgd",),
        ),
        Case(
            "mlp_sgd",
            _MLP,
            classification_data,
            lambda: [_sgd_stage(optimizer=OptimizerSpec("sgd", lr=0.5), epochs=3, batch_size=4)],
            loss="cross_entropy",
            measurement="margin",
            n_train=12,
            optimizers=("sgd",),
        ),
        Case(
            "mlp_momentum",
            _MLP,
            classification_data,
            lambda: [
                _sgd_stage(
                    optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
                    epochs=3,
                    batch_size=4,
                    schedule="cosine",
                )
            ],
            loss="cross_entropy",
            measurement="margin",
            n_train=12,
            optimizers=("sgd",),
        ),
        Case(
            "mlp_nesterov",
            _MLP,
            classification_data,
            lambda: [
                _sgd_stage(
                    optimizer=OptimizerSpec("sgd", lr=0.1, momentum=0.9, nesterov=True),
                    epochs=3,
                    batch_size=4,
                )
            ],
            loss="cross_entropy",
            measurement="margin",
            n_train=12,
            optimizers=("sgd",),
        ),
        Case(
            "mlp_adam",
            _MLP,
            classification_data,
            lambda: [
                _sgd_stage(
                    optimizer=OptimizerSpec("adam", lr=0.05, weight_decay=0.01),
                    epochs=3,
                    batch_size=4,
                )
            ],
            loss="cross_entropy",
            measurement="margin",
            n_train=12,
            optimizers=("adam",),
        ),
        Case(
            "mlp_adamw",
            _MLP,
            classification_data,
            lambda: [
                _sgd_stage(
                    optimizer=OptimizerSpec("adamw", lr=0.05, weight_decay=0.1, betas=(0.8, 0.99)),
                    epochs=3,
                    batch_size=4,
                )
            ],
            loss="cross_entropy",
            measurement="margin",
            n_train=12,
            optimizers=("adamw",),
        ),
        Case(
            "mlp_two_stage",
            _MLP,
            classification_data,
            lambda: [
                _sgd_stage(
                    optimizer=OptimizerSpec("sgd", lr=0.2, momentum=0.5),
                    epochs=3,
                    batch_size=4,
                    name="pretrain",
                    examples=np.arange(0, 8),
                ),
                _sgd_stage(
                    optimizer=OptimizerSpec("adam", lr=0.02),
                    epochs=2,
                    batch_size=4,
                    name="finetune",
                    examples=np.arange(4, 12),
                ),
            ],
            loss="cross_entropy",
            measurement="margin",
            n_train=12,
            optimizers=("sgd", "adam"),
        ),
        Case(
            "mlp_dict",
            "tests._cases:make_dict_mlp",
            dict_classification_data,
            lambda: [
                _sgd_stage(
                    optimizer=OptimizerSpec("sgd", lr=0.3, momentum=0.5), epochs=3, batch_size=4
                )
            ],
            loss="cross_entropy",
            measurement="margin",
            n_train=12,
            optimizers=("sgd",),
        ),
        Case(
            "mlp_tuple",
            "tests._cases:make_tuple_mlp",
            tuple_classification_data,
            lambda: [
                _sgd_stage(
                    optimizer=OptimizerSpec("sgd", lr=0.3, momentum=0.5), epochs=3, batch_size=4
                )
            ],
            loss="cross_entropy",
            measurement="margin",
            n_train=12,
            optimizers=("sgd",),
        ),
    ]
}
CASE_NAMES: tuple[str, ...] = tuple(CASES)
MLP_CASES: tuple[str, ...] = tuple(n for n in CASE_NAMES if n.startswith("mlp_"))


def record(name: str, random_state: int = 0) -> Trajectory:
    """A fresh recording of case ``name`` (yours to modify)."""
    return CASES[name].record(random_state)


@functools.cache
def seeded_trajectory(name: str, random_state: int) -> Trajectory:
    """The recording of case ``name`` with seed ``random_state``, shared by all tests:
    never modify it."""
    return record(name, random_state)


def trajectory(name: str) -> Trajectory:
    """The recording of case ``name`` with seed 0, shared by all tests: never modify it."""
    return seeded_trajectory(name, 0)


def runs(name: str, seeds: tuple[int, ...] = (0, 1, 2)) -> sourcekit.Runs:
    """Several runs of case ``name``, one shared recording per seed."""
    return sourcekit.Runs([seeded_trajectory(name, s) for s in seeds])


def queries(name: str, n: int | None = None) -> Examples:
    """Queries for case ``name``, drawn like its training data with another seed."""
    return CASES[name].queries(n)


def train_examples(name: str) -> Examples:
    """The training examples of case ``name``."""
    return CASES[name].train()


def arguments(trajectory: Trajectory) -> dict[str, Any]:
    """The ``Trajectory`` constructor arguments that rebuild ``trajectory`` (fresh copies of
    its stages and schedule; the checkpoints are shared)."""
    return {
        "architecture": trajectory.architecture,
        "train": trajectory.train,
        "stages": [replace(s, examples=s.examples.copy()) for s in trajectory.stages],
        "learning_rates": trajectory.learning_rates.copy(),
        "batches": None if trajectory.batches is None else [b.copy() for b in trajectory.batches],
        "checkpoints": {s: trajectory.checkpoint(s) for s in trajectory.stored_steps},
        "checkpoint_steps": trajectory.checkpoint_steps,
        "loss": trajectory.loss_spec,
        "measurement": trajectory.measurement_spec,
        "train_mode": trajectory.train_mode,
        "clipping": trajectory.clipping,
        "random_states": trajectory.random_states,
        "microbatches": trajectory.microbatches,
    }


def rebuild(trajectory: Trajectory, **overrides: Any) -> Trajectory:
    """A copy of ``trajectory`` with some constructor arguments replaced (e.g.
    ``batches=None`` for a run recorded without batch indices)."""
    return Trajectory(**{**arguments(trajectory), **overrides})


# --- stationary runs ------------------------------------------------------------------------
def summed_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of a model's outputs (a measurement linear in the outputs, for any width)."""
    return outputs.reshape(len(outputs), -1).sum(dim=1)


def stationary_gradient(spec: OptimizerSpec, theta: torch.Tensor) -> torch.Tensor:
    """The mean training-loss gradient g at which ``spec``'s update leaves θ where it is.

    SGD (any momentum) and Adam with coupled decay λ stop where the total gradient
    g + λθ is 0. AdamW with decoupled decay λ_w stops where θ(1 − ηλ_w) = θ − η g/(|g| + ε)
    for every η (Adam's moments of a constant gradient are m̂ = g and v̂ = g²), i.e.
    g/(|g| + ε) = −λ_w θ, so g = −λ_w θ ε / (1 − λ_w |θ|) (needs λ_w |θ| < 1).
    """
    if spec.kind == "adamw":
        scaled = spec.weight_decay * theta.abs()
        if bool((scaled >= 1).any()):
            raise ValueError("AdamW has no stationary point with weight_decay * |theta| >= 1.")
        return -spec.weight_decay * theta * spec.eps / (1 - scaled)
    return -spec.weight_decay * theta


def stationary_run(
    n: int,
    d: int,
    k: int,
    stages: list[
        tuple[OptimizerSpec | Callable[[float], OptimizerSpec], np.ndarray | None, int, str]
    ],
    *,
    seed: int,
    n_checkpoints: int = 3,
) -> tuple[Trajectory, Examples]:
    """A float64 ``nn.Linear(d, k)`` trained full-batch from a point where no stage moves it.

    Every stage ``(optimizer, examples, steps, schedule)`` trains on its examples (None:
    all ``n``) with one batch per step; ``optimizer`` may be a function of λ_max, the
    largest eigenvalue of X̃ᵀX̃/n (to set a learning rate relative to the curvature). The targets are chosen so that at the initial
    weights W̃ = [W, b] the mean gradient of ½‖W̃x̃ − y‖² over each stage's examples is
    that stage's :func:`stationary_gradient`: the residuals r_i = W̃x̃_i − y_i are the
    smallest change of random residuals that satisfies Σ_{i∈stage} r_i x̃_iᵀ = N_stage g
    for every stage at once. The weights then never move (up to rounding), so the
    curvature I_k ⊗ X̃ᵀX̃/N_stage (+ coupled decay), every example's gradient r_i x̃_iᵀ
    and Adam's moments (m̂ = g, v̂ = g²) are constant along the run.

    Returns the trajectory (loss ``"squared_error"``, measurement :func:`summed_output`)
    and 3 queries drawn like the training inputs.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x_tilde = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    weights = 0.6 * torch.randn(k, d + 1, generator=g, dtype=torch.float64)
    lam_max = float(torch.linalg.eigvalsh(x_tilde.T @ x_tilde / n).max())
    stages = [(s if isinstance(s, OptimizerSpec) else s(lam_max), *rest) for s, *rest in stages]
    rows, rhs = [], []
    for spec, examples, _, _ in stages:
        members = np.arange(n) if examples is None else np.asarray(examples)
        target = len(members) * stationary_gradient(spec, weights)  # (k, d + 1)
        # Σ_{i∈members} r_i x̃_iᵀ: linear in vec(R), R of shape (n, k)
        for a in range(k):
            for b in range(d + 1):
                row = torch.zeros(n, k, dtype=torch.float64)
                row[members, a] = x_tilde[members, b]
                rows.append(row.reshape(-1))
                rhs.append(target[a, b])
    system = torch.stack(rows)
    start = torch.randn(n * k, generator=g, dtype=torch.float64)
    residuals = start + torch.linalg.pinv(system) @ (torch.stack(rhs) - system @ start)
    targets = x_tilde @ weights.T - residuals.reshape(n, k)
    model = nn.Linear(d, k).double()
    with torch.no_grad():
        model.weight.copy_(weights[:, :d])
        model.bias.copy_(weights[:, d])
    training = []
    for i, (spec, examples, steps, schedule) in enumerate(stages):
        assert isinstance(spec, OptimizerSpec)
        size = n if examples is None else len(examples)
        training.append(
            TrainingStage(
                spec,
                epochs=steps,
                batch_size=size,
                name=f"stage{i}",
                examples=examples,
                schedule=schedule,
                n_checkpoints=n_checkpoints,
            )
        )
    run = sourcekit.train(
        model,
        Examples(x, targets),
        training,
        loss="squared_error",
        measurement=summed_output,
        progress=False,
    )
    queries = Examples(
        torch.randn(3, d, generator=g, dtype=torch.float64),
        torch.zeros(3, k, dtype=torch.float64),
    )
    return run, queries
