"""``TrajectoryRecorder``: record a run from a user's own training loop.

One call per step::

    recorder = TrajectoryRecorder(model, train, loss="cross_entropy", checkpoint_every=50)
    with recorder.stage(optimizer, batch_size=64):
        for indices in batches:
            optimizer.zero_grad()
            loss_fn(model(train.inputs[indices]), train.targets[indices]).mean().backward()
            optimizer.step()
            recorder.step(indices)
    trajectory = recorder.finish()

While a stage is open the recorder keeps a step pre-hook on the optimiser to read the
learning rate each update really used; the hook is removed when the stage closes. The
model and the optimiser are only read, never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..exceptions import TrajectoryError
from ._examples import Examples, check_training_set
from ._optimizer import OptimizerSpec
from ._storage import Checkpoint
from ._trajectory import Stage, Trajectory, _as_index_array

__all__ = ["TrajectoryRecorder"]

_FIXED_SETTINGS = ("momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad")


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> Checkpoint:
    params = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
    buffers = {n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()}
    opt_state: dict[str, Any] = {}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        per_name: dict[str, dict[str, Any]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.ndim == 0 and key == "step":
                        opt_state["step"] = int(value.item())
                    elif key == "step":
                        opt_state["step"] = int(value)
                    elif isinstance(value, torch.Tensor):
                        per_name.setdefault(key, {})[names[id(p)]] = value.detach().to(
                            "cpu", copy=True
                        )
        opt_state.update(per_name)
    return Checkpoint(step=step, params=params, buffers=buffers, optimizer=opt_state)


class TrajectoryRecorder:
    """Record a training run driven by the user's own loop.

    Parameters
    ----------
    model : nn.Module
        The model being trained. It is read (at each checkpoint), never modified.
    train : Examples
        All training examples of the run; batch indices passed to :meth:`step` index it.
    loss : str or callable, default="cross_entropy"
        Per-example training loss ``(outputs, targets) -> (n,)``; the loop must minimise
        its mean over the batch.
    measurement : str or callable, default="margin"
        What attribution explains for a query ``(outputs, targets) -> (n,)``.
    architecture : str or callable, optional
        ``"package.module:factory"`` that rebuilds the model; needed to save the
        trajectory. Defaults to a copy of ``model`` (enough in memory).
    architecture_kwargs : dict, optional
        Keyword arguments for the factory.
    checkpoint_steps : sequence of int, optional
        Global steps at which to keep a checkpoint for attribution.
    checkpoint_every : int, optional
        Keep a checkpoint at every multiple of this many steps (0, k, 2k, ...).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sourcekit import Examples, TrajectoryRecorder
    >>> torch.manual_seed(0) and None
    >>> train = Examples(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> model = nn.Linear(4, 3)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> recorder = TrajectoryRecorder(model, train, checkpoint_every=2)
    >>> with recorder.stage(optimizer, batch_size=8):
    ...     for start in range(0, 32, 8):
    ...         idx = torch.arange(start, start + 8)
    ...         optimizer.zero_grad()
    ...         nn.functional.cross_entropy(model(train.inputs[idx]), train.targets[idx]).backward()
    ...         optimizer.step()
    ...         recorder.step(idx)
    >>> trajectory = recorder.finish()
    >>> trajectory.n_steps, trajectory.checkpoint_steps
    (4, (0, 2))
    """

    def __init__(
        self,
        model: nn.Module,
        train: Examples,
        *,
        loss: str | Callable = "cross_entropy",
        measurement: str | Callable = "margin",
        architecture: str | Callable | None = None,
        architecture_kwargs: dict | None = None,
        checkpoint_steps: Sequence[int] | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"The 'model' must be an nn.Module; got {type(model).__name__}.")
        check_training_set(train)
        if checkpoint_steps is None and checkpoint_every is None:
            raise ValueError(
                "TrajectoryRecorder needs to know where to keep checkpoints: pass "
                "checkpoint_every=k or checkpoint_steps=[...] (checkpoint_steps=[] keeps only "
                "the initial and final states, enough for exact unrolling)."
            )
        if checkpoint_every is not None and (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, (int, np.integer))
            or checkpoint_every < 1
        ):
            raise ValueError(
                f"The 'checkpoint_every' parameter must be an int >= 1; got {checkpoint_every!r}."
            )
        self._model = model
        self._train = train
        self._loss = loss
        self._measurement = measurement
        self._architecture = architecture if architecture is not None else model
        self._architecture_kwargs = architecture_kwargs
        self._explicit_steps = (
            None if checkpoint_steps is None else sorted({int(s) for s in checkpoint_steps})
        )
        self._every = checkpoint_every
        if self._explicit_steps and self._explicit_steps[0] < 0:
            raise ValueError(f"Checkpoint steps must be >= 0; got {self._explicit_steps[0]}.")
        self._checkpoints: dict[int, Checkpoint] = {}
        self._stages: list[Stage] = []
        self._learning_rates: list[float] = []
        self._batches: list[np.ndarray] = []
        self._step = 0
        self._open: dict[str, Any] | None = None
        self._finished = False
        self._train_mode: bool | None = None

    # --- helpers ---------------------------------------------------------------------
    def _wants_checkpoint(self, step: int) -> bool:
        if self._explicit_steps is not None and step in self._explicit_steps:
            return True
        return self._every is not None and step % self._every == 0

    def _keep(self, optimizer: torch.optim.Optimizer | None) -> None:
        self._checkpoints[self._step] = _snapshot(self._model, optimizer, self._step)

    @property
    def n_steps(self) -> int:
        """Steps recorded so far."""
        return self._step

    # --- the recording API -------------------------------------------------------------
    @contextmanager
    def stage(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        name: str | None = None,
        examples: Any = None,
        batch_size: int | None = None,
        recipe: dict | None = None,
    ) -> Iterator[TrajectoryRecorder]:
        """Open a stage trained by ``optimizer`` (a fresh one per stage).

        ``examples`` are the indices of the training examples this stage trains on
        (default: all); ``batch_size`` defaults to the largest batch seen.
        """
        if self._finished:
            raise TrajectoryError("This recorder has finished; create a new TrajectoryRecorder.")
        if self._open is not None:
            raise TrajectoryError("A stage is already open; stages cannot be nested.")
        spec = OptimizerSpec.from_torch(optimizer)
        if any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
            raise TrajectoryError(
                "The optimizer already holds state (it has taken steps). Replay starts every stage "
                "from a fresh optimizer: create a new one for each stage."
            )
        trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
        model_params = dict(self._model.named_parameters())
        untrained = [n for n, p in model_params.items() if id(p) not in trained]
        if untrained or len(trained) != len(model_params):
            raise TrajectoryError(
                f"The optimizer does not train exactly the model's parameters (not trained: "
                f"{untrained[:5]}). sourcekit records runs that train every parameter; build the "
                "optimizer from model.parameters()."
            )
        stage_examples = (
            np.arange(len(self._train), dtype=np.int64)
            if examples is None
            else _as_index_array(examples, "stage examples")
        )
        if self._train_mode is None:
            self._train_mode = self._model.training
        if self._step == 0 and 0 not in self._checkpoints:
            self._keep(None)
        record: dict[str, Any] = {
            "optimizer": optimizer,
            "spec": spec,
            "name": name or f"stage{len(self._stages)}",
            "start": self._step,
            "examples": stage_examples,
            "batch_size": batch_size,
            "recipe": recipe,
            "pending_lr": None,
        }

        def pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            lrs = {float(g["lr"]) for g in opt.param_groups}
            if len(lrs) != 1:
                raise TrajectoryError(
                    f"The optimizer's parameter groups use different learning rates {sorted(lrs)}; "
                    "sourcekit records one learning rate per step."
                )
            if record["pending_lr"] is not None:
                raise TrajectoryError(
                    "optimizer.step() was called twice without recorder.step(indices) in between; "
                    "call recorder.step once after every optimizer step."
                )
            changed = [
                f"{key} {settings[key]!r} -> {group.get(key)!r}"
                for group in opt.param_groups
                for key in settings
                if group.get(key) != settings[key]
            ]
            if changed:
                raise TrajectoryError(
                    f"The optimizer's hyperparameters changed during stage {record['name']!r} "
                    f"({', '.join(changed[:3])}); sourcekit records one setting per stage and only the "
                    "learning rate may follow a schedule. Keep them fixed (e.g. "
                    "OneCycleLR(..., cycle_momentum=False)) or start a new stage."
                )
            record["pending_lr"] = lrs.pop()

        # Everything replay follows but the learning rate must stay as it was at the start.
        settings = {k: v for k, v in optimizer.param_groups[0].items() if k in _FIXED_SETTINGS}
        handle = optimizer.register_step_pre_hook(pre_hook)
        self._open = record
        try:
            yield self
        finally:
            handle.remove()
            self._open = None
        if record["pending_lr"] is not None:
            raise TrajectoryError(
                "The last optimizer step of the stage was not followed by recorder.step(indices)."
            )
        if self._step == record["start"]:
            raise TrajectoryError(
                f"Stage {record['name']!r} recorded no steps; call recorder.step(indices) after "
                "every optimizer step inside the stage."
            )
        sizes = [b.size for b in self._batches[record["start"] :]]
        self._stages.append(
            Stage(
                name=record["name"],
                optimizer=spec,
                start=record["start"],
                end=self._step,
                examples=stage_examples,
                batch_size=int(batch_size or max(sizes)),
                recipe=recipe,
            )
        )

    def step(self, batch_indices: Any) -> None:
        """Record the update just taken: the indices of the batch it used.

        Call once right after every ``optimizer.step()``.
        """
        record = self._open
        if record is None:
            raise TrajectoryError(
                "recorder.step() was called outside a stage; wrap the loop in `with recorder.stage(optimizer):`."
            )
        if record["pending_lr"] is None:
            raise TrajectoryError(
                "recorder.step() was called without a preceding optimizer.step(); call it once "
                "right after each optimizer step."
            )
        idx = _as_index_array(batch_indices, "batch_indices")
        n = len(self._train)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise TrajectoryError(
                f"The batch indices of step {self._step} must be non-empty and lie in [0, {n}); got "
                f"{idx.size} indices"
                + (f" from {idx.min()} to {idx.max()}" if idx.size else "")
                + "."
            )
        self._learning_rates.append(record["pending_lr"])
        record["pending_lr"] = None
        self._batches.append(idx)
        self._step += 1
        if self._wants_checkpoint(self._step):
            self._keep(record["optimizer"])

    def finish(self) -> Trajectory:
        """Close the recording and return the :class:`Trajectory`."""
        if self._open is not None:
            raise TrajectoryError("Close the open stage (leave its `with` block) before finish().")
        if not self._stages:
            raise TrajectoryError(
                "Nothing was recorded: open a stage and record at least one step."
            )
        total = self._step
        if self._explicit_steps and self._explicit_steps[-1] > total:
            raise TrajectoryError(
                f"Checkpoint step {self._explicit_steps[-1]} was requested but the run has only "
                f"{total} steps; request steps in [0, {total})."
            )
        if total not in self._checkpoints:
            self._keep(None)
        steps = [s for s in self._checkpoints if s < total and self._wants_checkpoint(s)]
        self._finished = True
        return Trajectory(
            architecture=self._architecture
            if self._architecture_kwargs is None
            else _with_kwargs(self._architecture, self._architecture_kwargs),
            train=self._train,
            stages=self._stages,
            learning_rates=np.asarray(self._learning_rates),
            batches=self._batches,
            checkpoints=self._checkpoints,
            checkpoint_steps=steps,
            loss=self._loss,
            measurement=self._measurement,
            train_mode=bool(self._train_mode),
        )


def _with_kwargs(source: Any, kwargs: dict) -> Any:
    from ._architecture import Architecture

    return Architecture(source, kwargs)
