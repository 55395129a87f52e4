"""``GradientAttributor``: the attributors that stream per-example gradients.

SOURCE, influence functions, TracIn, TRAK and gradient similarity all score by
contracting query gradients ∇f(z_q, θ) with per-example training-loss gradients
∇L(z_m, θ) of layer blocks. What they share lives here, as one class between
:class:`~sourcekit.BaseAttributor` and them:

- the parameters that say how gradients are computed (``modules``, ``batch_size``,
  ``memory_limit``, ``memory``, ``device``, ``dtype``, ``gradient_dtype``,
  ``progress``) and their constraints;
- the fit settings: ``memory_limit`` resolved to ``memory_limit_`` once per fit, the
  disk cache named by ``memory``, the layer blocks, the training-loss factors kept for
  scoring (:meth:`GradientAttributor._cache_training_factors`);
- the fitted state's base, :class:`GradientState` (the blocks and the kept factors,
  which are a cache: never pickled, computed again when needed);
- the query side: :class:`QueryGradients` of one block of queries at any checkpoint,
  and the loop over blocks of queries (``_scores``), as many queries per block as
  ``memory_limit_`` allows, which calls the estimator's ``_score_block`` once per block
  with the query gradients and a :class:`~sourcekit.gradients._training.TrainingGradients`
  source, then gathers the score columns of every rank under ``torch.distributed``.

An estimator of this family implements ``_fit_state`` (returning a
:class:`GradientState`) and ``_score_block``, and ``_examples_per_block`` where scoring
streams other than each training example once.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import FrameType
from typing import Any, ClassVar

import joblib
import numpy as np
import sklearn
import torch
from tqdm.auto import tqdm

from .._device import resolve_device
from .._distributed import all_gather_columns, broadcast_int, is_main, local_examples
from .._memory import resolve_memory_limit
from .._validation import InstanceOf
from ..base import (
    DEVICE,
    DTYPE,
    DTYPES,
    GRADIENT_DTYPE,
    GRADIENT_DTYPES,
    MEMORY,
    MEMORY_LIMIT,
    POSITIVE_INT,
    PROGRESS,
    BaseAttributor,
    FittedState,
    as_memory,
)
from ..exceptions import PerformanceWarning
from ..gradients._layers import LayerBlock, find_blocks
from ..gradients._per_example import BatchFactors, measurement_gradients, model_at
from ..gradients._training import TrainingGradients, cache_training_factors
from ..trajectory import Examples, Trajectory

__all__ = ["GradientAttributor", "GradientState", "QueryGradients", "query_slices", "resolve_seed"]


def _module_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


@dataclasses.dataclass
class GradientState(FittedState):
    """The fitted state of a gradient attributor: its layer blocks and the kept factors.

    Attributes
    ----------
    blocks : list of LayerBlock
        The layers attributed through.
    cache : dict of step to list of BatchFactors
        Training-loss factors kept from fitting (layer inputs and output gradients of
        every batch at those checkpoints), within ``memory_limit``. A cache: left out
        of the pickle (an attributor pickles to its curvature and settings, not to its
        gradients) and computed again, when scoring, where it is missing.
    """

    blocks: list[LayerBlock]
    cache: dict[int, list[BatchFactors]] = dataclasses.field(default_factory=dict, kw_only=True)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "cache": {}}


def resolve_seed(random_state: int | None) -> int:
    """``random_state``, or fresh entropy when it is None (scikit-learn's convention).

    Under ``torch.distributed`` the fresh seed is rank 0's, so that every rank samples
    the same Fisher targets and projections.
    """
    if random_state is None:
        return broadcast_int(int(np.random.SeedSequence().generate_state(1)[0]))
    return int(random_state)


def caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued here that points at the first frame outside
    sourcekit and scikit-learn (the user's call, through any wrapper of ``transform``)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sklearn_root = os.path.dirname(os.path.abspath(sklearn.__file__))
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith((package, sklearn_root)):
        frame, level = frame.f_back, level + 1
    return level


def query_slices(
    n_queries: int, blocks: Sequence[LayerBlock], memory_limit: int, itemsize: int = 8
) -> list[slice]:
    """Blocks of queries whose preconditioned gradients fit in half of ``memory_limit``.

    Each query holds about three vectors of the attributed parameters at once (v, u and
    the v carried to the previous segment), of ``itemsize`` bytes per number (float64 by
    default; SOURCE's chain runs in its ``dtype``). More than one block streams the
    training data once per block: a :class:`~sourcekit.exceptions.PerformanceWarning`
    says so, with the ``memory_limit`` that would stream it once.
    """
    per_query = 3 * itemsize * sum(b.n_params for b in blocks)
    size = max(1, (memory_limit // 2) // per_query)
    slices = [slice(i, min(i + size, n_queries)) for i in range(0, n_queries, size)]
    if len(slices) > 1:
        needed = 2 * per_query * n_queries
        warnings.warn(
            f"memory_limit={memory_limit} holds the preconditioned gradients of {size} of "
            f"the {n_queries} queries at once ({per_query:,} bytes each), so the "
            f"training data is streamed {len(slices)} times, once per block of queries. "
            f"Set memory_limit to at least {needed} bytes to stream it once, or transform "
            "fewer queries per call.",
            PerformanceWarning,
            stacklevel=caller_stacklevel(),
        )
    return slices


class QueryGradients:
    """∇f(z_q, θ_step) of one block of queries, per layer block, at any checkpoint.

    ``at(step)`` runs the passes at checkpoint ``step`` (in ``pass_dtype``) and returns
    {block: (n_queries, d_out, d_in)} in ``dtype``; ``final()`` is ``at(T)``, the final
    parameters. Methods that measure queries at every checkpoint (TracIn, TRAK's
    ensemble) call ``at`` once per checkpoint, holding one checkpoint's gradients at a
    time.
    """

    def __init__(
        self,
        trajectory: Trajectory,
        blocks: Sequence[LayerBlock],
        queries: Examples,
        *,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        pass_dtype: torch.dtype,
    ) -> None:
        self.trajectory = trajectory
        self.blocks = blocks
        self.queries = queries
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.pass_dtype = pass_dtype

    def at(self, step: int) -> dict[str, torch.Tensor]:
        """The measurement gradients of the queries at checkpoint ``step``."""
        model = model_at(
            self.trajectory, step, self.blocks, device=self.device, dtype=self.pass_dtype
        )
        return measurement_gradients(
            model,
            self.blocks,
            self.queries,
            self.trajectory.measurement,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.pass_dtype,
            step=step,
            output_dtype=self.dtype,
        )

    def final(self) -> dict[str, torch.Tensor]:
        """The measurement gradients at the final parameters θ_T."""
        return self.at(self.trajectory.n_steps)


class GradientAttributor(BaseAttributor, ABC):
    """The base of the attributors that stream per-example gradients (see the module notes).

    Subclasses list the shared parameters in their own ``__init__`` (scikit-learn reads
    the signature) and extend ``_parameter_constraints``.

    Attributes
    ----------
    state_ : GradientState
        The fitted state (a subclass of it per method).
    memory_limit_ : int
        The bytes ``memory_limit`` stood for in this fit.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "modules": [None, InstanceOf((list, tuple), "a list of module names", _module_list)],
        "batch_size": [POSITIVE_INT],
        "memory_limit": [*MEMORY_LIMIT],
        "memory": [None, MEMORY],
        "device": [DEVICE],
        "dtype": [DTYPE],
        "gradient_dtype": [None, GRADIENT_DTYPE],
        "progress": [PROGRESS],
    }
    _state_type: ClassVar[type[FittedState] | None] = GradientState

    modules: Sequence[str] | None
    batch_size: int
    memory_limit: int | str
    memory: Any
    device: Any
    dtype: str
    gradient_dtype: str | None
    progress: bool
    state_: GradientState

    # --- settings ----------------------------------------------------------------------
    def _prepare_fit(self) -> None:
        # "auto" becomes bytes here, once per fit, from the memory free on the device
        self.memory_limit_ = resolve_memory_limit(self.memory_limit, self._device())

    def _disk_cache(self) -> joblib.Memory | None:
        return as_memory(self.memory)

    def _device(self) -> torch.device:
        return resolve_device(self.device)

    def _torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def _pass_dtype(self) -> torch.dtype:
        """The precision of the forward and backward passes: ``gradient_dtype`` if set,
        else the working precision ``dtype``."""
        chosen = self.gradient_dtype
        return self._torch_dtype() if chosen is None else GRADIENT_DTYPES[chosen]

    def _query_itemsize(self) -> int:
        """Bytes per number of the query side's vectors, for sizing query blocks: float64
        by default; an attributor whose query side runs in ``dtype`` says so."""
        return 8

    # --- fitting -----------------------------------------------------------------------
    def _blocks(self, trajectory: Trajectory) -> list[LayerBlock]:
        """The layer blocks of the run's model (``modules``, or every supported layer),
        without the layers the run never trained (frozen in every stage)."""
        return find_blocks(
            trajectory.architecture.build(), self.modules, trajectory.trained_parameters
        )

    def _training_gradients(
        self,
        trajectory: Trajectory,
        blocks: Sequence[LayerBlock],
        cache: dict[int, list[BatchFactors]] | None,
        progress: Any = None,
    ) -> TrainingGradients:
        """The training-loss gradients of ``trajectory``'s checkpoints, from ``cache`` or
        streamed, in ``dtype`` from passes in ``gradient_dtype``."""
        return TrainingGradients(
            trajectory,
            blocks,
            cache,
            batch_size=self.batch_size,
            device=self._device(),
            dtype=self._pass_dtype(),
            output_dtype=self._torch_dtype(),
            progress=progress,
        )

    def _cache_training_factors(
        self,
        trajectory: Trajectory,
        blocks: Sequence[LayerBlock],
        checkpoints: Sequence[tuple[int, np.ndarray]],
    ) -> dict[int, list[BatchFactors]]:
        """The training-loss factors at each ``(step, examples)``, kept within half of
        ``memory_limit_`` (the other half is the query blocks')."""
        return cache_training_factors(
            trajectory,
            blocks,
            checkpoints,
            memory_limit=self.memory_limit_ // 2,
            batch_size=self.batch_size,
            device=self._device(),
            dtype=self._pass_dtype(),
            progress=self.progress,
        )

    # --- scoring -----------------------------------------------------------------------
    def _passes_trajectory(self) -> Trajectory:
        """The run as the scoring passes see it (SOURCE's fast variant averages states)."""
        return self.trajectory_

    @abstractmethod
    def _score_block(self, queries: QueryGradients, training: TrainingGradients) -> torch.Tensor:
        """The (n_queries, n_train) scores of one block of queries; the columns of this
        rank's training examples are filled (all of them in one process)."""

    def _local_examples(self) -> np.ndarray:
        """The training examples whose score columns this rank computes (all of them in
        one process)."""
        everything = np.arange(self.trajectory_.n_train, dtype=np.int64)
        return local_examples(self.trajectory_, everything)

    def _stage_examples(self) -> list[np.ndarray]:
        """This rank's training examples of each stage."""
        return [local_examples(self.trajectory_, s.examples) for s in self.trajectory_.stages]

    def _examples_per_block(self) -> int:
        """Training examples this rank scores per block of queries, the progress bar's
        unit: each of its examples once here (0 when scoring streams none)."""
        return len(self._local_examples())

    def _scores(self, queries: Examples) -> torch.Tensor:
        """Score ``queries`` in blocks, as many queries per block as ``memory_limit_``
        allows (usually one block), and gather every rank's columns."""
        trajectory = self._passes_trajectory()
        blocks = self.state_.blocks
        slices = query_slices(len(queries), blocks, self.memory_limit_, self._query_itemsize())
        per_block = self._examples_per_block()
        bar = tqdm(
            total=len(slices) * per_block,
            desc="scoring",
            unit="example",
            disable=not (self.progress and is_main() and per_block),
            leave=False,
        )
        training = self._training_gradients(trajectory, blocks, self.state_.cache, bar)
        parts = []
        for rows in slices:
            block = QueryGradients(
                trajectory,
                blocks,
                queries[rows],
                batch_size=self.batch_size,
                device=self._device(),
                dtype=self._torch_dtype(),
                pass_dtype=self._pass_dtype(),
            )
            parts.append(self._score_block(block, training))
        bar.close()
        return all_gather_columns(torch.cat(parts), self._local_examples()).cpu()
