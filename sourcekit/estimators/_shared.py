"""Pieces shared by the curvature-based attributors (SOURCE, influence functions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._validation import InstanceOf, Interval, Options
from ..base import DEVICE, DTYPE, MEMORY, POSITIVE_INT, PROGRESS
from ..curvature._fit import CURVATURES, FitSettings
from ..gradients._layers import LayerBlock
from ..gradients._per_example import FISHER, TrainingGradients, measurement_gradients, model_at
from ..trajectory import Examples, Trajectory
from ..trajectory._replay import resolve_device

__all__ = [
    "CURVATURE_CONSTRAINTS",
    "fit_settings",
    "query_gradients",
    "query_slices",
    "score_in_query_blocks",
]


def _module_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


CURVATURE_CONSTRAINTS: dict[str, list[Any]] = {
    "curvature": [Options(*CURVATURES)],
    "fisher": [Options(*FISHER)],
    "modules": [None, InstanceOf((list, tuple), "a list of module names", _module_list)],
    "random_state": [None, Interval(int, 0, None)],
    "batch_size": [POSITIVE_INT],
    "memory_limit": [Interval(int, 1, None)],
    "memory": [None, MEMORY],
    "device": [DEVICE],
    "dtype": [DTYPE],
    "progress": [PROGRESS],
}


def fit_settings(attributor: Any) -> FitSettings:
    """The pass settings of a curvature attributor.

    ``random_state=None`` follows scikit-learn: fresh randomness at every fit.
    """
    seed = attributor.random_state
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    return FitSettings(
        attributor.fisher,
        seed,
        attributor.batch_size,
        resolve_device(attributor.device),
        attributor._torch_dtype(),
    )


def query_gradients(
    trajectory: Trajectory,
    blocks: Sequence[LayerBlock],
    queries: Examples,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """∇f(z_q, θ_T) per block for all queries, at the final checkpoint."""
    model = model_at(trajectory, trajectory.n_steps, blocks, device=device, dtype=dtype)
    return measurement_gradients(
        model,
        blocks,
        queries,
        trajectory.measurement,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        step=trajectory.n_steps,
    )


def query_slices(n_queries: int, blocks: Sequence[LayerBlock], memory_limit: int) -> list[slice]:
    """Blocks of queries whose preconditioned gradients fit in half of ``memory_limit``.

    Each query holds about three float64 vectors of the attributed parameters at once
    (v, u and the v carried to the previous segment).
    """
    per_query = 3 * 8 * sum(b.n_params for b in blocks)
    size = max(1, (memory_limit // 2) // per_query)
    return [slice(i, min(i + size, n_queries)) for i in range(0, n_queries, size)]


def score_in_query_blocks(
    attributor: Any,
    queries: Examples,
    examples_per_block: int,
    score: Callable[[dict[str, torch.Tensor], TrainingGradients], torch.Tensor],
) -> torch.Tensor:
    """Run ``score(query_gradients, training_gradients)`` over blocks of queries.

    The blocks are as large as ``attributor.memory_limit`` allows (usually one); the
    training gradients come from the fitted cache or are streamed, with a progress bar
    counting the training examples scored (``examples_per_block`` per block).
    """
    trajectory = attributor.trajectory_
    blocks = attributor.state_["blocks"]
    device = resolve_device(attributor.device)
    dtype = attributor._torch_dtype()
    slices = query_slices(len(queries), blocks, attributor.memory_limit)
    bar = tqdm(
        total=len(slices) * examples_per_block,
        desc="scoring",
        unit="example",
        disable=not attributor.progress,
        leave=False,
    )
    training = TrainingGradients(
        trajectory,
        blocks,
        attributor.state_["cache"],
        batch_size=attributor.batch_size,
        device=device,
        dtype=dtype,
        progress=bar,
    )
    parts = []
    for rows in slices:
        grads = query_gradients(
            trajectory,
            blocks,
            queries[rows],
            batch_size=attributor.batch_size,
            device=device,
            dtype=dtype,
        )
        parts.append(score(grads, training))
    bar.close()
    return torch.cat(parts).cpu()
