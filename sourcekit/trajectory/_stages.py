"""``Stage``: one stage of a recorded run (its optimiser, its steps and its examples)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._optimizer import OptimizerSpec
from ._settings import ParameterGroup

__all__ = ["Stage"]


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage of training (e.g. pretraining or fine-tuning).

    Attributes
    ----------
    name : str
    optimizer : OptimizerSpec
    start, end : int
        The global steps ``start .. end-1`` belong to this stage.
    examples : ndarray of int64
        Global indices of the training examples this stage trains on (sorted, unique).
    batch_size : int
        The nominal batch size (a step's batch may be smaller, e.g. at an epoch's end).
    recipe : dict or None
        How the built-in trainer produced the stage (epochs, schedule, seed...), so that
        the stage can be retrained on a subset of its examples; None for runs recorded
        from a user's own loop.
    groups : tuple of ParameterGroup, or None
        The optimiser's parameter groups, each with the parameters it trains and its
        settings at every step; parameters in no group stay fixed during the stage.
        None: one group trains every parameter with ``optimizer``'s settings and the
        trajectory's ``learning_rates`` (see :mod:`sourcekit.trajectory._settings`).
    n_steps : int
        ``end - start``.
    n_examples : int
        The number of training examples of the stage, N_s: the 1/N factor of every
        score contributed by this stage.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> data = Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> sgd = OptimizerSpec("sgd", lr=0.1)
    >>> stages = [
    ...     TrainingStage(sgd, epochs=2, batch_size=5, name="pretrain", examples=range(10)),
    ...     TrainingStage(sgd, epochs=1, batch_size=5, name="finetune", examples=range(10, 20)),
    ... ]
    >>> trajectory = train(torch.nn.Linear(3, 2), data, stages, progress=False)
    >>> [(s.name, s.start, s.end, s.n_examples) for s in trajectory.stages]
    [('pretrain', 0, 4, 10), ('finetune', 4, 6, 10)]
    >>> trajectory.stages[1].recipe["epochs"]
    1
    """

    name: str
    optimizer: OptimizerSpec
    start: int
    end: int
    examples: np.ndarray = field(repr=False)
    batch_size: int
    recipe: dict[str, Any] | None = field(default=None, repr=False)
    groups: tuple[ParameterGroup, ...] | None = field(default=None, repr=False)

    @property
    def n_steps(self) -> int:
        return self.end - self.start

    @property
    def n_examples(self) -> int:
        return int(self.examples.shape[0])

    def describe(self) -> dict[str, Any]:
        """The stage as JSON values, without its examples (a saved manifest records it)."""
        return {
            "name": self.name,
            "optimizer": self.optimizer.to_dict(),
            "start": self.start,
            "end": self.end,
            "batch_size": self.batch_size,
            "n_examples": self.n_examples,
            "recipe": self.recipe,
            **({} if self.groups is None else {"groups": [g.describe() for g in self.groups]}),
        }

    @classmethod
    def from_description(
        cls,
        description: dict[str, Any],
        examples: np.ndarray,
        groups: tuple[ParameterGroup, ...] | None = None,
    ) -> Stage:
        """The stage that :meth:`describe` described, with its ``examples`` and ``groups``
        (whose per-step settings a saved run keeps beside the description)."""
        return cls(
            name=description["name"],
            optimizer=OptimizerSpec.from_dict(description["optimizer"]),
            start=int(description["start"]),
            end=int(description["end"]),
            examples=examples,
            batch_size=int(description["batch_size"]),
            recipe=description.get("recipe"),
            groups=groups,
        )
