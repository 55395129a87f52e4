"""Record a :class:`~sourcekit.Trajectory` from a Hugging Face ``transformers.Trainer``.

``pip install "sourcekit[hf]"``. Give the trainer the callback and its dataset; train as
usual; the trajectory is ``callback.trajectory`` once ``trainer.train()`` returns::

    callback = TrajectoryCallback(train, loss="next_token_cross_entropy", checkpoint_every=10)
    trainer = Trainer(model, args, train_dataset=callback.dataset, callbacks=[callback])
    trainer.train()
    trajectory = callback.trajectory

What the trainer does is recorded as it happens: its optimiser (AdamW with the default
groups that leave biases and normalisation weights without weight decay), the learning
rate its scheduler sets at every step, gradient accumulation (each micro-batch's
examples), the gradient-norm clipping at ``max_grad_norm``, and dropout (the generator
state before each forward pass). The recorder's self-check replays the first steps and
raises a :class:`~sourcekit.exceptions.TrajectoryError` if the record would not
reproduce the run (a loss other than the declared one, mixed precision...).

The loss must be the per-example form of what the model minimises: ``"cross_entropy"``
for a classifier's ``labels``, ``"next_token_cross_entropy"`` for a causal LM trained on
``labels`` = its ``input_ids`` (the model's own loss is the mean over the batch's tokens:
the same when every sequence of a batch counts as many tokens).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError as err:
    raise ModuleNotFoundError(
        'sourcekit.integrations.hf needs transformers: pip install "sourcekit[hf]".'
    ) from err

from .._imports import import_object, importable_name
from ._recording import Recording, RecordingCallback

__all__ = ["TrajectoryCallback", "from_config"]


def from_config(model_class: str, config: dict[str, Any]) -> nn.Module:
    """A fresh Hugging Face model of class ``model_class`` built from a config dict.

    The factory a recorded run names in its manifest, so that a saved trajectory rebuilds
    its model without a download: ``model_class`` is ``"module:Class"``
    (``"transformers:GPT2LMHeadModel"``), ``config`` the model's ``config.to_dict()``.

    Examples
    --------
    >>> from sourcekit.integrations.hf import from_config
    >>> model = from_config("transformers:GPT2LMHeadModel", {"n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 11})
    >>> type(model).__name__, model.lm_head.weight is model.transformer.wte.weight
    ('GPT2LMHeadModel', True)
    """
    cls = import_object(model_class)
    return cls(cls.config_class.from_dict(config))


def _architecture(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    name = importable_name(type(model))
    config = getattr(model, "config", None)
    if name is None or config is None or not hasattr(config, "to_json_string"):
        return None
    return "sourcekit.integrations.hf:from_config", {
        "model_class": name,
        "config": json.loads(config.to_json_string(use_diff=False)),
    }


class TrajectoryCallback(RecordingCallback, TrainerCallback):
    """Records the :class:`~sourcekit.Trajectory` of a ``transformers.Trainer`` run.

    Parameters
    ----------
    train : Examples
        The training examples: inputs as a dict of tensors (``input_ids``,
        ``attention_mask``...), targets the ``labels``. Pass ``callback.dataset`` to the
        Trainer as its ``train_dataset``: item i is ``{**inputs_i, "labels": targets_i}``.
    loss : str or callable, default="cross_entropy"
        The per-example loss whose batch mean the model minimises (see
        :mod:`sourcekit.objectives`): ``"next_token_cross_entropy"`` for a causal LM.
    measurement : str or callable, default="margin"
        What attribution explains for a query (``"next_token_margin"`` for a causal LM).
    architecture, architecture_kwargs : optional
        How to rebuild the model (see :class:`~sourcekit.TrajectoryRecorder`). By default
        the model's class and its config (:func:`from_config`), so a saved trajectory
        rebuilds it without a download.
    checkpoint_every, checkpoint_steps : optional
        Where to keep checkpoints for attribution (one of them is needed).
    verify : bool, default=True
        The recorder's self-check.
    targets_key : str, default="labels"
        The key of the targets in each item of the dataset.

    Attributes
    ----------
    dataset : torch.utils.data.Dataset
        The training set to give the Trainer.
    trajectory : Trajectory or None
        The recorded run, once ``trainer.train()`` has returned.

    Notes
    -----
    The data loader must read ``callback.dataset`` in the training process
    (``dataloader_num_workers=0``, the default), and evaluation must use another dataset.
    A saved trajectory records ``callback.dataset``'s examples in their order: the
    indices of the scores are theirs.

    Examples
    --------
    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.integrations.hf import TrajectoryCallback
    >>> ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    >>> train = sourcekit.Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids)
    >>> callback = TrajectoryCallback(train, loss="next_token_cross_entropy", checkpoint_every=10)
    >>> item = callback.dataset[1]  # what the Trainer collates into batches
    >>> sorted(item), item["labels"].tolist()
    (['attention_mask', 'input_ids', 'labels'], [4, 5, 6])

    Pass ``train_dataset=callback.dataset, callbacks=[callback]`` to the ``Trainer`` (see
    the documentation's page on Hugging Face and Lightning for a run end to end).
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        if getattr(args, "dataloader_num_workers", 0):
            raise ValueError(
                "The sourcekit TrajectoryCallback notes each batch as the data loader fetches it, "
                f"in the training process; got dataloader_num_workers={args.dataloader_num_workers}. "
                "Set dataloader_num_workers=0."
            )
        if state.global_step:
            raise ValueError(
                f"The trainer resumes at step {state.global_step}; the sourcekit "
                "TrajectoryCallback records a run from its first step. Train from the start."
            )
        options = dict(self._options)
        if options["architecture"] is None:
            found = _architecture(model)
            if found is not None:
                options["architecture"], options["architecture_kwargs"] = found
        # accelerate wraps the optimiser; the recorder follows the torch optimiser inside
        inner = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                f"The trainer's optimiser is a {type(inner).__name__}, not a torch.optim "
                "optimiser the recorder can follow; use one of torch's (optim='adamw_torch', "
                "the default, or 'sgd')."
            )
        clip = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        self.trajectory = None
        self._recording = Recording(self.dataset, options)
        self._recording.start(model, inner, clip, "Hugging Face")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._recording is None:
            return
        recording, self._recording = self._recording, None
        self.trajectory = recording.finish()
