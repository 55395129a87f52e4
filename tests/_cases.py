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
    "make_dropout_mlp",
    "make_linear",
    "make_tanh_mlp",
    "queries",
    "rebuild",
    "record",
    "regression_data",
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
    ]
}
CASE_NAMES: tuple[str, ...] = tuple(CASES)
MLP_CASES: tuple[str, ...] = tuple(n for n in CASE_NAMES if n.startswith("mlp_"))


def record(name: str, random_state: int = 0) -> Trajectory:
    """A fresh recording of case ``name`` (yours to modify)."""
    return CASES[name].record(random_state)


@functools.cache
def trajectory(name: str) -> Trajectory:
    """The recording of case ``name`` with seed 0, shared by all tests: never modify it."""
    return record(name)


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
    }


def rebuild(trajectory: Trajectory, **overrides: Any) -> Trajectory:
    """A copy of ``trajectory`` with some constructor arguments replaced (e.g.
    ``batches=None`` for a run recorded without batch indices)."""
    return Trajectory(**{**arguments(trajectory), **overrides})
