"""``Trajectory``: the record of how a model was trained.

A trajectory holds everything attribution needs to know about a run: the architecture,
the training examples, the stages (each with its optimiser, its examples and its range
of global steps), the learning rate and the example indices of every step, checkpoints
(parameters, buffers and optimiser state) at chosen steps, the per-example loss and the
query measurement.

Conventions
-----------
- Steps are global and count updates: the checkpoint at step ``k`` holds θ_k, the
  parameters *before* update ``k``; step 0 is the initial model and step ``T`` the final
  one. Both are always stored (exact unrolling starts from the first; queries are
  measured on the last).
- ``checkpoint_steps`` are the checkpoints that approximate methods use, all in
  ``[0, T)``. A checkpoint stands for the steps of its stage nearer to it than to its
  neighbouring checkpoints (ties go to the later one; the first of a stage stands from
  the stage's start, the last to the stage's end); with a checkpoint at every step,
  checkpoint k stands for step k alone.
- The columns of every score matrix are the training examples, indexed 0..n_train-1.
  Each stage trains on a subset of them; batch indices refer to these global indices.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..exceptions import TrajectoryError
from ..objectives import (
    LOSSES,
    MEASUREMENTS,
    check_class_targets,
    function_spec,
    resolve_function,
)
from ._architecture import Architecture, shape_summary, state_shapes
from ._examples import Examples, check_training_set
from ._format import read_trajectory, schedule_payload, write_trajectory
from ._segments import Segment, split_segments
from ._settings import GradientClipping, RandomStates
from ._stages import Stage
from ._storage import Checkpoint, DirectoryStore, MemoryStore, hash_value

__all__ = ["AttributionTask", "Stage", "Trajectory"]


class AttributionTask:
    """A trajectory bound to queries: the ``X`` that scikit-learn tools slice.

    ``len()`` and ``shape`` count queries; indexing selects queries and keeps the same
    trajectory object. Create it with :meth:`Trajectory.bind`.

    Parameters
    ----------
    trajectory : Trajectory
        The recorded run.
    queries : Examples
        The queries, shaped like the trajectory's training examples.

    Attributes
    ----------
    trajectory : Trajectory
    queries : Examples
    shape : tuple of int
        ``(n_queries,)``.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> data = Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> X = trajectory.bind(data[:6])
    >>> len(X), X.shape, len(X[2:4]), X[2:4].trajectory is trajectory
    (6, (6,), 2, True)
    """

    def __init__(self, trajectory: Trajectory, queries: Examples) -> None:
        if not isinstance(trajectory, Trajectory):
            raise TypeError(
                f"AttributionTask needs a Trajectory; got {type(trajectory).__name__}."
            )
        self.trajectory = trajectory
        self.queries = trajectory.check_queries(queries)

    @property
    def shape(self) -> tuple[int]:
        return self.queries.shape

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key: Any) -> AttributionTask:
        return AttributionTask(self.trajectory, self.queries[key])

    def __repr__(self) -> str:
        return f"AttributionTask(n_queries={len(self)}, trajectory={self.trajectory!r})"


def _as_index_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise TrajectoryError(
            f"The {name} must be a 1-d array of integer example indices; got an array of "
            f"dtype {array.dtype} and shape {array.shape}."
        )
    return array.astype(np.int64)


class Trajectory:
    """A recorded training run.

    Usually created by :class:`TrajectoryRecorder`, by :func:`sourcekit.train`, or read
    with :meth:`Trajectory.load`; the constructor checks that the record is complete and
    consistent and raises :class:`~sourcekit.exceptions.TrajectoryError` otherwise.

    Parameters
    ----------
    architecture : str, callable or nn.Module
        How to build the model (see :class:`~sourcekit.trajectory.Architecture`).
    train : Examples
        All training examples of all stages; the score matrix has one column each.
    stages : sequence of Stage
        Contiguous stages covering the global steps ``0 .. T-1``.
    learning_rates : array-like of shape (T,)
        The learning rate used at every step.
    batches : sequence of T integer arrays, or None
        The training-example indices of every step's batch (needed by exact unrolling
        and by replay).
    checkpoints : dict of int to Checkpoint, or a store
        Saved states; must include step 0 and step T.
    checkpoint_steps : sequence of int
        The checkpoints, in ``[0, T)``, that approximate methods use.
    loss : str or callable, default="cross_entropy"
        Per-example training loss ``(outputs, targets) -> (n,)``; the run minimised its
        batch mean.
    measurement : str or callable, default="margin"
        Per-example query measurement ``(outputs, targets) -> (n,)`` that attribution
        explains.
    train_mode : bool, default=True
        Whether the model was in training mode during the run.
    clipping : GradientClipping, optional
        The gradient-norm clipping of every step, when the run clipped.
    random_states : RandomStates, optional
        torch's generator state before every forward pass that drew random numbers
        (dropout), so that exact unrolling replays the same masks.

    Attributes
    ----------
    n_train : int
        Number of training examples (columns of every score matrix).
    n_steps : int
        T, the number of recorded updates.
    stages : tuple of Stage
    learning_rates : ndarray of shape (T,)
    checkpoint_steps : tuple of int
    stored_steps : tuple of int
        Every step with a stored state, 0 and T included.
    parameter_names : tuple of str
        The model's parameters, in ``named_parameters()`` order.
    trained_parameters : tuple of str
        Those that some stage trains (the others stay at their initial values).
    fingerprint : str
        sha256 of the run's content.

    Notes
    -----
    The trajectory is deliberately opaque to scikit-learn (no ``len``, ``shape`` or
    indexing); bind it to queries with :meth:`bind` to obtain something scikit-learn
    can split.

    Examples
    --------
    A run of the built-in trainer, with an architecture named by an importable factory
    so that it can be saved:

    >>> import tempfile
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, Trajectory, train
    >>> data = Examples(torch.randn(20, 64), torch.randint(0, 10, (20,)))
    >>> stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5, n_checkpoints=4)
    >>> trajectory = train(
    ...     "sourcekit.datasets:make_digits_mlp", data, [stage],
    ...     architecture_kwargs={"hidden": [8]}, progress=False,
    ... )
    >>> trajectory
    Trajectory(n_train=20, n_steps=8, stages=['train'], checkpoint_steps=[1, 3, 5, 7])
    >>> trajectory.stored_steps
    (0, 1, 3, 5, 7, 8)
    >>> trajectory.build_model(step=3)  # a new module with the parameters before update 3
    Sequential(
      (0): Linear(in_features=64, out_features=8, bias=True)
      (1): ReLU()
      (2): Linear(in_features=8, out_features=10, bias=True)
    )
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     loaded = Trajectory.load(trajectory.save(f"{tmp}/run"))
    ...     print(loaded.fingerprint == trajectory.fingerprint)
    True
    """

    def __init__(
        self,
        *,
        architecture: Any,
        train: Examples,
        stages: Sequence[Stage],
        learning_rates: Any,
        batches: Sequence[Any] | None,
        checkpoints: dict[int, Checkpoint] | MemoryStore | DirectoryStore,
        checkpoint_steps: Sequence[int],
        loss: str | Callable = "cross_entropy",
        measurement: str | Callable = "margin",
        train_mode: bool = True,
        clipping: GradientClipping | None = None,
        random_states: RandomStates | None = None,
    ) -> None:
        self.architecture = Architecture(architecture)
        check_training_set(train)
        self.train = train
        self.loss_spec = loss
        self.measurement_spec = measurement
        self.loss = resolve_function(loss, LOSSES, "loss")
        self.measurement = resolve_function(measurement, MEASUREMENTS, "measurement")
        check_class_targets(self.loss, train.targets, "training targets")
        self.train_mode = bool(train_mode)
        self.stages = tuple(self._check_stages(stages))
        self.n_steps = self.stages[-1].end
        self.learning_rates = self._check_learning_rates(learning_rates)
        self.batches = None if batches is None else self._check_batches(batches)
        if isinstance(checkpoints, dict):
            checkpoints = MemoryStore(checkpoints)
        self._store = checkpoints
        self.checkpoint_steps = self._check_checkpoint_steps(checkpoint_steps)
        model = self.architecture.build()
        self._param_shapes = state_shapes(model)
        self._store.check_fits(model, self.architecture.describe())
        self.parameter_names = tuple(name for name, _ in model.named_parameters())
        self._check_groups()
        self.clipping = self._check_clipping(clipping)
        self.random_states = self._check_random_states(random_states)
        self._fingerprint: str | None = None

    # --- validation ------------------------------------------------------------------
    def _check_stages(self, stages: Sequence[Stage]) -> list[Stage]:
        stages = list(stages)
        if not stages:
            raise TrajectoryError("A trajectory needs at least one stage; got none.")
        expected_start = 0
        n = len(self.train)
        checked = []
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise TypeError(f"stages[{i}] must be a Stage; got {type(stage).__name__}.")
            if stage.start != expected_start or stage.end <= stage.start:
                raise TrajectoryError(
                    f"Stage {stage.name!r} covers steps {stage.start}..{stage.end - 1}; stages must "
                    f"be contiguous and non-empty, so it should start at step {expected_start} "
                    "and end after it."
                )
            examples = _as_index_array(stage.examples, f"examples of stage {stage.name!r}")
            if examples.size == 0:
                raise TrajectoryError(
                    f"Stage {stage.name!r} has an empty training set. Give every stage at least one "
                    "training example."
                )
            if examples.min() < 0 or examples.max() >= n:
                raise TrajectoryError(
                    f"Stage {stage.name!r} names training examples from {examples.min()} to "
                    f"{examples.max()}, outside [0, {n}) for the {n} training examples. Use "
                    "indices into the trajectory's training set."
                )
            unique = np.unique(examples)
            if unique.size != examples.size:
                raise TrajectoryError(
                    f"Stage {stage.name!r} lists some training examples twice; list each example "
                    "of the stage once."
                )
            # A new Stage: the caller's objects are never modified.
            checked.append(replace(stage, examples=unique))
            expected_start = stage.end
        return checked

    def _check_groups(self) -> None:
        known = set(self.parameter_names)
        for stage in self.stages:
            if stage.groups is None:
                continue
            if not stage.groups:
                raise TrajectoryError(
                    f"Stage {stage.name!r} has an empty tuple of parameter groups; give at least "
                    "one group, or groups=None for one group of every parameter."
                )
            seen: set[str] = set()
            kinds = {g.optimizer.kind for g in stage.groups}
            if len(kinds) > 1:
                raise TrajectoryError(
                    f"The parameter groups of stage {stage.name!r} use different optimisers "
                    f"{sorted(kinds)}; one optimiser trains a stage."
                )
            for group in stage.groups:
                unknown = [n for n in group.parameters if n not in known]
                twice = [n for n in group.parameters if n in seen]
                if unknown or twice:
                    raise TrajectoryError(
                        f"A parameter group of stage {stage.name!r} names "
                        + (f"parameters the model does not have {unknown[:5]}" if unknown else "")
                        + (f"parameters of another group {twice[:5]}" if twice else "")
                        + f"; the model's parameters are {list(self.parameter_names)[:8]}."
                    )
                seen.update(group.parameters)
                if group.n_steps != stage.n_steps:
                    raise TrajectoryError(
                        f"A parameter group of stage {stage.name!r} records {group.n_steps} steps, "
                        f"but the stage has {stage.n_steps}; record every setting at every step."
                    )
            first = stage.groups[0].schedule["lr"]
            if not np.array_equal(first, self.learning_rates[stage.start : stage.end]):
                raise TrajectoryError(
                    f"The learning rates of stage {stage.name!r} differ from those of its first "
                    "parameter group; the trajectory's learning_rates are the first group's."
                )

    def _check_clipping(self, clipping: GradientClipping | None) -> GradientClipping | None:
        if clipping is None:
            return None
        if not isinstance(clipping, GradientClipping):
            raise TypeError(
                f"The 'clipping' must be a GradientClipping; got {type(clipping).__name__}."
            )
        if clipping.coefficient.size != self.n_steps:
            raise TrajectoryError(
                f"The clipping record covers {clipping.coefficient.size} steps, but the run has "
                f"{self.n_steps}; record every step (coefficient 1 where a step did not clip)."
            )
        return clipping

    def _check_random_states(self, states: RandomStates | None) -> RandomStates | None:
        if states is None:
            return None
        if not isinstance(states, RandomStates):
            raise TypeError(
                f"The 'random_states' must be a RandomStates; got {type(states).__name__}."
            )
        if states.steps.size and (states.steps[0] < 0 or states.steps[-1] >= self.n_steps):
            raise TrajectoryError(
                f"The random states name steps from {states.steps[0]} to {states.steps[-1]}, "
                f"outside the run's steps [0, {self.n_steps})."
            )
        return states

    def _check_learning_rates(self, learning_rates: Any) -> np.ndarray:
        lrs = np.asarray(
            learning_rates.detach().cpu().numpy()
            if isinstance(learning_rates, torch.Tensor)
            else learning_rates,
            dtype=np.float64,
        )
        if lrs.shape != (self.n_steps,):
            raise TrajectoryError(
                f"The learning_rates list has shape {lrs.shape}, but the stages cover "
                f"{self.n_steps} steps; record one learning rate per step (shape ({self.n_steps},))."
            )
        if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
            bad = int(np.flatnonzero(~np.isfinite(lrs) | (lrs < 0))[0])
            raise TrajectoryError(
                f"The learning rate of step {bad} is {float(lrs[bad])!r}; learning rates must be finite "
                "and >= 0."
            )
        return lrs

    def _check_batches(self, batches: Sequence[Any]) -> tuple[np.ndarray, ...]:
        if len(batches) != self.n_steps:
            raise TrajectoryError(
                f"The batches list has {len(batches)} entries, but the stages cover {self.n_steps} "
                "steps; record the example indices of every step."
            )
        checked = []
        n = len(self.train)
        for stage in self.stages:
            members = np.zeros(n, dtype=bool)
            members[stage.examples] = True
            for step in range(stage.start, stage.end):
                idx = _as_index_array(batches[step], f"batch indices of step {step}")
                if idx.size == 0:
                    raise TrajectoryError(
                        f"The batch of step {step} is empty; record the indices of the examples "
                        "each step trained on."
                    )
                if idx.min() < 0 or idx.max() >= n:
                    raise TrajectoryError(
                        f"The batch of step {step} holds example indices from {idx.min()} to "
                        f"{idx.max()}, outside [0, {n}) for the {n} training examples. Record "
                        "indices into the trajectory's training set."
                    )
                if not members[idx].all():
                    outside = idx[~members[idx]][:5].tolist()
                    raise TrajectoryError(
                        f"The batch of step {step} holds examples {outside} that are not in the "
                        f"training set of stage {stage.name!r}. Record each stage's examples."
                    )
                checked.append(idx)
        return tuple(checked)

    def _check_checkpoint_steps(self, steps: Sequence[int]) -> tuple[int, ...]:
        stored = set(self._store.steps())
        for required in (0, self.n_steps):
            if required not in stored:
                raise TrajectoryError(
                    f"The trajectory has no checkpoint at step {required}; the initial (step 0) and "
                    f"final (step {self.n_steps}) states must always be recorded."
                )
        out = sorted({int(s) for s in steps})
        for s in out:
            if not 0 <= s < self.n_steps:
                raise TrajectoryError(
                    f"The checkpoint step {s} is outside [0, {self.n_steps}); attribution checkpoints "
                    "stand for the steps that follow them, so they must precede the final step."
                )
            if s not in stored:
                raise TrajectoryError(
                    f"The checkpoint step {s} is listed but no checkpoint is stored for it."
                )
        return tuple(out)

    def check_queries(self, queries: Any) -> Examples:
        """Return ``queries`` as Examples shaped like the training examples, or raise."""
        if isinstance(queries, AttributionTask):
            queries = queries.queries
        if not isinstance(queries, Examples):
            raise TypeError(
                f"Queries must be an Examples object; got {type(queries).__name__}. Wrap "
                "arrays as Examples(inputs, targets) (a tuple would be counted as 2 samples)."
            )
        for part in ("inputs", "targets"):
            mine, theirs = getattr(queries, part), getattr(self.train, part)
            got, want = tuple(mine.shape[1:]), tuple(theirs.shape[1:])
            if got != want:
                raise ValueError(
                    f"The query {part} have shape (n, {', '.join(map(str, got))}) per example but the "
                    f"training {part} have (n, {', '.join(map(str, want))}). Pass queries shaped "
                    "like the training examples."
                )
            if mine.is_floating_point() != theirs.is_floating_point():
                kind = "floating-point" if theirs.is_floating_point() else "integer"
                raise ValueError(
                    f"The query {part} have dtype {mine.dtype} but the training {part} have "
                    f"{theirs.dtype}. Pass {kind} query {part}, like the training examples "
                    f"(for instance {part}.astype(np.{str(theirs.dtype).removeprefix('torch.')}))."
                )
        check_class_targets(self.measurement, queries.targets, "query targets")
        return queries

    # --- access ----------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        """Number of training examples (columns of every score matrix)."""
        return len(self.train)

    @property
    def has_batches(self) -> bool:
        return self.batches is not None

    @property
    def trained_parameters(self) -> tuple[str, ...]:
        """The parameters some stage trains, in ``named_parameters()`` order."""
        if any(stage.groups is None for stage in self.stages):
            return self.parameter_names
        trained = {n for stage in self.stages for g in stage.groups or () for n in g.parameters}
        return tuple(n for n in self.parameter_names if n in trained)

    @property
    def stored_steps(self) -> tuple[int, ...]:
        """Every step with a stored state (includes 0 and T)."""
        return tuple(self._store.steps())

    def stage_of(self, step: int) -> Stage:
        """The stage that performs update ``step`` (the last stage for step T)."""
        for stage in self.stages:
            if stage.start <= step < stage.end:
                return stage
        if step == self.n_steps:
            return self.stages[-1]
        raise ValueError(f"Step {step} is outside [0, {self.n_steps}].")

    def checkpoint(self, step: int) -> Checkpoint:
        """The stored state at ``step``, read from disk when the trajectory was loaded."""
        if step not in self._store.steps():
            raise TrajectoryError(
                f"No checkpoint is stored at step {step}; stored steps are {list(self.stored_steps)}."
            )
        checkpoint = self._store.get(step)
        given = {k: tuple(v.shape) for k, v in {**checkpoint.params, **checkpoint.buffers}.items()}
        if given != self._param_shapes:
            raise TrajectoryError(
                f"The checkpoint at step {step} does not fit the architecture "
                f"{self.architecture.describe()}: it holds {shape_summary(given)} but the model "
                f"has {shape_summary(self._param_shapes)}. The directory mixes files of "
                "different runs; record and save the run again."
            )
        return checkpoint

    def verify(self) -> None:
        """Check every stored checkpoint file against the sha256 its manifest records.

        Checkpoints are otherwise verified one at a time, when they are read; this reads
        them all now (a trajectory held in memory has no files to check).

        Raises
        ------
        TrajectoryError
            Naming every checkpoint file that is missing or was modified.
        """
        problems = self._store.verify()
        if problems:
            raise TrajectoryError(
                f"{len(problems)} checkpoint file(s) of the saved trajectory fail verification: "
                f"{'; '.join(problems)}. Restore the directory from the original save, or "
                "record and save the run again."
            )

    def build_model(self, step: int | None = None) -> nn.Module:
        """A new model with the architecture, loaded with the state at ``step`` (default: final).

        The module is the caller's to keep; the trajectory is not changed.
        """
        model = self.architecture.build()
        state = self.checkpoint(self.n_steps if step is None else step)
        model.load_state_dict({**state.params, **state.buffers}, strict=True)
        return model

    def segments(
        self, n_segments: int | None = None, boundaries: Sequence[int] | None = None
    ) -> list[Segment]:
        """Split the run into segments (see :mod:`sourcekit.trajectory._segments`).

        ``n_segments`` equal groups of consecutive checkpoints (default: one per stage),
        always cut at stage boundaries; or explicit ``boundaries`` (steps where a segment
        starts).
        """
        return split_segments(self, n_segments, boundaries)

    def bind(self, queries: Examples) -> AttributionTask:
        """Bind queries to this trajectory: the sample axis scikit-learn tools split.

        Examples
        --------
        >>> import sourcekit
        >>> task = sourcekit.datasets.load_digits_task()
        >>> trajectory = task.record("early", progress=False)
        >>> X = trajectory.bind(task.test[:10])
        >>> X.shape, X[2:5].trajectory is trajectory
        ((10,), True)
        """
        return AttributionTask(self, queries)

    @property
    def fingerprint(self) -> str:
        """sha256 of the run's content (data, schedule, batches, checkpoints, functions).

        Computed once per object; equal for a trajectory and its saved-and-loaded copy.
        """
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        header = {
            "architecture": self.architecture.spec() or self.architecture.describe(),
            "param_shapes": {k: list(v) for k, v in sorted(self._param_shapes.items())},
            "loss": function_spec(self.loss_spec, LOSSES) or repr(self.loss),
            "measurement": function_spec(self.measurement_spec, MEASUREMENTS)
            or repr(self.measurement),
            "train_mode": self.train_mode,
            "stages": [s.describe() for s in self.stages],
            "checkpoint_steps": list(self.checkpoint_steps),
        }
        # Fields that older trajectories lack enter only when present, so that their
        # fingerprints (and the caches keyed by them) stay as they were.
        if self.random_states is not None:
            header["random_device"] = self.random_states.device
        h.update(json.dumps(header, sort_keys=True, default=str).encode())
        h.update(self.train.fingerprint().encode())
        schedule = schedule_payload(
            self.learning_rates, self.stages, self.batches, self.clipping, self.random_states
        )
        h.update(hash_value(schedule).encode())
        for step in self.stored_steps:
            h.update(f"{step}:{self._store.digest(step)}".encode())
        return h.hexdigest()

    # --- saving and loading ------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the trajectory to ``directory``: a JSON manifest and tensor files.

        Every file's sha256 is recorded in the manifest. An existing non-empty path is
        never replaced unless ``overwrite=True``, and then only a directory that holds a
        trajectory saved before (anything else is refused); the new content is written
        beside it first, so a failed save leaves the old one intact. The directory gets
        the permissions the umask gives new directories.

        Returns the directory path.
        """
        target = Path(directory)
        store = write_trajectory(
            self, self._store, self._param_shapes, target, overwrite=overwrite
        )
        if self._store.located_at(target):  # its files were replaced: read the new ones
            self._store = store
        return target

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        architecture: Any = None,
        loss: str | Callable | None = None,
        measurement: str | Callable | None = None,
    ) -> Trajectory:
        """Read a trajectory saved with :meth:`save`.

        The manifest, the training data and the schedule are read and verified now;
        checkpoints are read (and their sha256 verified) one at a time when used, from
        the directory's absolute path (so the trajectory keeps working after a change of
        the working directory, and pickled, in another process). ``architecture``,
        ``loss`` and ``measurement`` override what the manifest names.
        """
        saved = read_trajectory(
            directory, architecture=architecture, loss=loss, measurement=measurement
        )
        trajectory = cls(**saved.arguments)
        trajectory._fingerprint = saved.fingerprint  # the manifest's, computed when saved
        return trajectory

    # --- description -------------------------------------------------------------------
    def summary(self) -> str:
        """A few lines describing the run (stages, steps, checkpoints)."""
        lines = [
            f"Trajectory: {self.n_train} training examples, {self.n_steps} steps, "
            f"{len(self.stages)} stage(s), architecture {self.architecture.describe()}",
            f"  loss {function_spec(self.loss_spec, LOSSES) or self.loss!r}, measurement "
            f"{function_spec(self.measurement_spec, MEASUREMENTS) or self.measurement!r}, "
            f"batches {'recorded' if self.has_batches else 'not recorded'}",
        ]
        for stage in self.stages:
            opt = stage.optimizer
            extra = f"momentum {opt.momentum:g}" if opt.kind == "sgd" else f"betas {opt.betas}"
            lrs = self.learning_rates[stage.start : stage.end]
            lines.append(
                f"  stage {stage.name!r}: steps {stage.start}..{stage.end - 1}, {stage.n_examples} "
                f"examples, batch {stage.batch_size}, {opt.kind} ({extra}, weight decay "
                f"{opt.weight_decay:g}), lr {lrs.min():.3g}..{lrs.max():.3g}"
            )
            if stage.groups is not None:
                trained = sum(len(g.parameters) for g in stage.groups)
                changing = sorted({k for g in stage.groups for k in g.schedule} - {"lr"})
                lines.append(
                    f"    {len(stage.groups)} parameter group(s) training {trained} of "
                    f"{len(self.parameter_names)} parameters"
                    + (f"; per-step {', '.join(changing)}" if changing else "")
                )
        if self.clipping is not None:
            clipped = int(np.sum(self.clipping.coefficient < 1))
            lines.append(f"  gradient norms clipped at {clipped} of {self.n_steps} steps")
        if self.random_states is not None:
            lines.append(
                f"  random forward pass (dropout) at {self.random_states.steps.size} steps, "
                f"generator states recorded ({self.random_states.device})"
            )
        lines.append(f"  checkpoints for attribution at steps {list(self.checkpoint_steps)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Trajectory(n_train={self.n_train}, n_steps={self.n_steps}, stages="
            f"{[s.name for s in self.stages]}, checkpoint_steps={list(self.checkpoint_steps)})"
        )
