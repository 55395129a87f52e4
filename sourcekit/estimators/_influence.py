"""``InfluenceAttributor``: influence functions at the final checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from .._validation import Interval
from ..base import FittedState
from ..curvature import Curvature
from ..gradients._training import TrainingGradients
from ..scoring._influence import default_damping, influence_scores
from ..trajectory import Trajectory
from ..trajectory._settings import weight_decays
from ._curvature import CurvatureAttributor
from ._gradient import GradientState, QueryGradients

__all__ = ["InfluenceAttributor", "InfluenceState"]


@dataclasses.dataclass
class InfluenceState(GradientState):
    """The fitted state of an influence function: the curvature at the final parameters
    (with the blocks and the training-loss factors kept for scoring, never pickled)."""

    curvature: Curvature


class InfluenceAttributor(CurvatureAttributor):
    """Influence functions: implicit differentiation at the final parameters.

        scores[q, m] = −(1/N) ∇f(z_q, θ_T)ᵀ (H + λI)⁻¹ ∇L(z_m, θ_T)

    with H the curvature of the training objective at the final checkpoint over all N
    training examples (weight decay of the last stage added), in sourcekit's convention
    (effect of including z_m, 1/N included). It assumes training converged to an
    optimum and ignores the order of training, including its stages.

    Parameters
    ----------
    damping : float or None, default=None
        λ added to every eigenvalue. None uses 0.1 × the mean eigenvalue of each layer
        (a per-layer damping, recorded in ``damping_``), at least 1e-3 of the largest
        layer's (a layer without curvature, all of its ReLUs dead, is raised to it with a
        warning). Read only by ``transform``.
    curvature : {"ekfac", "kfac", "diagonal", "identity", "exact", "hessian"}, default="ekfac"
        The approximation of the curvature at the final parameters (as in
        :class:`~sourcekit.SourceAttributor`).
    fisher : {"true", "empirical", "expected"}, default="true"
        Targets of the curvature's output gradients (as in
        :class:`~sourcekit.SourceAttributor`). "expected" removes the sampling noise at
        one backward pass per output instead of one: on the digits recipes it scored
        0.02 higher LDS on one recipe of three and the same on the others
        (docs/benchmarks.md), so it is worth trying on models with a handful of outputs.
    curvature_examples : int or None, default=None
        Estimate each curvature from at most this many examples of its stage, a random
        subset drawn from ``random_state`` (the same for every checkpoint of the stage);
        None uses all of them. Scores still cover every training example. The passes
        that estimate curvature then cost ``curvature_examples / N`` of a full pass, and
        the training gradients are computed when scoring instead of being kept from
        fitting.
    refine_steps : int, default=0
        Refine the fitted curvature B with exact curvature products: the scores then use
        (A + λ)⁻¹ of the blend A = (1 − w) B + w H̃, H̃ the exact Gauss-Newton matrix (the
        one ``curvature="exact"`` forms densely) over ``refine_examples`` examples and
        w = ``refine_weight``, solved for all queries at once by ``refine_steps``
        iterations of conjugate gradients preconditioned by B. Each iteration is one
        pass over those examples at the final checkpoint. 0 (the default) applies the
        fitted curvature's inverse. Read only by ``transform``; not with
        ``curvature="hessian"``.
    refine_examples : int or None, default=512
        The examples the exact products of ``refine_steps`` average over, drawn from
        ``random_state``; None takes every example. Read only with ``refine_steps``.
    refine_weight : float in (0, 1], default=0.25
        w, the exact matrix's share of the refined curvature A = (1 − w) B + w H̃. With
        w = 1 and ``refine_examples=None`` the refinement approaches
        ``curvature="exact"`` as ``refine_steps`` grows. Read only with
        ``refine_steps``.
    modules : list of str, optional
        Attribute through these layers only (names from ``model.named_modules()``);
        required when the model has parameters outside the supported layer types
        (nn.Linear, nn.Conv2d, GPT-2's Conv1D, nn.Embedding, or registered ones).
    query_rank : int or None, default=None
        Replace each block of every preconditioned query gradient (H + λI)⁻¹∇f (a d_out × d_in
        matrix U) by its best rank-r approximation (truncated SVD) before scoring, so
        that a training example costs r (d_in + d_out) per position instead of
        d_out d_in. Scores change by at most Σ_{i>r} σ_i(U) ‖G‖₂ per block, G the
        training example's gradient. None (the default) scores exactly. Embedding
        blocks are always exact. Read only by ``transform``.
    random_state : int or None, default=0
        Seed of the sampled Fisher targets; None draws fresh ones at every fit.
    batch_size : int, default=256
        Training examples per batch while streaming the data.
    memory_limit : int or "auto", default="auto"
        Bytes for cached layer inputs/output gradients and, separately, for the
        preconditioned gradients of one block of queries (as in
        :class:`~sourcekit.SourceAttributor`).
        ``"auto"``: half of the GPU's free memory, or a quarter of the memory
        available on a CPU up to 1 GiB, read when ``fit`` runs (``memory_limit_`` holds
        the bytes).
    memory : str, path or joblib.Memory, optional
        Also cache the fitted state on disk (see :class:`~sourcekit.SourceAttributor`).
    device : str or torch.device, default="auto"
        "auto" uses CUDA when available.
    dtype : {"float32", "float64"}, default="float32"
        Precision of gradients and scores (eigendecompositions are always float64).
    gradient_dtype : {"bfloat16", "float16", "float32", "float64"} or None, default=None
        Precision of the forward and backward passes that produce per-example
        gradients, and of the gradients kept between fitting and scoring (None: ``dtype``).
        "bfloat16" halves their memory and, on GPUs, speeds the passes up; they are
        widened to ``dtype`` before they are combined, so curvature and scores stay
        in ``dtype``. "Cost and memory" in the documentation measures the agreement.
    progress : bool, default=False
        Show progress bars.

    Attributes
    ----------
    state_ : InfluenceState
        The curvature at the final parameters, the layer blocks and the training-loss
        factors kept for scoring (a cache, never pickled).
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
    >>> influence = sourcekit.InfluenceAttributor(damping=1e-3).fit(trajectory)
    >>> influence.transform(task.test[:4]).shape
    (4, 1437)
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "damping": [None, Interval(float, 0, None)],
        "query_rank": [None, Interval(int, 1, None)],
        **CurvatureAttributor._parameter_constraints,
    }
    _state_type: ClassVar[type[FittedState] | None] = InfluenceState
    _state_parameters: ClassVar[tuple[str, ...]] = (
        "curvature",
        "fisher",
        "curvature_examples",
        "modules",
        "random_state",
        "memory_limit",
        "device",
        "dtype",
        "gradient_dtype",
    )

    def __init__(
        self,
        damping: float | None = None,
        *,
        curvature: str = "ekfac",
        fisher: str = "true",
        curvature_examples: int | None = None,
        refine_steps: int = 0,
        refine_examples: int | None = 512,
        refine_weight: float = 0.25,
        modules: Sequence[str] | None = None,
        query_rank: int | None = None,
        random_state: int | None = 0,
        batch_size: int = 256,
        memory_limit: int | str = "auto",
        memory: Any = None,
        device: Any = "auto",
        dtype: str = "float32",
        gradient_dtype: str | None = None,
        progress: bool = False,
    ) -> None:
        self.damping = damping
        self.curvature = curvature
        self.fisher = fisher
        self.curvature_examples = curvature_examples
        self.refine_steps = refine_steps
        self.refine_examples = refine_examples
        self.refine_weight = refine_weight
        self.modules = modules
        self.query_rank = query_rank
        self.random_state = random_state
        self.batch_size = batch_size
        self.memory_limit = memory_limit
        self.memory = memory
        self.device = device
        self.dtype = dtype
        self.gradient_dtype = gradient_dtype
        self.progress = progress

    state_: InfluenceState

    def _fit_state(self, trajectory: Trajectory) -> InfluenceState:
        blocks = self._blocks(trajectory)
        everything = np.arange(trajectory.n_train, dtype=np.int64)
        (curvature,), cache = self._fit_curvatures(
            trajectory, trajectory, blocks, [([trajectory.n_steps], everything, 0)]
        )
        return InfluenceState(blocks, curvature, cache=cache)

    def _weight_decay(self) -> dict[str, float]:
        """Each block's coupled weight decay in the final stage (the mean over its entries)."""
        trajectory = self.trajectory_
        stage = trajectory.stages[-1]
        decays = weight_decays(trajectory, stage.start, stage.end)
        out = {}
        for block in self.state_.blocks:
            own = [n for n in (block.weight, block.bias) if n is not None]
            sizes = [int(np.prod(trajectory._param_shapes[n])) for n in own]
            out[block.name] = sum(decays[n][0] * k for n, k in zip(own, sizes, strict=True)) / sum(
                sizes
            )
        return out

    @property
    def damping_(self) -> float | dict[str, float]:
        """The damping in use: ``damping``, or the per-layer heuristic when it is None."""
        self._check_fitted()
        if self.damping is not None:
            return float(self.damping)
        return default_damping(self.state_.curvature, self._weight_decay())

    def _score_block(self, queries: QueryGradients, training: TrainingGradients) -> torch.Tensor:
        damping, wd = self.damping_, self._weight_decay()
        shift = {k: (damping[k] if isinstance(damping, dict) else damping) + wd[k] for k in wd}
        final = self.trajectory_.n_steps
        everything = np.arange(self.trajectory_.n_train, dtype=np.int64)
        curvature = self._refined(
            self.state_.curvature, self.trajectory_, [final], ([final], everything, 0)
        )
        return influence_scores(
            queries.final(),
            curvature,
            training,
            self.trajectory_.n_steps,
            self._local_examples(),
            n_train=self.trajectory_.n_train,
            n_examples=self.trajectory_.n_train,
            shift=shift,
            dtype=self._torch_dtype(),
            query_rank=self.query_rank,
        )
