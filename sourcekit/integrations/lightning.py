"""Record a :class:`~sourcekit.Trajectory` from a PyTorch Lightning ``Trainer.fit``.

``pip install "sourcekit[lightning]"``. Give the trainer the callback, and train on
batches of the callback's dataset; the trajectory is ``callback.trajectory`` once
``fit`` returns::

    callback = TrajectoryCallback(train, loss="cross_entropy", checkpoint_every=10)
    loader = DataLoader(callback.dataset, batch_size=32, shuffle=True)
    Trainer(max_epochs=3, callbacks=[callback]).fit(module, loader)
    trajectory = callback.trajectory

The module's ``training_step`` computes its loss from ``self(...)``, the module's own
forward pass, on the batch it is given (``(x, y)`` for a tensor input, the dict of inputs
with the targets under ``"labels"`` for dict inputs), and returns the batch mean of the
per-example loss declared here. Recorded as it happens: the optimiser that
``configure_optimizers`` built and the learning rate its scheduler sets at every step,
``accumulate_grad_batches`` (each micro-batch's examples), ``gradient_clip_val`` (norm
clipping) and dropout. Lightning runs the forward and backward passes inside
``optimizer.step(closure)``; the recorder reads the step once the closure has run.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

try:
    import pytorch_lightning as pl
except ImportError:
    try:  # the unified ``lightning`` package
        import lightning.pytorch as pl  # type: ignore[no-redef]
    except ImportError as err:
        raise ModuleNotFoundError(
            "sourcekit.integrations.lightning needs PyTorch Lightning: "
            'pip install "sourcekit[lightning]".'
        ) from err

from .._imports import importable_name
from ._recording import Recording, RecordingCallback

__all__ = ["TrajectoryCallback"]


class TrajectoryCallback(RecordingCallback, pl.Callback):
    """Records the :class:`~sourcekit.Trajectory` of a Lightning ``Trainer.fit``.

    Parameters
    ----------
    train : Examples
        The training examples; train on ``callback.dataset`` (item i: ``(x_i, y_i)`` for
        a tensor input, ``(inputs_i, y_i)`` for a tuple, ``{**inputs_i, "labels": y_i}``
        for a dict).
    loss : str or callable, default="cross_entropy"
        The per-example loss whose batch mean ``training_step`` returns.
    measurement : str or callable, default="margin"
        What attribution explains for a query.
    architecture, architecture_kwargs : optional
        How to rebuild the module (see :class:`~sourcekit.TrajectoryRecorder`). By
        default the module's class called with its ``hparams`` (what
        ``save_hyperparameters()`` stores, as Lightning's own ``load_from_checkpoint``
        does), saved by name where the class is importable (defined in a module, not in
        ``__main__``); otherwise the trajectory rebuilds the module in memory only and
        cannot be saved.
    checkpoint_every, checkpoint_steps : optional
        Where to keep checkpoints for attribution (one of them is needed).
    verify : bool, default=True
        The recorder's self-check.
    targets_key : str, default="labels"
        The key of the targets in each item, for dict inputs.

    Attributes
    ----------
    dataset : torch.utils.data.Dataset
        The training set to load batches from (``num_workers=0``).
    trajectory : Trajectory or None
        The recorded run, once ``fit`` has returned.

    Examples
    --------
    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.integrations.lightning import TrajectoryCallback
    >>> train = sourcekit.Examples(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> callback = TrajectoryCallback(train, checkpoint_every=4)
    >>> x, y = callback.dataset[0]  # an item of the data loader's batches
    >>> x.shape, y.shape
    (torch.Size([3]), torch.Size([]))

    Pass ``callbacks=[callback]`` to the ``Trainer`` and fit on a ``DataLoader`` over
    ``callback.dataset`` (see the documentation's page on Hugging Face and Lightning).
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"The module's configure_optimizers returned {len(trainer.optimizers)} optimisers; "
                "the sourcekit TrajectoryCallback records a run with one. Return one optimiser "
                "(with its parameter groups and scheduler)."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "The module uses manual optimisation; record such a loop with "
                "sourcekit.TrajectoryRecorder directly (recorder.step after each optimizer step)."
            )
        if trainer.global_step:
            raise ValueError(
                f"The trainer resumes at step {trainer.global_step}; the sourcekit "
                "TrajectoryCallback records a run from its first step. Fit from the start."
            )
        clip = None
        if trainer.gradient_clip_val:
            algorithm = trainer.gradient_clip_algorithm or "norm"
            algorithm = str(getattr(algorithm, "value", algorithm))
            if algorithm != "norm":
                raise ValueError(
                    f"The trainer clips with gradient_clip_algorithm={algorithm!r}; sourcekit "
                    "replays norm clipping only. "
                    "Use gradient_clip_algorithm='norm' (the default)."
                )
            clip = float(trainer.gradient_clip_val)
        options = dict(self._options)
        if options["architecture"] is None:
            hparams = dict(getattr(pl_module, "hparams", {}) or {})
            module_class: type = type(pl_module)
            name = importable_name(module_class)
            if name is not None:
                options["architecture"], options["architecture_kwargs"] = name, hparams
            else:  # rebuilt in memory; saving needs a class importable by name
                options["architecture"] = functools.partial(module_class, **hparams)
        (optimizer,) = trainer.optimizers
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's own
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                f"The module's optimiser is a {type(inner).__name__}, not a torch.optim optimiser "
                "the recorder can follow."
            )
        self.trajectory = None
        self._recording = Recording(self.dataset, options)
        self._recording.start(pl_module, inner, clip, "Lightning")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._recording is None:
            return
        recording, self._recording = self._recording, None
        self.trajectory = recording.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._recording is not None:
            recording, self._recording = self._recording, None
            recording.abandon()
