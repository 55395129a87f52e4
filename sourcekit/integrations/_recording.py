"""What the trainer callbacks share: a dataset that notes its batches, and the recording.

A trainer owns its loop: it draws batches through a sampler of its own, accumulates
gradients over micro-batches, clips, steps the optimiser and the scheduler. The
callbacks observe that loop without changing it:

- :class:`IndexedDataset` serves the training examples and notes the indices of every
  batch the data loader fetches (``__getitems__``), in order, so the batches need no
  index column and any sampler works;
- :class:`Recording` opens a :class:`~sourcekit.TrajectoryRecorder` stage on the
  trainer's optimiser, takes one noted batch per training-mode forward pass of the
  model, and after every optimiser step records the step with the indices of its
  micro-batches. Data loaders that fetch ahead (as trainers' loaders do) leave batches
  waiting in the queue; they are taken in order.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..exceptions import TrajectoryError
from ..trajectory import Examples, Trajectory, TrajectoryRecorder
from ..trajectory._examples import check_training_set

__all__ = ["IndexedDataset", "Recording", "recorder_options"]


class IndexedDataset(torch.utils.data.Dataset):
    """The training examples as a map-style dataset that notes each batch it serves.

    Item i is, for dict inputs, the dict of its inputs with the target under
    ``targets_key`` (what Hugging Face models take as ``model(**batch)``); for a tensor
    input, the pair ``(x, y)``; for tuple inputs, ``(inputs, y)``. A data loader reads
    it in batches through ``__getitems__``, which notes their indices; the recording
    takes them in order.
    """

    def __init__(self, train: Examples, targets_key: str = "labels") -> None:
        check_training_set(train)
        self.train = train
        self.targets_key = targets_key
        self._batches: deque[np.ndarray] = deque()

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, index: int) -> Any:
        inputs, target = self.train.inputs, self.train.targets[index]
        if isinstance(inputs, dict):
            return {**{k: t[index] for k, t in inputs.items()}, self.targets_key: target}
        if isinstance(inputs, tuple):
            return tuple(t[index] for t in inputs), target
        return inputs[index], target

    def __getitems__(self, indices: list[int]) -> list[Any]:
        self._batches.append(np.asarray(indices, dtype=np.int64))
        return [self[int(i)] for i in indices]

    def next_batch(self) -> np.ndarray | None:
        """The indices of the oldest batch served and not yet taken (None: none waits)."""
        return self._batches.popleft() if self._batches else None

    def clear(self) -> None:
        self._batches.clear()


def _leading_size(args: tuple, kwargs: dict) -> int | None:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    return None


class Recording:
    """One trainer run recorded with a :class:`~sourcekit.TrajectoryRecorder`.

    ``start`` opens a stage on the trainer's optimiser (the clipping bound the trainer
    applies with torch's ``clip_grad_norm_`` declared), ``finish`` closes it and returns
    the trajectory. Between them, every training-mode forward pass of ``model`` takes
    the next noted batch, and every optimiser step is recorded with the batches of its
    forward passes.
    """

    def __init__(self, dataset: IndexedDataset, recorder_options: dict[str, Any]) -> None:
        self.dataset = dataset
        self.options = recorder_options
        self.recorder: TrajectoryRecorder | None = None
        self._stack: contextlib.ExitStack | None = None
        self._parts: list[np.ndarray] = []

    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip_grad_norm: float | None,
        who: str,
    ) -> None:
        if self._stack is not None:
            raise TrajectoryError(
                f"The {who} callback is recording a run already; use one callback per training "
                "call (a new one for each trainer.train() or fit())."
            )
        self.dataset.clear()
        self.recorder = TrajectoryRecorder(model, self.dataset.train, **self.options)
        stack = contextlib.ExitStack()
        stack.enter_context(self.recorder.stage(optimizer, clip_grad_norm=clip_grad_norm))
        stack.callback(model.register_forward_pre_hook(self._take, with_kwargs=True).remove)
        stack.callback(optimizer.register_step_post_hook(self._step).remove)
        self._stack = stack
        self._who = who

    def _take(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        batch = self.dataset.next_batch()
        if batch is None:
            raise TrajectoryError(
                f"The model ran a training forward pass on a batch that did not come from the "
                f"{self._who} callback's dataset. Train on callback.dataset (read in batches by "
                "a data loader with num_workers=0), and call the model on each batch once."
            )
        size = _leading_size(args, kwargs)
        if size is not None and size != batch.size:
            raise TrajectoryError(
                f"The model's training forward pass has {size} examples, but the next batch "
                f"served by the {self._who} callback's dataset has {batch.size}. Train on "
                "callback.dataset only (give evaluation another dataset), with num_workers=0."
            )
        self._parts.append(batch)

    def _step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self.recorder is not None
        parts, self._parts = self._parts, []
        if not parts:
            raise TrajectoryError(
                f"The optimiser stepped without a training forward pass of the model since the "
                f"last step. The {self._who} callback records the batches of the model's own "
                "forward passes: compute the loss from model(...) (in Lightning, self(...))."
            )
        self.recorder.step(parts[0] if len(parts) == 1 else parts)

    def finish(self) -> Trajectory:
        assert self.recorder is not None and self._stack is not None
        stack, self._stack = self._stack, None
        stack.close()
        self.dataset.clear()
        return self.recorder.finish()

    def abandon(self) -> None:
        """Remove the hooks of an unfinished recording (a training call that failed)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            with contextlib.suppress(TrajectoryError):
                stack.close()


def recorder_options(
    loss: str | Callable,
    measurement: str | Callable,
    architecture: str | Callable | None,
    architecture_kwargs: dict | None,
    checkpoint_every: int | None,
    checkpoint_steps: Any,
    verify: bool,
) -> dict[str, Any]:
    """The :class:`~sourcekit.TrajectoryRecorder` keywords a callback passes on."""
    if checkpoint_every is None and checkpoint_steps is None:
        raise ValueError(
            "The callback needs to know where to keep checkpoints: pass checkpoint_every=k or "
            "checkpoint_steps=[...] (checkpoint_steps=[] keeps the initial and final states)."
        )
    return {
        "loss": loss,
        "measurement": measurement,
        "architecture": architecture,
        "architecture_kwargs": architecture_kwargs,
        "checkpoint_every": checkpoint_every,
        "checkpoint_steps": checkpoint_steps,
        "verify": verify,
    }


class RecordingCallback:
    """What the trainers' callbacks share: the dataset that notes each batch's example
    indices, the recorder's keywords, and the trajectory once training has ended.

    The trainer-specific callbacks (``sourcekit.integrations.hf`` and ``.lightning``)
    derive from it and from their trainer's callback type; their docstrings describe
    the parameters.
    """

    def __init__(
        self,
        train: Examples,
        *,
        loss: str | Callable = "cross_entropy",
        measurement: str | Callable = "margin",
        architecture: str | Callable | None = None,
        architecture_kwargs: dict | None = None,
        checkpoint_every: int | None = None,
        checkpoint_steps: Sequence[int] | None = None,
        verify: bool = True,
        targets_key: str = "labels",
    ) -> None:
        super().__init__()
        self.dataset = IndexedDataset(train, targets_key)
        self._options = recorder_options(
            loss,
            measurement,
            architecture,
            architecture_kwargs,
            checkpoint_every,
            checkpoint_steps,
            verify,
        )
        self._recording: Recording | None = None
        self.trajectory: Trajectory | None = None
