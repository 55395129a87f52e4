"""Pieces shared by the gradient-based attributors (SOURCE, influence functions, TracIn,
TRAK, gradient similarity): parameter constraints, query gradients at a checkpoint, the
query-block scoring loop and the cache of training-loss factors filled while fitting.

Under ``torch.distributed`` the attributors stream only this rank's shard of every
stage (:func:`local_examples`); the scoring loop here exchanges the score columns at the
end, so that every rank returns the whole matrix."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import numpy as np
import sklearn
import torch
from tqdm.auto import tqdm

from .._device import resolve_device
from .._distributed import all_gather_columns, broadcast_int, is_main, owners, shard, world_size
from .._validation import InstanceOf, Interval, Options
from ..base import DEVICE, DTYPE, GRADIENT_DTYPE, MEMORY, MEMORY_LIMIT, POSITIVE_INT, PROGRESS
from ..curvature import CURVATURES
from ..curvature._passes import FitSettings
from ..exceptions import PerformanceWarning
from ..gradients._layers import LayerBlock
from ..gradients._per_example import FISHER, measurement_gradients, model_at
from ..gradients._training import TrainingGradients
from ..trajectory import Examples, Trajectory

__all__ = [
    "CURVATURE_CONSTRAINTS",
    "GRADIENT_CONSTRAINTS",
    "QueryGradientsAt",
    "curvature_subset",
    "fit_settings",
    "local_examples",
    "query_gradients",
    "query_slices",
    "resolve_seed",
    "score_in_query_blocks",
    "score_query_blocks",
]


def _module_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


# The settings of every attributor that works with per-example gradients of layer blocks.
GRADIENT_CONSTRAINTS: dict[str, list[Any]] = {
    "modules": [None, InstanceOf((list, tuple), "a list of module names", _module_list)],
    "batch_size": [POSITIVE_INT],
    "memory_limit": [*MEMORY_LIMIT],
    "memory": [None, MEMORY],
    "device": [DEVICE],
    "dtype": [DTYPE],
    "gradient_dtype": [None, GRADIENT_DTYPE],
    "progress": [PROGRESS],
}

CURVATURE_CONSTRAINTS: dict[str, list[Any]] = {
    "curvature": [Options(*CURVATURES)],
    "fisher": [Options(*FISHER)],
    "curvature_examples": [None, POSITIVE_INT],
    "random_state": [None, Interval(int, 0, None)],
    **GRADIENT_CONSTRAINTS,
}


# The owner of every training example, per (trajectory fingerprint, world size).
_OWNERS: dict[tuple[str, int], np.ndarray] = {}


def local_examples(trajectory: Trajectory, indices: np.ndarray) -> np.ndarray:
    """The examples of ``indices`` that this rank streams (all of them in one process).

    Ownership is balanced within every stage of the trajectory
    (``sourcekit._distributed.owners``) and is the same in all of them.
    """
    w = world_size()
    if w == 1:
        return np.asarray(indices, dtype=np.int64)
    key = (trajectory.fingerprint, w)
    if key not in _OWNERS:
        if len(_OWNERS) >= 4:
            _OWNERS.pop(next(iter(_OWNERS)))
        _OWNERS[key] = owners(trajectory.n_train, [s.examples for s in trajectory.stages])
    return shard(indices, _OWNERS[key])


def resolve_seed(random_state: int | None) -> int:
    """``random_state``, or fresh entropy when it is None (scikit-learn's convention).

    Under ``torch.distributed`` the fresh seed is rank 0's, so that every rank samples
    the same Fisher targets and projections.
    """
    if random_state is None:
        return broadcast_int(int(np.random.SeedSequence().generate_state(1)[0]))
    return int(random_state)


def curvature_subset(
    examples: np.ndarray, limit: int | None, seed: int | None, stage: int
) -> np.ndarray:
    """At most ``limit`` of ``examples`` (sorted), drawn without replacement, to estimate a
    curvature from; all of them when ``limit`` is None or not smaller.

    The draw depends only on (seed, stage), so every checkpoint of a stage, and every rank
    under ``torch.distributed``, uses the same subset.
    """
    examples = np.asarray(examples, dtype=np.int64)
    if limit is None or limit >= len(examples):
        return examples
    rng = np.random.default_rng(np.random.SeedSequence([seed or 0, 7919, stage]))
    return np.sort(rng.choice(examples, size=limit, replace=False))


def fit_settings(attributor: Any) -> FitSettings:
    """The pass settings of a curvature attributor.

    ``random_state=None`` follows scikit-learn: fresh randomness at every fit.
    """
    return FitSettings(
        attributor.fisher,
        resolve_seed(attributor.random_state),
        attributor.batch_size,
        resolve_device(attributor.device),
        attributor._torch_dtype(),
        attributor._pass_dtype(),
    )


def query_gradients(
    trajectory: Trajectory,
    blocks: Sequence[LayerBlock],
    queries: Examples,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    step: int | None = None,
    pass_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """∇f(z_q, θ_step) per block for all queries (default: the final checkpoint θ_T), in
    ``dtype``, from passes in ``pass_dtype`` (default: ``dtype``)."""
    step = trajectory.n_steps if step is None else step
    pass_dtype = dtype if pass_dtype is None else pass_dtype
    model = model_at(trajectory, step, blocks, device=device, dtype=pass_dtype)
    return measurement_gradients(
        model,
        blocks,
        queries,
        trajectory.measurement,
        batch_size=batch_size,
        device=device,
        dtype=pass_dtype,
        step=step,
        output_dtype=dtype,
    )


# ``grads_at(step)``: the query gradients of one block of queries at checkpoint ``step``.
QueryGradientsAt = Callable[[int], dict[str, torch.Tensor]]


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


def score_query_blocks(
    attributor: Any,
    queries: Examples,
    examples_per_block: int,
    score: Callable[[QueryGradientsAt, TrainingGradients], torch.Tensor],
    trajectory: Any = None,
) -> torch.Tensor:
    """Run ``score(grads_at, training_gradients)`` over blocks of queries.

    ``grads_at(step)`` computes the measurement gradients of the block's queries at
    checkpoint ``step`` (methods that take query gradients at every checkpoint, such as
    TracIn, call it once per checkpoint). The blocks are as large as
    ``attributor.memory_limit_`` allows (usually one); the training gradients come from
    the fitted cache (``state_["cache"]``) or are streamed, with a progress bar counting
    the training examples scored (``examples_per_block`` per block, on this rank).

    ``score`` fills the columns of this rank's shard of the training examples (all of
    them in one process); the columns of the other ranks are gathered from them at the
    end, so every rank returns the whole (n_queries, n_train) matrix.

    ``trajectory`` replaces ``attributor.trajectory_`` as the source of the models (SOURCE's
    averaged checkpoints, :class:`~sourcekit.trajectory._averaged.AveragedTrajectory`).
    """
    trajectory = attributor.trajectory_ if trajectory is None else trajectory
    blocks = attributor.state_["blocks"]
    device = resolve_device(attributor.device)
    dtype = attributor._torch_dtype()
    slices = query_slices(
        len(queries), blocks, attributor.memory_limit_, attributor._query_itemsize()
    )
    bar = tqdm(
        total=len(slices) * examples_per_block,
        desc="scoring",
        unit="example",
        disable=not (attributor.progress and is_main()),
        leave=False,
    )
    training = TrainingGradients(
        trajectory,
        blocks,
        attributor.state_["cache"],
        batch_size=attributor.batch_size,
        device=device,
        dtype=attributor._pass_dtype(),
        output_dtype=dtype,
        progress=bar,
    )
    parts = []
    for rows in slices:
        block = queries[rows]

        def grads_at(step: int, block: Examples = block) -> dict[str, torch.Tensor]:
            return query_gradients(
                trajectory,
                blocks,
                block,
                batch_size=attributor.batch_size,
                device=device,
                dtype=dtype,
                step=step,
                pass_dtype=attributor._pass_dtype(),
            )

        parts.append(score(grads_at, training))
    bar.close()
    scores = torch.cat(parts)
    mine = local_examples(trajectory, np.arange(trajectory.n_train))
    return all_gather_columns(scores, mine).cpu()


def score_in_query_blocks(
    attributor: Any,
    queries: Examples,
    examples_per_block: int,
    score: Callable[[dict[str, torch.Tensor], TrainingGradients], torch.Tensor],
    trajectory: Any = None,
) -> torch.Tensor:
    """:func:`score_query_blocks` with the query gradients at the final checkpoint θ_T:
    ``score(query_gradients, training_gradients)``."""
    final = attributor.trajectory_.n_steps
    return score_query_blocks(
        attributor,
        queries,
        examples_per_block,
        lambda grads_at, training: score(grads_at(final), training),
        trajectory,
    )
