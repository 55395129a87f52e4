"""Replaying a recorded recipe on a subset of the training data.

A trajectory recorded by :func:`sourcekit.train` keeps, for every stage, the recipe
that produced it (``Stage.recipe``: optimiser, epochs, batch size, schedule, stopping
rule). Counterfactual retraining reads it back as :class:`~sourcekit.TrainingStage`
objects restricted to the kept examples, and trains them with ``sourcekit.train``.

"The same recipe" means, field by field:

- optimiser (kind, base learning rate, momentum, weight decay, Adam's betas and eps),
  epochs, batch size, schedule: as recorded; the schedule is laid out over the subset's
  own length (``epochs × ceil(n_kept / batch_size)`` steps), as a run on that data would;
- ``stop_fraction``: the same fraction of the subset's schedule; ``max_steps``: the same
  absolute number of steps;
- ``n_checkpoints``: irrelevant (a retraining keeps no attribution checkpoints);
- stage examples: the recorded ones that the subset keeps; a stage left with none is
  skipped (training without its data takes none of its steps);
- architecture, loss: as recorded; the seed replaces both the initialisation seed and
  the shuffling seeds of every stage (an architecture given as an ``nn.Module`` starts
  from that module's weights whatever the seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from torch import nn

from ..exceptions import TrajectoryError
from ..trajectory import Examples, OptimizerSpec, TrainingStage, Trajectory, train
from ._masks import check_masks

__all__ = ["RecipeReplay", "check_replayable", "retrain_model", "stages_from_recipe"]

Retrain = Callable[[np.ndarray, int], nn.Module]
"""A retraining function: ``retrain(keep_mask, seed) -> trained model``."""

_REQUIRED = ("epochs", "batch_size", "schedule", "optimizer")


def check_replayable(trajectory: Trajectory) -> None:
    """Raise :class:`~sourcekit.exceptions.TrajectoryError` unless every stage has a recipe."""
    if not isinstance(trajectory, Trajectory):
        raise TypeError(
            f"Counterfactual retraining needs a Trajectory; got {type(trajectory).__name__}."
        )
    for stage in trajectory.stages:
        if stage.recipe is None:
            raise TrajectoryError(
                f"This run cannot be replayed: stage {stage.name!r} has no training recipe, as in "
                "every run recorded from your own loop with TrajectoryRecorder. Record the run "
                "with sourcekit.train (TrainingStage recipes), or pass retrain=your_function, "
                "where your_function(keep_mask, seed) trains your recipe on the training "
                "examples where keep_mask is True and returns the trained nn.Module."
            )
        missing = [key for key in _REQUIRED if key not in stage.recipe]
        if missing:
            raise TrajectoryError(
                f"The recipe of stage {stage.name!r} lacks {missing}, so the run cannot be "
                "replayed; the trajectory's manifest may have been edited. Record the run again "
                "with sourcekit.train, or pass retrain=your_function."
            )


def _recorded_stages(trajectory: Trajectory) -> tuple[TrainingStage, ...]:
    check_replayable(trajectory)
    stages = []
    for stage in trajectory.stages:
        recipe: dict[str, Any] = stage.recipe  # type: ignore[assignment]
        try:
            stages.append(
                TrainingStage(
                    OptimizerSpec.from_dict(recipe["optimizer"]),
                    epochs=recipe["epochs"],
                    batch_size=recipe["batch_size"],
                    name=stage.name,
                    examples=stage.examples,
                    schedule=recipe["schedule"],
                    max_steps=recipe.get("max_steps"),
                    stop_fraction=recipe.get("stop_fraction"),
                    n_checkpoints=0,
                )
            )
        except (TypeError, ValueError) as err:
            raise TrajectoryError(
                f"The recipe of stage {stage.name!r} cannot be replayed ({err}). Record the run "
                "again with sourcekit.train, or pass retrain=your_function."
            ) from err
    return tuple(stages)


def _restrict(stages: tuple[TrainingStage, ...], keep: np.ndarray) -> list[TrainingStage]:
    kept = []
    for stage in stages:
        examples = np.asarray(stage.examples)
        examples = examples[keep[examples]]
        if examples.size:
            kept.append(replace(stage, examples=examples))
    if not kept:
        raise ValueError(
            "The subset keeps no training example of any stage, so there is nothing to train "
            "on; keep at least one example of some stage."
        )
    return kept


def _as_keep(keep: Any, n_train: int) -> np.ndarray:
    if keep is None:
        return np.ones(n_train, dtype=bool)
    return check_masks(np.asarray(keep)[None], n_train, name="keep")[0]


def stages_from_recipe(trajectory: Trajectory, keep: Any = None) -> list[TrainingStage]:
    """The trajectory's own :class:`~sourcekit.TrainingStage` recipe, restricted to a subset.

    Parameters
    ----------
    trajectory : Trajectory
        A run recorded by :func:`sourcekit.train` (every stage has a ``recipe``).
    keep : array-like of bool, shape (n_train,), optional
        The training examples to keep (default: all).

    Returns
    -------
    stages : list of TrainingStage
        One per stage that keeps at least one example (stages left empty are skipped),
        with the recorded optimiser, epochs, batch size, schedule and stopping rule, the
        kept examples of the stage and ``n_checkpoints=0``.

    Raises
    ------
    TrajectoryError
        If a stage has no recipe (a run recorded from a user's own loop).

    Examples
    --------
    >>> import numpy as np, torch, sourcekit
    >>> from sourcekit.evaluation import stages_from_recipe
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> [s] = stages_from_recipe(trajectory, keep=np.arange(20) < 10)
    >>> s.epochs, s.batch_size, s.examples.tolist()
    (2, 5, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    return _restrict(_recorded_stages(trajectory), _as_keep(keep, trajectory.n_train))


@dataclass(frozen=True, eq=False)
class RecipeReplay:
    """The default retraining function: ``replay(keep_mask, seed) -> trained model``.

    Holds only what retraining needs (architecture, training data, recipe, loss), not
    the checkpoints, so it is cheap to send to worker processes.
    """

    architecture: Any
    architecture_kwargs: dict[str, Any]
    train: Examples
    stages: tuple[TrainingStage, ...]
    loss: Any

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory) -> RecipeReplay:
        """Read the recipe of ``trajectory`` (raises if the run cannot be replayed)."""
        stages = _recorded_stages(trajectory)
        return cls(
            architecture=trajectory.architecture.source,
            architecture_kwargs=dict(trajectory.architecture.kwargs),
            train=trajectory.train,
            stages=stages,
            loss=trajectory.loss_spec,
        )

    def __call__(self, keep: np.ndarray, seed: int) -> nn.Module:
        retrained = train(
            self.architecture,
            self.train,
            _restrict(self.stages, _as_keep(keep, len(self.train))),
            loss=self.loss,
            architecture_kwargs=self.architecture_kwargs or None,
            random_state=int(seed),
            progress=False,
            # The built-in trainer's own recipe: nothing the record could miss, so the
            # self-check would only add its cost to every retraining.
            verify=False,
        )
        return retrained.build_model()


def retrain_model(trajectory: Trajectory, keep: Any, seed: int) -> nn.Module:
    """Train the trajectory's own recipe on a subset of its examples; return the final model.

    See :func:`stages_from_recipe` for what is kept from the recipe. ``seed`` replaces the
    recipe's initialisation and shuffling seeds; with every example kept and
    ``seed=trajectory.stages[0].recipe["init_seed"]`` the recorded run is reproduced.

    Examples
    --------
    >>> import torch, sourcekit
    >>> from sourcekit.evaluation import retrain_model
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> model = retrain_model(trajectory, keep=None, seed=0)
    >>> final = trajectory.build_model()
    >>> all(torch.equal(a, b) for a, b in zip(model.parameters(), final.parameters()))
    True
    """
    return RecipeReplay.from_trajectory(trajectory)(_as_keep(keep, trajectory.n_train), seed)
