"""Training-loss gradients for scoring: streamed, or handed out from batches kept by a fit."""

from __future__ import annotations

import numpy as np
import torch

from sourcekit import Trajectory
from sourcekit.gradients._layers import LayerBlock, find_blocks
from sourcekit.gradients._per_example import BatchFactors, model_at
from sourcekit.gradients._training import TrainingGradients

from .. import _cases
from .test_layers import (
    GRADIENT_RTOL,
    assert_gradients_match,
    parameter_names,
    reference_gradients,
    split_all,
)
from .test_per_example import CPU, _batches


def _training_gradients(
    trajectory: Trajectory,
    blocks: list[LayerBlock],
    cache: dict[int, list[BatchFactors]] | None,
    batch_size: int = 5,
) -> TrainingGradients:
    return TrainingGradients(
        trajectory, blocks, cache, batch_size=batch_size, device=CPU, dtype=torch.float64
    )


def _collect(
    source: TrainingGradients, step: int, indices: np.ndarray
) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    seen, parts = [], {}
    for idx, grads in source(step, indices):
        seen.append(idx)
        for name, g in grads.items():
            parts.setdefault(name, []).append(g)
    return np.concatenate(seen), {k: torch.cat(v) for k, v in parts.items()}


def test_training_gradients_stream_the_per_example_loss_gradients() -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    blocks = find_blocks(trajectory.architecture.build())
    indices = trajectory.stages[1].examples
    step = trajectory.checkpoint_steps[-1]
    seen, got = _collect(_training_gradients(trajectory, blocks, None), step, indices)
    assert np.array_equal(seen, indices)
    model = model_at(trajectory, step, blocks, device=CPU, dtype=torch.float64)
    data = trajectory.train[indices].to(dtype=torch.float64)
    want = reference_gradients(
        model, trajectory.loss, data.inputs, data.targets, parameter_names(blocks)
    )
    assert_gradients_match(split_all(blocks, got, model), want, rtol=GRADIENT_RTOL)


def test_training_gradients_from_a_cache_equal_the_streamed_ones() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    blocks = find_blocks(trajectory.architecture.build())
    indices = trajectory.stages[0].examples
    model = model_at(trajectory, 4, blocks, device=CPU, dtype=torch.float64)
    cached = _batches(model, blocks, trajectory.train, indices, trajectory.loss, batch_size=5)
    seen_c, from_cache = _collect(_training_gradients(trajectory, blocks, {4: cached}), 4, indices)
    seen_s, streamed = _collect(_training_gradients(trajectory, blocks, None, 7), 4, indices)
    assert np.array_equal(seen_c, indices) and np.array_equal(seen_s, indices)
    for name in streamed:
        # Same products, batches of 5 against batches of 7: summation order only.
        scale = float(streamed[name].abs().max())
        torch.testing.assert_close(from_cache[name], streamed[name], rtol=0, atol=1e-13 * scale)


def test_training_gradients_do_not_reuse_a_cache_of_other_examples() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    blocks = find_blocks(trajectory.architecture.build())
    model = model_at(trajectory, 4, blocks, device=CPU, dtype=torch.float64)
    cached = _batches(model, blocks, trajectory.train, np.arange(0, 6), trajectory.loss)
    seen, _ = _collect(_training_gradients(trajectory, blocks, {4: cached}), 4, np.arange(6, 12))
    assert np.array_equal(np.sort(seen), np.arange(6, 12))
