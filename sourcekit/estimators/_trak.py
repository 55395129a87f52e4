"""``TRAKAttributor``: influence functions in a random projection of the gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .._distributed import all_gather_columns, all_reduce_sum, is_main
from .._validation import Interval, Options
from ..base import BaseAttributor
from ..exceptions import NonFiniteError
from ..gradients._layers import find_blocks
from ..gradients._per_example import TrainingGradients
from ..scoring._trak import (
    PROJECTIONS,
    RandomProjection,
    TRAKCheckpoint,
    default_damping,
    gram_eigendecomposition,
    projected_gram,
    projected_training_gradients,
    trak_scores,
)
from ..trajectory import Examples, Trajectory
from ..trajectory._replay import resolve_device
from ._shared import (
    GRADIENT_CONSTRAINTS,
    local_examples,
    query_gradients,
    query_slices,
    resolve_seed,
)

__all__ = ["TRAKAttributor"]


class TRAKAttributor(BaseAttributor):
    """TRAK: an influence function on randomly projected gradients, ensembled over checkpoints.

    Per-example gradients are projected to ``projection_dim`` dimensions by a seeded
    random matrix R (P × k, E[R Rᵀ] = I). At each checkpoint θ_c used, with Φ the
    (N × k) matrix of projected training-loss gradients and φ_q = Rᵀ ∇f(z_q, θ_c),

        scores_c[q, m] = −(1/N) φ_qᵀ (ΦᵀΦ/N + λI)⁻¹ φ_m,

    and the scores are averaged over the checkpoints. This is
    :class:`~sourcekit.InfluenceAttributor`'s formula with the empirical Fisher of the
    projected gradients as curvature, in sourcekit's sign and scale (effect of
    including z_m, 1/N included, N = all training examples). Like influence functions
    it assumes a converged run and does not separate training stages.

    Parameters
    ----------
    projection_dim : int, default=512
        k, the dimension of the projected gradients. The state holds Φ (N × k) and a
        k × k eigenbasis per checkpoint; TRAK's authors use thousands for large models.
        With k ≥ P (the number of attributed parameters) and an orthogonal R the
        projection loses nothing.
    damping : float or None, default=None
        λ. None uses 0.1 × the mean eigenvalue of ΦᵀΦ/N at each checkpoint (the same
        heuristic as :class:`~sourcekit.InfluenceAttributor`; values in ``damping_``);
        0 uses the pseudo-inverse. Read only by ``transform``, so
        ``set_params(damping=...)`` needs no refit.
    projection : {"gaussian", "rademacher"}, default="gaussian"
        Entries N(0, 1/k), or ±1/√k with equal probability.
    checkpoints : {"final", "all"}, default="final"
        "final": the final parameters θ_T only; "all": the trajectory's attribution
        checkpoints and θ_T, averaged (ensembling over the run).
    modules : list of str, optional
        Attribute through these layers only (names from ``model.named_modules()``).
    random_state : int or None, default=0
        Seed of the projection; None draws a fresh one at every fit.
    batch_size : int, default=256
        Examples per batch while streaming the data.
    memory_limit : int or "auto", default="auto"
        Bytes for the generated pieces of R kept between batches (beyond them pieces
        are generated again) and, separately, for the query gradients of one block of
        queries.
        ``"auto"``: half of the GPU's free memory, or a quarter of the memory
        available on a CPU up to 1 GiB, read when ``fit`` runs (``memory_limit_`` holds
        the bytes).
    memory : str, path or joblib.Memory, optional
        Also cache the fitted state on disk (see :class:`~sourcekit.SourceAttributor`).
    device : str or torch.device, default="auto"
    dtype : {"float32", "float64"}, default="float32"
        Precision of gradients, projections and scores (eigendecompositions are float64).
    gradient_dtype : {"bfloat16", "float16", "float32", "float64"} or None, default=None
        Precision of the forward and backward passes that produce per-example
        gradients, and of the gradients kept between fitting and scoring (None: ``dtype``).
        "bfloat16" halves their memory and, on GPUs, speeds the passes up; they are
        widened to ``dtype`` before they are combined, so curvature and scores stay
        in ``dtype``. "Cost and memory" in the documentation measures the agreement.
    progress : bool, default=False

    Attributes
    ----------
    state_ : dict
        ``blocks``, ``projection`` (the RandomProjection) and ``checkpoints`` (a
        TRAKCheckpoint per checkpoint: Φ and the eigendecomposition of ΦᵀΦ/N; under
        ``torch.distributed``, Φ holds the rows of this rank's shard only).
    damping_ : float or dict of step to float
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
    >>> trak = sourcekit.TRAKAttributor(projection_dim=256).fit(trajectory)
    >>> trak.transform(task.test[:4]).shape
    (4, 1437)
    >>> trak.set_params(damping=1e-2).transform(task.test[:4]).shape  # no refit
    (4, 1437)
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "projection_dim": [Interval(int, 1, None)],
        "damping": [None, Interval(float, 0, None)],
        "projection": [Options(*PROJECTIONS)],
        "checkpoints": [Options("final", "all")],
        "random_state": [None, Interval(int, 0, None)],
        **GRADIENT_CONSTRAINTS,
    }
    _state_parameters: ClassVar[tuple[str, ...]] = (
        "projection_dim",
        "projection",
        "checkpoints",
        "modules",
        "random_state",
        "device",
        "dtype",
        "gradient_dtype",
    )

    def __init__(
        self,
        projection_dim: int = 512,
        damping: float | None = None,
        *,
        projection: str = "gaussian",
        checkpoints: str = "final",
        modules: Sequence[str] | None = None,
        random_state: int | None = 0,
        batch_size: int = 256,
        memory_limit: int | str = "auto",
        memory: Any = None,
        device: Any = "auto",
        dtype: str = "float32",
        gradient_dtype: str | None = None,
        progress: bool = False,
    ) -> None:
        self.projection_dim = projection_dim
        self.damping = damping
        self.projection = projection
        self.checkpoints = checkpoints
        self.modules = modules
        self.random_state = random_state
        self.batch_size = batch_size
        self.memory_limit = memory_limit
        self.memory = memory
        self.device = device
        self.dtype = dtype
        self.gradient_dtype = gradient_dtype
        self.progress = progress

    def _steps(self, trajectory: Trajectory) -> list[int]:
        if self.checkpoints == "final":
            return [trajectory.n_steps]
        return sorted({*trajectory.checkpoint_steps, trajectory.n_steps})

    def _fit_state(self, trajectory: Trajectory) -> dict[str, Any]:
        blocks = find_blocks(
            trajectory.architecture.build(), self.modules, trajectory.trained_parameters
        )
        projection = RandomProjection.for_blocks(
            blocks, self.projection_dim, self.projection, resolve_seed(self.random_state)
        )
        device, dtype = resolve_device(self.device), self._torch_dtype()
        project = projection.projector(device, dtype, self.memory_limit_ // 2)
        training = TrainingGradients(
            trajectory,
            blocks,
            None,
            batch_size=self.batch_size,
            device=device,
            dtype=self._pass_dtype(),
            output_dtype=dtype,
        )
        examples = local_examples(trajectory, np.arange(trajectory.n_train, dtype=np.int64))
        checkpoints = []
        for step in tqdm(
            self._steps(trajectory),
            desc="projecting",
            disable=not (self.progress and is_main()),
            leave=False,
        ):
            if len(examples):
                features = projected_training_gradients(
                    training, step, examples, project, dtype=dtype
                )
            else:  # more ranks than training examples
                features = torch.zeros(0, self.projection_dim, dtype=dtype, device=device)
            gram = projected_gram(features)
            all_reduce_sum([gram])  # ΦᵀΦ over every rank's shard
            if not torch.isfinite(gram).all():
                raise NonFiniteError(
                    f"NaN or infinity in the projected training gradients at checkpoint step {step}. "
                    "The run may have diverged there; use checkpoints='final' or check the data."
                )
            values, vectors = gram_eigendecomposition(gram, trajectory.n_train)
            checkpoints.append(
                TRAKCheckpoint(step, features, values, vectors, examples, trajectory.n_train)
            )
        return {"blocks": blocks, "projection": projection, "checkpoints": checkpoints}

    @property
    def damping_(self) -> float | dict[int, float]:
        """The damping in use: ``damping``, or the heuristic per checkpoint when it is None."""
        self._check_fitted()
        if self.damping is not None:
            return float(self.damping)
        return {c.step: default_damping(c) for c in self.state_["checkpoints"]}

    def _scores(self, queries: Examples) -> torch.Tensor:
        state, trajectory = self.state_, self.trajectory_
        device, dtype = resolve_device(self.device), self._torch_dtype()
        checkpoints: list[TRAKCheckpoint] = state["checkpoints"]
        damping = self.damping_
        lams = [damping[c.step] if isinstance(damping, dict) else damping for c in checkpoints]
        project = state["projection"].projector(device, dtype, self.memory_limit_ // 2)
        parts = []
        for rows in query_slices(len(queries), state["blocks"], self.memory_limit_):
            block = queries[rows]
            features = [
                project(
                    query_gradients(
                        trajectory,
                        state["blocks"],
                        block,
                        batch_size=self.batch_size,
                        device=device,
                        dtype=dtype,
                        step=c.step,
                        pass_dtype=self._pass_dtype(),
                    )
                )
                for c in checkpoints
            ]
            parts.append(trak_scores(features, checkpoints, lams, dtype=dtype))
        scores = torch.cat(parts)
        return all_gather_columns(scores, checkpoints[0].columns).cpu()
