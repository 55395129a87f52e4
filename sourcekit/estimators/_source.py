"""``SourceAttributor``: SOURCE, approximate unrolled differentiation."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .._distributed import is_main
from .._validation import InstanceOf, Interval, Options
from ..base import FittedState
from ..curvature import Curvature
from ..curvature._preconditioner import (
    EigenbasisAdam,
    adam_preconditioner,
    preconditioned_curvature,
)
from ..curvature._rates import block_rates
from ..curvature._refined import RefinedAdam, RefinedCurvature
from ..gradients._layers import LayerBlock
from ..gradients._training import TrainingGradients
from ..scoring._source import SegmentModel, default_damping, source_scores
from ..trajectory import Segment, Trajectory
from ..trajectory._averaged import averaged_states, with_states
from ..trajectory._settings import effective_learning_rates, weight_decays
from ._curvature import CurvatureAttributor
from ._gradient import GradientState, QueryGradients

__all__ = ["SourceAttributor", "SourceState"]

DEFAULT_SEGMENTS = 3
"""The number of segments when neither ``n_segments`` nor ``boundaries`` is given."""


def _boundaries(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
        and all(a < b for a, b in itertools.pairwise(value))
    )


@dataclasses.dataclass
class SourceState(GradientState):
    """SOURCE's fitted state.

    Attributes
    ----------
    blocks : list of LayerBlock
    segments : list of SegmentModel
        The fitted segments, in training order: curvature, learning rates, stage size,
        weight decay and Adam's preconditioner. With ``average_checkpoints``, each is
        evaluated at its first checkpoint only, which holds the averaged state.
    spans : list of Segment
        The segments as recorded, with all their checkpoints.
    averaged : dict of step to state dict
        The averaged states of the fast variant, by the step they stand at (empty
        otherwise).
    cache : dict of step to list of BatchFactors
        The training-loss factors kept from fitting (never pickled).
    """

    # 2: segments under Adam hold the preconditioned curvature (SegmentModel.adam)
    FORMAT: ClassVar[int] = 2

    segments: list[SegmentModel]
    spans: list[Segment]
    averaged: dict[int, dict[str, torch.Tensor]]


class SourceAttributor(CurvatureAttributor):
    """SOURCE: training data attribution by approximate unrolled differentiation.

    The run is split into ``n_segments`` segments; inside each, curvature and training
    gradients are treated as stationary (averaged over the segment's checkpoints), and
    the segments are chained through matrix functions of the curvature (the SOURCE page
    of the documentation derives it):


        scores[q, m] = −∇f(z_q, θ_T)ᵀ Σ_ℓ S̄_L ⋯ S̄_{ℓ+1} (1/N_ℓ)(I − e^{−s_ℓ H̄_ℓ}) H̄_ℓ⁻¹ ḡ_ℓ(m),

    with S̄_ℓ = e^{−s_ℓ H̄_ℓ}, s_ℓ the segment's learning-rate sum (η/(1−β) under
    heavy-ball momentum), ḡ_ℓ(m) the mean gradient of example m over the segment's
    checkpoints and N_ℓ the size of its stage. Adam and AdamW use the recorded second
    moments as a diagonal preconditioner P̄: their segments are descent on the
    preconditioned curvature K̄ = P̄^½ H̄ P̄^½, with S̄_ℓ = P̄^½ e^{−s_ℓ K̄_ℓ} P̄^{−½}; weight
    decay is added to the eigenvalues.
    Parameters that train at their own rates (parameter groups, clipped steps, layers
    frozen in a stage) enter with their own learning-rate sums and decays (see
    :mod:`sourcekit.curvature._rates` and the recording page of the documentation).

    Parameters
    ----------
    n_segments : int or None, default=None
        Number of segments (at least one per stage, at most one per checkpoint); None
        means 3, or the segments ``boundaries`` define. Giving both is refused.
    damping : float or "auto", default="auto"
        Added to every eigenvalue of each segment's curvature (σ → σ + damping): of H̄
        under SGD, of the preconditioned K̄ under Adam and AdamW. ``"auto"`` takes,
        for segment ℓ with learning-rate sum s_ℓ, 0.01 / s_ℓ with the eigenbasis
        curvatures (a 1 % change of what the segment carries, whatever the learning
        rate or the optimiser), and max(m_ℓ, 0.01 / s_ℓ) with the dense ones
        (``"exact"``, ``"hessian"``), m_ℓ the mean eigenvalue of the matrix the damping
        shifts (the shrinkage of a sample matrix towards its mean eigenvalue); the
        SOURCE page of the documentation derives both and measures them against the
        best damping of a grid. Recorded in ``damping_``. Read only by ``transform``,
        so ``set_params(damping=...)`` needs no refit.
    curvature : {"ekfac", "kfac", "diagonal", "identity", "exact", "hessian"}, default="ekfac"
        The approximation of each segment's curvature H̄ ("exact": the dense Gauss-Newton
        matrix, i.e. the expected Fisher computed exactly, so ``fisher`` does not apply;
        "hessian": the dense Hessian; both for tiny models).
    matrix_function : {"exp", "discrete"}, default="exp"
        The paper's exponential form, or the finite-product form over the recorded
        learning rates (exact unrolling when curvature and gradients are constant inside
        each segment).
    fisher : {"true", "empirical", "expected"}, default="true"
        Targets of the curvature's output gradients: sampled from the model ("true"
        Fisher, seeded by ``random_state``), the recorded ones, or the exact expectation
        (one backward pass per output). Ignored by the dense kinds ("exact" is the
        expectation, "hessian" uses the recorded targets). On the digits recipes SOURCE
        scored the same LDS with the true and the expected Fisher, and up to 0.07 less
        with the empirical one (docs/benchmarks.md).
    curvature_examples : int or None, default=None
        Estimate each curvature from at most this many examples of its stage, a random
        subset drawn from ``random_state`` (the same for every checkpoint of the stage);
        None uses all of them. Scores still cover every training example. The passes
        that estimate curvature then cost ``curvature_examples / N`` of a full pass, and
        the training gradients are computed when scoring instead of being kept from
        fitting.
    refine_steps : int, default=0
        Refine each segment's fitted curvature B with exact curvature products: its
        matrix functions are then those of the blend A = (1 − w) B + w H̃, H̃ the exact
        Gauss-Newton matrix (the one ``curvature="exact"`` forms densely) over
        ``refine_examples`` (checkpoint, example) pairs of the segment and w =
        ``refine_weight``, applied to the query-side vectors as F(B) v corrected by
        block Krylov spaces of ``refine_steps`` steps on A and on B, shared by a block
        of queries (the residual and the decay share them too). Each step is one pass
        over the ``refine_examples`` pairs carrying ``refine_rank`` vectors, however
        many queries there are. Under Adam and AdamW the functions are of the
        preconditioned K_A = p^½ (A + c) p^½ + w, corrected by the EK-FAC form's own
        (refused with a dense curvature, whose form is exact already). 0 (the default) applies the
        fitted curvature's own functions. Read only by ``transform``; not with
        ``curvature="hessian"``. The curvature page of the documentation gives the
        iterations, their error bounds, their cost and the measurements behind the
        defaults.
    refine_examples : int or None, default=512
        The (checkpoint, example) pairs the exact products of ``refine_steps`` average
        over in each segment, dealt evenly to its checkpoints, each drawing its share of
        the stage's examples from ``random_state``; None takes every example at every
        checkpoint. Read only with ``refine_steps``.
    refine_weight : float in (0, 1], default=0.25
        w, the exact matrix's share of the refined curvature A = (1 − w) B + w H̃: a
        shrinkage of the noisy exact matrix of a few hundred examples towards the fitted
        curvature of all of them. With w = 1 and ``refine_examples=None`` the refinement
        approaches ``curvature="exact"`` as ``refine_steps`` grows. Read only with
        ``refine_steps``.
    refine_rank : int or None, default=16
        r, the combinations of a block of queries' vectors that start the shared Krylov
        spaces of ``refine_steps`` (those that carry most of their energy: the leading
        singular directions); the part of a query outside their span is corrected only
        through its projection on the spaces. None (or r at least the queries of a
        block) starts from every query, at Q vectors per product. Read only with
        ``refine_steps``.
    average_checkpoints : bool, default=False
        SOURCE's fast variant: average the parameters (and batch-norm statistics) of each
        segment's checkpoints and take its curvature and training gradients once, at the
        averaged weights, instead of averaging them over the checkpoints. Fitting and
        scoring then pass over the data once per segment rather than once per
        checkpoint (half the passes at the default 6 checkpoints in 3 segments); the
        scores approximate the standard variant's, more closely when a segment's
        checkpoints lie close together. Adam's second moments are still averaged over
        the recorded checkpoints.
    adam_response : bool, default=False
        Under Adam and AdamW, take the response of the second moment v̂ to the gradient
        into the preconditioner: a lasting gradient change δg moves Adam's update by
        P (1 − m̂²/(v̂ + ε√v̂)) δg rather than P δg, P = 1/(√v̂ + ε) (the SOURCE page
        derives it and lists what it leaves out). False holds v̂ fixed.
    boundaries : list of int, optional
        Steps where segments start, strictly increasing (stage starts are added); the
        segments are then the ones they define, so ``n_segments`` must be left at None.
    modules : list of str, optional
        Attribute through these layers only (names from ``model.named_modules()``);
        required when the model has parameters outside the supported layer types
        (nn.Linear, nn.Conv2d, GPT-2's Conv1D, nn.Embedding, or registered ones).
    query_rank : int or None, default=None
        Replace each block of every preconditioned query gradient (a d_out × d_in
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
        Bytes for cached layer inputs/output gradients (reused between fitting and
        scoring, otherwise recomputed) and, separately, for preconditioned query
        gradients (queries are processed in blocks beyond it; each block streams the
        training data again).
        ``"auto"``: half of the GPU's free memory, or a quarter of the memory
        available on a CPU up to 1 GiB, read when ``fit`` runs (``memory_limit_`` holds
        the bytes).
    memory : str, path or joblib.Memory, optional
        Also cache the fitted state (the curvatures; not the kept training gradients,
        which a state read from disk computes again when scoring) on disk under this
        directory, keyed by the trajectory's fingerprint, the parameters that shape the
        state and its format, so that other processes (a search with ``n_jobs``, a later
        session) reuse it instead of fitting again.
    device : str or torch.device, default="auto"
    dtype : {"float32", "float64"}, default="float32"
        Precision of gradients and scores (eigendecompositions are always float64).
    gradient_dtype : {"bfloat16", "float16", "float32", "float64"} or None, default=None
        Precision of the forward and backward passes that produce per-example
        gradients, and of the gradients kept between fitting and scoring (None: ``dtype``).
        "bfloat16" halves their memory and, on GPUs, speeds the passes up; they are
        widened to ``dtype`` before they are combined, so curvature and scores stay
        in ``dtype``. "Cost and memory" in the documentation measures the agreement.
    progress : bool, default=False

    Attributes
    ----------
    state_ : SourceState
        The fitted segments (curvature, learning rates, preconditioner), the segments as
        recorded, the averaged states of the fast variant, and the training-loss
        factors kept for scoring (a cache, never pickled).
    segments_ : list of Segment
        The segments as recorded, with all their checkpoints.
    damping_ : list of float
        The damping of each segment, in training order: ``damping``, or what ``"auto"``
        stands for.
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
    >>> source = sourcekit.SourceAttributor(n_segments=3, damping=1e-3).fit(trajectory)
    >>> source.transform(task.test[:4]).shape
    (4, 1437)
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "n_segments": [None, Interval(int, 1, None)],
        "damping": [Interval(float, 0, None), Options("auto")],
        "matrix_function": [Options("exp", "discrete")],
        "boundaries": [
            None,
            InstanceOf((list, tuple), "a strictly increasing list of int steps", _boundaries),
        ],
        "query_rank": [None, Interval(int, 1, None)],
        "refine_rank": [None, Interval(int, 1, None)],
        "average_checkpoints": [InstanceOf((bool,), "True or False")],
        "adam_response": [InstanceOf((bool,), "True or False")],
        **CurvatureAttributor._parameter_constraints,
    }
    _state_type: ClassVar[type[FittedState] | None] = SourceState
    _state_parameters: ClassVar[tuple[str, ...]] = (
        "n_segments",
        "boundaries",
        "curvature",
        "fisher",
        "curvature_examples",
        "average_checkpoints",
        "adam_response",
        "modules",
        "random_state",
        "memory_limit",
        "device",
        "dtype",
        "gradient_dtype",
    )

    def __init__(
        self,
        n_segments: int | None = None,
        damping: float | str = "auto",
        *,
        curvature: str = "ekfac",
        matrix_function: str = "exp",
        fisher: str = "true",
        curvature_examples: int | None = None,
        refine_steps: int = 0,
        refine_examples: int | None = 512,
        refine_weight: float = 0.25,
        refine_rank: int | None = 16,
        average_checkpoints: bool = False,
        adam_response: bool = False,
        boundaries: Sequence[int] | None = None,
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
        self.n_segments = n_segments
        self.damping = damping
        self.curvature = curvature
        self.matrix_function = matrix_function
        self.fisher = fisher
        self.curvature_examples = curvature_examples
        self.refine_steps = refine_steps
        self.refine_examples = refine_examples
        self.refine_weight = refine_weight
        self.refine_rank = refine_rank
        self.average_checkpoints = average_checkpoints
        self.adam_response = adam_response
        self.boundaries = boundaries
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

    state_: SourceState

    def _fit_state(self, trajectory: Trajectory) -> SourceState:
        if self.boundaries is not None and self.n_segments is not None:
            raise ValueError(
                f"SourceAttributor got both n_segments={self.n_segments} and "
                f"boundaries={list(self.boundaries)}; the boundaries define the segments, so "
                "n_segments would be ignored. Pass one of them (n_segments=None with boundaries)."
            )
        blocks = self._blocks(trajectory)
        segments = trajectory.segments(
            None if self.boundaries is not None else (self.n_segments or DEFAULT_SEGMENTS),
            self.boundaries,
        )
        # The fast variant: each segment's checkpoints averaged into one state, standing
        # at its first checkpoint; curvature and gradients are taken there only.
        averaged = averaged_states(trajectory, segments) if self.average_checkpoints else {}
        evaluated = [
            replace(s, checkpoints=s.checkpoints[:1]) if s.checkpoints[0] in averaged else s
            for s in segments
        ]
        jobs = (  # one curvature per segment, fitted as the bar advances
            (segment.checkpoints, trajectory.stages[segment.stage].examples, segment.stage)
            for segment in tqdm(
                evaluated,
                desc="fitting segments",
                disable=not (self.progress and is_main()),
                leave=False,
            )
        )
        passes = with_states(trajectory, averaged)
        curvatures, cache = self._fit_curvatures(trajectory, passes, blocks, jobs)
        # Learning rates and Adam's moments come from the recorded segments.
        models = [
            _segment_model(
                trajectory, recorded, evaluated_segment, blocks, curvature, self.adam_response
            )
            for recorded, evaluated_segment, curvature in zip(
                segments, evaluated, curvatures, strict=True
            )
        ]
        return SourceState(blocks, models, list(segments), averaged, cache=cache)

    def _query_itemsize(self) -> int:
        """Bytes per number of the query chain's vectors (they are kept in ``dtype``)."""
        return self._torch_dtype().itemsize

    @property
    def segments_(self) -> list[Segment]:
        self._check_fitted()
        return list(self.state_.spans)

    @property
    def damping_(self) -> list[float]:
        self._check_fitted()
        if self.damping == "auto":
            return default_damping(self.state_.segments)
        return [float(self.damping)] * len(self.state_.segments)

    def _passes_trajectory(self) -> Trajectory:
        return with_states(self.trajectory_, self.state_.averaged)

    def _examples_per_block(self) -> int:
        stage_examples = self._stage_examples()
        return sum(
            len(stage_examples[m.segment.stage]) * len(m.segment.checkpoints)
            for m in self.state_.segments
        )

    def _score_block(self, queries: QueryGradients, training: TrainingGradients) -> torch.Tensor:
        return source_scores(
            queries.final(),
            self._scoring_segments(),
            training,
            self._stage_examples(),
            n_train=self.trajectory_.n_train,
            damping=self.damping_,
            matrix_function=self.matrix_function,
            dtype=self._torch_dtype(),
            query_rank=self.query_rank,
        )

    def _scoring_segments(self) -> list[SegmentModel]:
        """The fitted segments, each curvature refined by exact products with ``refine_steps``
        (at the checkpoints its gradients are taken at: the averaged state of the fast
        variant, or every checkpoint of the segment)."""
        if not self.refine_steps:
            return self.state_.segments
        trajectory = self._passes_trajectory()
        stages = self.trajectory_.stages
        segments = []
        for m in self.state_.segments:
            refined = self._refined(
                m.curvature,
                trajectory,
                m.segment.checkpoints,
                (m.segment.checkpoints, stages[m.segment.stage].examples, m.segment.stage),
                rank=self.refine_rank,
            )
            if m.adam is None:
                segments.append(replace(m, curvature=refined))
                continue
            if not isinstance(m.adam, EigenbasisAdam) or not isinstance(refined, RefinedCurvature):
                raise ValueError(
                    f"refine_steps={self.refine_steps} under Adam or AdamW (stage "
                    f"{m.segment.stage}) refines an eigenbasis curvature's Adam form, but "
                    f"curvature={self.curvature!r} forms K = P^1/2 H P^1/2 densely already. "
                    "Use refine_steps=0 with a dense curvature, or an eigenbasis kind "
                    "('ekfac', 'kfac', 'diagonal')."
                )
            segments.append(replace(m, curvature=refined, adam=RefinedAdam(refined, m.adam)))
        return segments


def _segment_model(
    trajectory: Trajectory,
    recorded: Segment,
    evaluated: Segment,
    blocks: list[LayerBlock],
    curvature: Curvature,
    response: bool = False,
) -> SegmentModel:
    """A segment with its curvature and what the recorded optimiser did in it (its
    learning rates and Adam's second moments come from the ``recorded`` segment; the
    model keeps the ``evaluated`` one, the checkpoints its gradients are taken at)."""
    opt = trajectory.stages[recorded.stage].optimizer
    # The first block's rates and decays stand for the segment; ``rates`` holds every
    # block's where they differ (parameter groups, frozen layers).
    first = [blocks[0].weight]
    lrs = effective_learning_rates(trajectory, recorded.start, recorded.end, names=first)
    decays = weight_decays(trajectory, recorded.start, recorded.end, names=first)
    coupled, decoupled = decays[first[0]]
    model = SegmentModel(
        segment=evaluated,
        curvature=curvature,
        learning_rates=lrs[first[0]],
        n_examples=trajectory.stages[recorded.stage].n_examples,
        weight_decay=coupled,
        decoupled_decay=decoupled,
        rates=block_rates(trajectory, recorded, blocks),
    )
    if not opt.is_adaptive:
        return model
    preconditioner = adam_preconditioner(trajectory, recorded, blocks, response=response)
    adam = preconditioned_curvature(
        curvature,
        preconditioner,
        coupled=coupled,
        decoupled=decoupled,
        rates=model.rates,
        reference=float(model.sequence().sum()),
    )
    return replace(model, preconditioner=preconditioner, adam=adam)
