"""``TrajectoryRecorder``: record a run from a user's own training loop.

One call per step::

    recorder = TrajectoryRecorder(model, train, loss="cross_entropy", checkpoint_every=50)
    with recorder.stage(optimizer, batch_size=64):
        for indices in batches:
            optimizer.zero_grad()
            loss_fn(model(train.inputs[indices]), train.targets[indices]).mean().backward()
            recorder.clip_grad_norm_(1.0)  # optional: clips and records
            optimizer.step()
            recorder.step(indices)
    trajectory = recorder.finish()

While a stage is open the recorder keeps hooks that only read: a step pre-hook on the
optimiser (the settings of every parameter group at every step, and whether the
gradients are still those backward left), a hook on each trained parameter (the norm of
its gradient after backward) and a forward pre-hook on the model (torch's generator
state before a random forward pass, so that dropout can be replayed). They are removed
when the stage closes. The model and the optimiser are never changed (except by
``recorder.clip_grad_norm_``, which clips the gradients as torch's function does).

The self-check (``verify=True``) reproduces the first steps of every stage, and every
fiftieth step after them, from the record as they are taken, checks at every step that
the gradients are those backward left and that nothing else wrote to the parameters, and
raises a TrajectoryError naming the likely causes as soon as the record does not
reproduce what the loop did (:mod:`sourcekit.trajectory._selfcheck`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..exceptions import TrajectoryError
from ..objectives import LOSSES, check_class_targets, function_spec, resolve_function
from ._architecture import Architecture
from ._examples import Examples, check_training_set
from ._optimizer import OptimizerSpec
from ._replay import StepPlan
from ._selfcheck import StepCapture, check_gradients, check_update, verified
from ._settings import GradientClipping, ParameterGroup, RandomStates
from ._stages import Stage
from ._storage import Checkpoint
from ._trajectory import Trajectory, _as_index_array

__all__ = ["TrajectoryRecorder"]

# Settings replay follows but a step may not change (a new stage may).
_FIXED = ("dampening", "nesterov", "eps", "amsgrad", "maximize", "capturable", "differentiable")


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


def _group_values(group: dict[str, Any], kind: str) -> dict[str, float]:
    """The settings of one torch parameter group that may change at every step."""
    values = {"lr": float(group["lr"]), "weight_decay": float(group["weight_decay"])}
    if kind == "sgd":
        values["momentum"] = float(group["momentum"])
    else:
        values["beta1"], values["beta2"] = (float(b) for b in group["betas"])
    return values


def _norms(model: nn.Module) -> torch.Tensor:
    """The norm of every parameter: unchanged exactly while nothing writes to them."""
    with torch.no_grad():
        return torch.stack(
            [torch.linalg.vector_norm(p.detach().float()) for p in model.parameters()]
        )


def _signature(optimizer: torch.optim.Optimizer) -> list[tuple[int, ...]]:
    """The parameters each group trains (those requiring gradients), by identity."""
    return [tuple(id(p) for p in g["params"] if p.requires_grad) for g in optimizer.param_groups]


def _random_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


class _StageRecord:
    """What an open stage has recorded so far."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        start: int,
        examples: np.ndarray,
        batch_size: int | None,
        recipe: dict | None,
        groups: list[tuple[tuple[str, ...], OptimizerSpec]],
        fixed: list[dict[str, Any]],
    ) -> None:
        self.optimizer = optimizer
        self.signature = _signature(optimizer)
        self.parameters: list[nn.Parameter] = []  # the model's, in order (set when opened)
        self.device = torch.device("cpu")  # where the model draws its random numbers
        self.name = name
        self.start = start
        self.examples = examples
        self.batch_size = batch_size
        self.recipe = recipe
        self.groups = groups
        self.fixed = fixed
        self.values: list[dict[str, list[float]]] = [{} for _ in groups]
        self.pending: dict[str, Any] | None = None  # set by the optimiser's pre-hook
        self.clip: tuple[float, float, float] | None = None  # set by clip_grad_norm_
        self.forwards: list[tuple[torch.Tensor, torch.device]] = []  # random forwards this step
        # The gradient each trained parameter had after backward, and its version counter
        # (any in-place change bumps it, as clipping does).
        self.grads: dict[str, tuple[torch.Tensor, int]] = {}
        self.buffers: dict[str, torch.Tensor] | None = None  # before the forward of a checked step
        self.capture: StepCapture | None = None  # the state a checked step started from
        self.parameter_versions: list[int] | None = None  # after the last optimizer step
        self.parameter_norms: torch.Tensor | None = None  # the same, before a checked step

    @property
    def trained(self) -> list[str]:
        return [n for names, _ in self.groups for n in names]


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
        its mean over the batch. ``"mse_loss"`` matches ``F.mse_loss``; label smoothing
        and class weights: :class:`~sourcekit.objectives.CrossEntropy` (or pass torch's
        ``nn.CrossEntropyLoss`` object).
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
    verify : bool, default=True
        Check that the record reproduces the run, while it is recorded: the first four
        steps of every stage and every fiftieth step after them are reproduced from the
        record (gradient and update), and every step is checked for gradients changed
        after backward and parameters written outside the optimizer. A
        :class:`~sourcekit.exceptions.TrajectoryError` names the likely causes and their
        fixes at the first step that differs. It costs about a tenth of the training time
        on a CPU, more for a tiny model (see "Cost and memory" in the documentation), and,
        at a checked step, a copy of the trained parameters, their gradients and optimizer
        state; ``verify=False`` skips it.

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

    A loop whose loss is not the recorded one fails the self-check (here it minimises a
    label-smoothed cross-entropy, recorded as the plain one):

    >>> model = nn.Linear(4, 3)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> recorder = TrajectoryRecorder(model, train, checkpoint_every=2)
    >>> with recorder.stage(optimizer):
    ...     for start in range(0, 32, 8):
    ...         idx = torch.arange(start, start + 8)
    ...         optimizer.zero_grad()
    ...         outputs = model(train.inputs[idx])
    ...         nn.functional.cross_entropy(outputs, train.targets[idx], label_smoothing=0.2).backward()
    ...         optimizer.step()
    ...         recorder.step(idx)
    Traceback (most recent call last):
    ...
    sourcekit.exceptions.TrajectoryError: The record does not reproduce the training run: ...
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
        verify: bool = True,
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
        if not isinstance(verify, bool):
            raise TypeError(f"The 'verify' parameter must be True or False; got {verify!r}.")
        self._loss_fn = resolve_function(loss, LOSSES, "loss")
        check_class_targets(self._loss_fn, train.targets, "training targets")
        self._model = model
        self._train = train
        self._loss = loss
        self._measurement = measurement
        # Taken now, before any hook is registered: the self-check replays on a copy.
        self._architecture = Architecture(
            architecture if architecture is not None else model, architecture_kwargs
        )
        self._explicit_steps = (
            None if checkpoint_steps is None else sorted({int(s) for s in checkpoint_steps})
        )
        self._every = checkpoint_every
        if self._explicit_steps and self._explicit_steps[0] < 0:
            raise ValueError(f"Checkpoint steps must be >= 0; got {self._explicit_steps[0]}.")
        self._verify = verify
        self._checkpoints: dict[int, Checkpoint] = {}
        self._stages: list[Stage] = []
        self._learning_rates: list[float] = []
        self._batches: list[np.ndarray] = []
        self._clipping: list[tuple[float, float, float]] = []
        self._random: dict[int, torch.Tensor] = {}
        self._random_device: str | None = None
        self._replay_model: nn.Module | None = None  # the self-check's copy of the model
        self._step = 0
        self._open: _StageRecord | None = None
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

    def _groups_of(
        self, optimizer: torch.optim.Optimizer
    ) -> tuple[list[tuple[tuple[str, ...], OptimizerSpec]], list[dict[str, Any]]]:
        """The trained parameters of every group (by name) and their fixed settings."""
        names = {id(p): n for n, p in self._model.named_parameters()}
        extra = [
            tuple(p.shape)
            for g in optimizer.param_groups
            for p in g["params"]
            if id(p) not in names
        ]
        if extra:
            raise TrajectoryError(
                f"The optimizer trains {len(extra)} tensor(s) that are not parameters of the "
                f"model (shapes {extra[:3]}); the recorder replays the model's parameters only. "
                "Make them parameters of the model (register them as nn.Parameter in a module)."
            )
        groups, fixed = [], []
        for i, group in enumerate(optimizer.param_groups):
            spec = OptimizerSpec.from_torch(optimizer, group=i)
            trained = tuple(names[id(p)] for p in group["params"] if p.requires_grad)
            fixed.append({k: group.get(k) for k in _FIXED})
            if trained:
                groups.append((trained, spec))
        if not groups:
            raise TrajectoryError(
                "The optimizer trains no parameter that requires gradients: every parameter it "
                "holds has requires_grad=False. Unfreeze the parameters to train."
            )
        return groups, fixed

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
        (default: all); ``batch_size`` defaults to the largest batch seen. The stage
        trains the parameters of the optimizer's groups that require gradients; every
        other parameter of the model stays fixed during the stage (a frozen body, a
        frozen embedding table), and attribution goes through the trained ones only.
        The optimizer's settings (learning rate, momentum, Adam's betas, weight decay)
        may change at every step, per group: each step's are recorded.
        """
        if self._finished:
            raise TrajectoryError("This recorder has finished; create a new TrajectoryRecorder.")
        if self._open is not None:
            raise TrajectoryError("A stage is already open; stages cannot be nested.")
        if any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
            raise TrajectoryError(
                "The optimizer already holds state (it has taken steps). Replay starts every stage "
                "from a fresh optimizer: create a new one for each stage."
            )
        groups, fixed = self._groups_of(optimizer)  # refuses optimisers replay cannot follow
        stage_examples = (
            np.arange(len(self._train), dtype=np.int64)
            if examples is None
            else _as_index_array(examples, "stage examples")
        )
        if self._train_mode is None:
            self._train_mode = self._model.training
        if self._step == 0 and 0 not in self._checkpoints:
            self._keep(None)
        record = _StageRecord(
            optimizer,
            name or f"stage{len(self._stages)}",
            self._step,
            stage_examples,
            batch_size,
            recipe,
            groups,
            fixed,
        )
        params = dict(self._model.named_parameters())
        record.parameters = list(params.values())
        record.device = next((p.device for p in record.parameters), torch.device("cpu"))

        def after_backward(name: str) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                if p.grad is not None:
                    record.grads[name] = (p.grad, p.grad._version)

            return hook

        def before_forward(module: nn.Module, args: Any) -> None:
            if record.pending is not None:
                return
            if self._verify and record.buffers is None and verified(self._step - record.start):
                record.buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
            if module.training:
                record.forwards.append((_random_state(record.device), record.device))

        def after_forward(module: nn.Module, args: Any, output: Any) -> None:
            if module.training and record.pending is None and record.forwards:
                before, _ = record.forwards[-1]
                if torch.equal(before, _random_state(record.device)):
                    record.forwards.pop()  # a deterministic forward pass: nothing to replay

        def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._before_optimizer_step(record, params)

        handles = [
            optimizer.register_step_pre_hook(before_step),
            self._model.register_forward_pre_hook(before_forward),
            self._model.register_forward_hook(after_forward),
        ]
        if self._verify:
            handles += [
                params[n].register_post_accumulate_grad_hook(after_backward(n))
                for n in record.trained
            ]
        self._open = record
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._open = None
        if record.pending is not None:
            raise TrajectoryError(
                "The last optimizer step of the stage was not followed by recorder.step(indices)."
            )
        if self._step == record.start:
            raise TrajectoryError(
                f"Stage {record.name!r} recorded no steps; call recorder.step(indices) after "
                "every optimizer step inside the stage."
            )
        sizes = [b.size for b in self._batches[record.start :]]
        self._stages.append(self._close(record, int(batch_size or max(sizes))))

    def _before_optimizer_step(
        self, record: _StageRecord, params: dict[str, nn.Parameter]
    ) -> None:
        """The optimiser's step pre-hook: read this step's settings; refuse what replay cannot follow."""
        if record.pending is not None:
            raise TrajectoryError(
                "optimizer.step() was called twice without recorder.step(indices) in between; "
                "call recorder.step once after every optimizer step."
            )
        opt = record.optimizer
        if _signature(opt) != record.signature:
            raise TrajectoryError(
                f"The parameters the optimizer trains changed during stage {record.name!r} (a "
                "parameter was frozen or unfrozen, or a group added); the recorder follows a "
                "fixed set per stage. Close the stage and open a new one with a fresh optimizer."
            )
        changed = [
            f"{key} {fixed[key]!r} -> {group.get(key)!r}"
            for group, fixed in zip(opt.param_groups, record.fixed, strict=True)
            for key in _FIXED
            if group.get(key) != fixed[key]
        ]
        if changed:
            raise TrajectoryError(
                f"The optimizer's settings changed during stage {record.name!r} "
                f"({', '.join(changed[:3])}); the learning rate, momentum, betas and weight decay "
                "may change at every step, these may not. Start a new stage instead."
            )
        missing = [n for n in record.trained if params[n].grad is None]
        if missing:
            raise TrajectoryError(
                f"The parameters {missing[:5]} have no gradient at step {self._step}, so the "
                "optimizer skips them, while sourcekit replays every trained parameter at every "
                "step. Leave parameters the forward pass does not use out of the optimizer (or "
                "set requires_grad=False)."
            )
        if self._verify:
            self._check_gradients(record, params)
        versions = [p._version for p in record.parameters]
        if (record.parameter_versions is not None and versions != record.parameter_versions) or (
            record.parameter_norms is not None
            and not torch.equal(record.parameter_norms, _norms(self._model))
        ):
            raise TrajectoryError(
                f"The model's parameters changed between optimizer steps (before step "
                f"{self._step}): something other than the optimizer wrote to them (weights clipped "
                "or edited in place, an average or a checkpoint loaded into the model). The "
                "record replays the optimizer's updates only: change parameters through it, or "
                "pass verify=False to record anyway."
            )
        if self._verify and verified(self._step - record.start):
            record.capture = self._capture(record, params)
        random = record.forwards
        if len(random) > 1:
            raise TrajectoryError(
                f"The model's forward pass drew random numbers {len(random)} times during step "
                f"{self._step} (dropout with gradient accumulation, or another random forward "
                "pass in training mode); replay runs one forward pass per step. Run one forward "
                "pass per step, or put the model in eval mode for the others."
            )
        record.pending = {
            "values": [
                _group_values(group, spec.kind)
                for (_, spec), group in zip(
                    record.groups, [g for g in opt.param_groups if self._trains(g)], strict=True
                )
            ],
            "random": random[0] if random else None,
        }

    @staticmethod
    def _trains(group: dict[str, Any]) -> bool:
        return any(p.requires_grad for p in group["params"])

    def _check_gradients(self, record: _StageRecord, params: dict[str, nn.Parameter]) -> None:
        """Refuse gradients changed since backward other than by recorder.clip_grad_norm_.

        In-place changes bump a tensor's version counter (clipping, unscaling), and a
        replaced gradient is another tensor: both are seen at no cost at every step.
        """
        names = record.trained
        unseen = [n for n in names if n not in record.grads]
        if unseen:
            raise TrajectoryError(
                f"The gradients of {unseen[:5]} were set without backward() at step {self._step}; "
                "the recorder replays gradients of the recorded loss. Compute them with backward()."
            )
        changed = [
            n
            for n in names
            if params[n].grad is not record.grads[n][0]
            or record.grads[n][0]._version != record.grads[n][1]
        ]
        if changed:
            raise TrajectoryError(
                f"The gradients of {changed[:3]} changed between backward() and optimizer.step() at "
                f"step {self._step} (for example clipped with torch.nn.utils.clip_grad_norm_, or "
                "unscaled by a GradScaler); the record would replay other updates than the loop "
                "made. Clip with recorder.clip_grad_norm_(max_norm), which clips and records the "
                "coefficient."
            )
        record.grads.clear()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of the trained parameters, and record it.

        The same operation as ``torch.nn.utils.clip_grad_norm_(trained_parameters,
        max_norm, norm_type)``: every gradient is multiplied by
        min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the norm of all of them together. Call it
        between ``backward()`` and ``optimizer.step()``; replay clips the same way, and
        the approximate methods use the clipped (effective) step. Returns the total norm
        before clipping, as torch's function does.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from sourcekit import Examples, TrajectoryRecorder
        >>> train = Examples(torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> model = nn.Linear(4, 3)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        >>> recorder = TrajectoryRecorder(model, train, checkpoint_steps=[])
        >>> with recorder.stage(optimizer):
        ...     for idx in torch.arange(16).split(4):
        ...         optimizer.zero_grad()
        ...         nn.functional.cross_entropy(model(train.inputs[idx]), train.targets[idx]).backward()
        ...         norm = recorder.clip_grad_norm_(0.1)
        ...         optimizer.step()
        ...         recorder.step(idx)
        >>> trajectory = recorder.finish()
        >>> bool((trajectory.clipping.coefficient < 1).all())  # every step was clipped
        True
        """
        record = self._open
        if record is None:
            raise TrajectoryError(
                "recorder.clip_grad_norm_() was called outside a stage; call it inside "
                "`with recorder.stage(optimizer):`, between backward() and optimizer.step()."
            )
        if record.pending is not None:
            raise TrajectoryError(
                "recorder.clip_grad_norm_() was called after optimizer.step(); call it between "
                "backward() and optimizer.step()."
            )
        if record.clip is not None:
            raise TrajectoryError(
                f"recorder.clip_grad_norm_() was called twice before step {self._step}; clip once "
                "per step."
            )
        if (
            isinstance(max_norm, bool)
            or not isinstance(max_norm, (int, float))
            or not max_norm > 0
        ):
            raise ValueError(
                f"The 'max_norm' parameter of clip_grad_norm_ must be a float > 0; got {max_norm!r}."
            )
        norm_type = float(norm_type)
        if not norm_type > 0:
            raise ValueError(
                f"The 'norm_type' parameter of clip_grad_norm_ must be > 0 (or inf); got {norm_type!r}."
            )
        params = dict(self._model.named_parameters())
        if all(params[n].grad is None for n in record.trained):
            raise TrajectoryError(
                "recorder.clip_grad_norm_() found no gradients; call it after backward()."
            )
        norm = torch.nn.utils.clip_grad_norm_(
            [params[n] for n in record.trained], float(max_norm), norm_type
        )
        # torch multiplies by min(1, max_norm / (norm + 1e-6)): the effective step's factor.
        coefficient = min(1.0, float(max_norm) / (float(norm) + 1e-6))
        for name in record.trained:
            grad = params[name].grad
            if grad is not None:  # the clipped gradients are the ones the step may use
                record.grads[name] = (grad, grad._version)
        record.clip = (float(max_norm), norm_type, coefficient)
        return norm

    def step(self, batch_indices: Any) -> None:
        """Record the update just taken: the indices of the batch it used.

        Call once right after every ``optimizer.step()``.
        """
        record = self._open
        if record is None:
            raise TrajectoryError(
                "recorder.step() was called outside a stage; wrap the loop in `with recorder.stage(optimizer):`."
            )
        if record.pending is None:
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
        pending, record.pending = record.pending, None
        for values, group_values in zip(record.values, pending["values"], strict=True):
            for key, value in group_values.items():
                values.setdefault(key, []).append(value)
        self._learning_rates.append(pending["values"][0]["lr"])
        clip, record.clip = record.clip, None
        self._clipping.append(clip if clip is not None else (np.inf, 2.0, 1.0))
        random_state = None
        if pending["random"] is not None:
            random_state, device = pending["random"]
            self._random[self._step] = random_state
            if self._random_device not in (None, device.type):
                raise TrajectoryError(
                    "The model drew random numbers on the CPU and on a GPU in different steps; "
                    "record a run on one device."
                )
            self._random_device = device.type
        record.forwards = []
        self._batches.append(idx)
        if record.capture is not None:
            self._verify_step(
                record,
                StepPlan(
                    step=self._step,
                    batch=idx,
                    groups=tuple(
                        (names, *self._spec_at(spec, group_values))
                        for (names, spec), group_values in zip(
                            record.groups, pending["values"], strict=True
                        )
                    ),
                    clip=None if clip is None else (clip[0], clip[1]),
                    random_state=random_state,
                ),
            )
        if self._verify:
            # Writes to the parameters between steps bump their versions; at a checked step
            # their norms are compared too (writes through .data do not bump versions).
            record.parameter_versions = [p._version for p in record.parameters]
            following = self._step + 1 - record.start
            record.parameter_norms = _norms(self._model) if verified(following) else None
        self._step += 1
        if self._wants_checkpoint(self._step):
            self._keep(record.optimizer)

    @staticmethod
    def _spec_at(spec: OptimizerSpec, values: dict[str, float]) -> tuple[OptimizerSpec, float]:
        changes: dict[str, Any] = {"weight_decay": values["weight_decay"]}
        if "momentum" in values:
            changes["momentum"] = values["momentum"]
        else:
            changes["betas"] = (values["beta1"], values["beta2"])
        return replace(spec, **changes), values["lr"]

    # --- the self-check ------------------------------------------------------------------
    def _capture(self, record: _StageRecord, params: dict[str, nn.Parameter]) -> StepCapture:
        """The state a checked step starts from (parameters, buffers, gradients, optimiser)."""
        trained = set(record.trained)
        names = {id(params[n]): n for n in trained}
        opt_state: dict[str, Any] = {}
        for group in record.optimizer.param_groups:
            for p in group["params"]:
                name = names.get(id(p))
                if name is None:
                    continue
                for key, value in record.optimizer.state.get(p, {}).items():
                    if key == "step":
                        opt_state["step"] = int(value)
                    elif isinstance(value, torch.Tensor):
                        opt_state.setdefault(key, {})[name] = value.detach().clone()
        buffers = record.buffers
        if buffers is None:
            buffers = {n: b.detach().clone() for n, b in self._model.named_buffers()}
        record.buffers = None
        return StepCapture(
            step=self._step,
            params={
                n: p.detach().clone() if n in trained else p.detach() for n, p in params.items()
            },
            buffers=buffers,
            grads={n: params[n].grad.detach().clone() for n in record.trained},  # type: ignore[union-attr]
            optimizer=opt_state,
        )

    def _verify_step(self, record: _StageRecord, plan: StepPlan) -> None:
        """Reproduce a captured step's gradient and update from the record."""
        capture, record.capture = record.capture, None
        if capture is None:
            return
        if self._replay_model is None:
            device = next(iter(capture.grads.values())).device
            self._replay_model = self._architecture.build().to(device)
        check_gradients(
            self._replay_model,
            capture,
            plan,
            self._train,
            self._loss_fn,
            bool(self._train_mode),
            stage=record.name,
            loss_name=repr(function_spec(self._loss, LOSSES) or self._loss),
        )
        after = dict(self._model.named_parameters())
        check_update(capture, plan, {n: after[n] for n in record.trained}, stage=record.name)

    def _close(self, record: _StageRecord, batch_size: int) -> Stage:
        """The Stage of a closed record (``groups=None`` when one group trains everything)."""
        groups = []
        for (names, spec), values in zip(record.groups, record.values, strict=True):
            arrays = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
            first = {k: float(a[0]) for k, a in arrays.items()}
            base, _ = self._spec_at(spec, first)
            base = replace(base, lr=spec.lr)
            schedule = {k: a for k, a in arrays.items() if k == "lr" or np.any(a != a[0])}
            groups.append(ParameterGroup(names, base, schedule))
        everything = [n for n, _ in self._model.named_parameters()]
        simple = (
            len(groups) == 1
            and list(groups[0].parameters) == everything
            and set(groups[0].schedule) == {"lr"}
        )
        return Stage(
            name=record.name,
            optimizer=groups[0].optimizer,
            start=record.start,
            end=self._step,
            examples=record.examples,
            batch_size=batch_size,
            recipe=record.recipe,
            groups=None if simple else tuple(groups),
        )

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
        self._replay_model = None
        clipping = None
        if any(np.isfinite(c[0]) for c in self._clipping):
            clipping = GradientClipping(*np.asarray(self._clipping, dtype=np.float64).T)
        random_states = None
        if self._random:
            ordered = sorted(self._random)
            random_states = RandomStates(
                str(self._random_device),
                np.asarray(ordered, dtype=np.int64),
                torch.stack([self._random[s].cpu() for s in ordered]),
            )
        return Trajectory(
            architecture=self._architecture,
            train=self._train,
            stages=self._stages,
            learning_rates=np.asarray(self._learning_rates),
            batches=self._batches,
            checkpoints=self._checkpoints,
            checkpoint_steps=steps,
            loss=self._loss,
            measurement=self._measurement,
            train_mode=bool(self._train_mode),
            clipping=clipping,
            random_states=random_states,
        )
