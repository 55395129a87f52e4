"""``TracInAttributor``: first-order effects of the training steps, summed over checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .._distributed import local_examples
from .._validation import InstanceOf
from ..gradients._training import TrainingGradients
from ..scoring._tracin import TracInCheckpoint, tracin_checkpoints, tracin_scores
from ..trajectory import Trajectory
from ._gradient import GradientAttributor, GradientState, QueryGradients

__all__ = ["TracInAttributor"]


class TracInAttributor(GradientAttributor):
    """TracIn: the gradient steps of the run, each measured where it was taken.

        scores[q, m] = −Σ_c (η_c / N_c) ∇f(z_q, θ_c)ᵀ ∇L(z_m, θ_c)

    over the trajectory's attribution checkpoints c, with η_c the learning rate summed
    over the steps the checkpoint stands for and N_c the number of examples of its stage
    (examples outside that stage contribute 0 at c). Query gradients are taken at each
    checkpoint θ_c. Each term is the first-order effect of including z_m in the updates
    the checkpoint stands for, as if nothing after them transformed that effect: TracIn
    is exact unrolling without the propagation factors (I − ηH) (see the baselines page
    of the documentation). Adam's preconditioner is not applied (the raw gradients are
    compared, as in the original method).


    Parameters
    ----------
    momentum_correction : bool, default=True
        Multiply η_c by the stage's heavy-ball factor (1 − dampening)/(1 − β), the
        long-run step a gradient makes under momentum β (1 without momentum and for
        Adam). The default keeps the scores on the counterfactual scale that SOURCE and
        exact unrolling use (with β = 0.9, ten times the bare learning rate); pass False
        for the original TracIn, which sums the bare learning rates.
    modules : list of str, optional
        Attribute through these layers only (names from ``model.named_modules()``).
    batch_size : int, default=256
        Examples per batch while streaming the data.
    memory_limit : int or "auto", default="auto"
        Bytes for the training gradients' factors kept by ``fit`` (reused by every
        ``transform``; beyond them the data are streamed again) and, separately, for the
        query gradients of one block of queries.
        ``"auto"``: half of the GPU's free memory, or a quarter of the memory
        available on a CPU up to 1 GiB, read when ``fit`` runs (``memory_limit_`` holds
        the bytes).
    memory : str, path or joblib.Memory, optional
        Also cache the fitted state on disk (see :class:`~sourcekit.SourceAttributor`).
    device : str or torch.device, default="auto"
    dtype : {"float32", "float64"}, default="float32"
    gradient_dtype : {"bfloat16", "float16", "float32", "float64"} or None, default=None
        Precision of the forward and backward passes that produce per-example
        gradients, and of the gradients kept between fitting and scoring (None: ``dtype``).
        "bfloat16" halves their memory and, on GPUs, speeds the passes up; they are
        widened to ``dtype`` before they are combined, so curvature and scores stay
        in ``dtype``. "Cost and memory" in the documentation measures the agreement.
    progress : bool, default=False

    Attributes
    ----------
    state_ : GradientState
        The layer blocks and the training-loss factors kept for scoring (a cache, never
        pickled).
    checkpoints_ : list of TracInCheckpoint
        The terms of the sum: step, stage, the steps it stands for, η_c and N_c.
    memory_limit_ : int
        The bytes ``memory_limit`` stood for in this fit.
    trajectory_, n_train_, fingerprint_
        The fitted run, its number of training examples and its content fingerprint
        (see :class:`~sourcekit.BaseAttributor`).

    Examples
    --------
    >>> import sourcekit
    >>> task = sourcekit.datasets.load_digits_task()
    >>> trajectory = task.record("early", progress=False)
    >>> tracin = sourcekit.TracInAttributor().fit(trajectory)
    >>> tracin.transform(task.test[:4]).shape
    (4, 1437)
    >>> [c.step for c in tracin.checkpoints_]
    [15, 46, 76, 107, 138, 168]
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "momentum_correction": [InstanceOf((bool,), "a bool")],
        **GradientAttributor._parameter_constraints,
    }
    _state_parameters: ClassVar[tuple[str, ...]] = (
        "modules",
        "memory_limit",
        "device",
        "dtype",
        "gradient_dtype",
    )

    def __init__(
        self,
        *,
        momentum_correction: bool = True,
        modules: Sequence[str] | None = None,
        batch_size: int = 256,
        memory_limit: int | str = "auto",
        memory: Any = None,
        device: Any = "auto",
        dtype: str = "float32",
        gradient_dtype: str | None = None,
        progress: bool = False,
    ) -> None:
        self.momentum_correction = momentum_correction
        self.modules = modules
        self.batch_size = batch_size
        self.memory_limit = memory_limit
        self.memory = memory
        self.device = device
        self.dtype = dtype
        self.gradient_dtype = gradient_dtype
        self.progress = progress

    def _fit_state(self, trajectory: Trajectory) -> GradientState:
        blocks = self._blocks(trajectory)
        checkpoints = [
            (t.step, local_examples(trajectory, trajectory.stages[t.stage].examples))
            for t in tracin_checkpoints(trajectory)
        ]
        return GradientState(
            blocks, cache=self._cache_training_factors(trajectory, blocks, checkpoints)
        )

    @property
    def checkpoints_(self) -> list[TracInCheckpoint]:
        self._check_fitted()
        return tracin_checkpoints(
            self.trajectory_,
            momentum_correction=bool(self.momentum_correction),
            blocks=self.state_.blocks,
        )

    def _examples_per_block(self) -> int:
        stage_examples = self._stage_examples()
        return sum(len(stage_examples[t.stage]) for t in self.checkpoints_)

    def _score_block(self, queries: QueryGradients, training: TrainingGradients) -> torch.Tensor:
        return tracin_scores(
            queries.at,
            self.checkpoints_,
            training,
            self._stage_examples(),
            n_train=self.trajectory_.n_train,
            dtype=self._torch_dtype(),
        )
