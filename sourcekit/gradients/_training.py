"""Training-loss gradients for scoring: kept from fitting within a byte budget, or streamed.

Scoring needs ∇L(z_m, θ_c) of every training example at the checkpoints it uses. A fit
that passes over the data anyway (a curvature's, or :func:`cache_training_factors`)
keeps each batch's layer inputs and training-loss output gradients
(:class:`~sourcekit.gradients._per_example.BatchFactors`) while a :class:`CacheBudget`
allows, a whole checkpoint or nothing (:class:`PassCache`); :class:`TrainingGradients`
hands the kept batches out and streams the rest. The scoring kernels take any
:class:`GradientSource`: a callable ``(step, examples)`` that yields each example's
gradients once.

Kept batches are a cache: an attributor's fitted state holds them for the transforms
that follow, but never pickles them (they are computed again when needed).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .._distributed import is_main
from ..trajectory import Trajectory
from ._layers import FactoredGradients, LayerBlock
from ._per_example import BatchFactors, as_dtype, checkpoint_batches, model_at

__all__ = [
    "CacheBudget",
    "GradientSource",
    "LossCache",
    "PassCache",
    "TrainingGradients",
    "cache_training_factors",
    "loss_batches",
]


class GradientSource(Protocol):
    """``source(step, examples)`` yields ``(indices, grads)`` for every example once, with
    ``grads`` the per-example training-loss gradients ∇L(z_m, θ_step) per block
    {name: (n, d_out, d_in)} (or :class:`~sourcekit.gradients._layers.FactoredGradients`,
    contracted without forming them)."""

    def __call__(
        self, step: int, examples: np.ndarray, /
    ) -> Iterable[tuple[np.ndarray, Mapping[str, torch.Tensor]]]: ...


class CacheBudget:
    """Bytes that cached layer inputs and output gradients may occupy."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


class PassCache:
    """The batches of one pass over a checkpoint, kept whole within a budget or not at all.

    The first batch offered decides: the pass's bytes are projected from it (the same
    bytes per example for the whole pass) and reserved in the budget. If they do not
    fit, nothing is kept and :attr:`active` turns False at once, so that the pass can
    stop computing what only the cache would have used (the training-loss gradients
    during a curvature pass). The reservation is settled to the bytes actually kept
    when the pass ends (:meth:`close`), or returned with :meth:`drop`.
    """

    def __init__(self, budget: CacheBudget, n_examples: int, active: bool = True) -> None:
        self.budget = budget
        self.n_examples = int(n_examples)
        self.active = active
        self.batches: list[BatchFactors] = []
        self._reserved = 0
        self._kept = 0

    def wanted(self) -> bool:
        """Whether batches are still being kept (asked before computing them)."""
        return self.active

    def offer(self, entry: BatchFactors) -> None:
        if not self.active:
            return
        nbytes = entry.nbytes()
        if not self.batches:
            per_example = -(-nbytes // max(1, len(entry.indices)))  # ceiling
            self._reserved = per_example * self.n_examples
            if not self.budget.take(self._reserved):
                self._reserved = 0
                self.active = False
                return
        if self._kept + nbytes > self._reserved:  # uneven batches: reserve the rest, or give up
            if not self.budget.take(self._kept + nbytes - self._reserved):
                self.drop()
                return
            self._reserved = self._kept + nbytes
        self.batches.append(entry)
        self._kept += nbytes

    def drop(self) -> None:
        """Keep nothing, and return the reserved bytes."""
        self.budget.give_back(self._reserved)
        self._reserved = self._kept = 0
        self.batches = []
        self.active = False

    def close(self) -> list[BatchFactors] | None:
        """The kept batches (None if the pass was not kept); unused bytes go back."""
        if not self.active or not self.batches:
            self.drop()
            return None
        self.budget.give_back(self._reserved - self._kept)
        self._reserved = self._kept
        return self.batches


@dataclass
class LossCache:
    """Per checkpoint, the batches of (indices, layer inputs, training-loss output gradients)."""

    batches: dict[int, list[BatchFactors]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(b.nbytes() for batches in self.batches.values() for b in batches)


class TrainingGradients:
    """Per-example training-loss gradients at a checkpoint, from a cache or streamed.

    ``source(step, indices)`` yields ``(batch_indices, grads)`` for every example of
    ``indices`` once, where ``grads`` is a :class:`FactoredGradients`: a mapping from
    block name to the gradients (n, d_out, d_in), formed only when indexed, that also
    holds the layer inputs and output gradients for contraction scoring. Batches cached
    while fitting (layer inputs and output gradients) are reused, all of ``indices`` or
    some of them (the examples a curvature was estimated from); the model is loaded at
    ``step`` and the other examples streamed in batches of ``batch_size``.

    ``dtype`` is the precision of the passes (and of the cached batches); the batches
    handed out are widened to ``output_dtype`` (default: ``dtype``), the precision the
    scores are computed in.
    """

    def __init__(
        self,
        trajectory: Trajectory,
        blocks: Sequence[LayerBlock],
        cache: dict[int, list[BatchFactors]] | None,
        *,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
        output_dtype: torch.dtype | None = None,
        progress: Any = None,
    ) -> None:
        self.trajectory = trajectory
        self.blocks = blocks
        self.cache = cache or {}
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.output_dtype = None if output_dtype == dtype else output_dtype
        self.progress = progress  # a tqdm bar counting scored examples, or None

    def _factored(self, batch: BatchFactors) -> FactoredGradients:
        assert batch.loss is not None
        a, s = as_dtype(batch.a, self.output_dtype), as_dtype(batch.loss, self.output_dtype)
        return FactoredGradients(self.blocks, a, s)

    def _tick(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(n)

    def __call__(
        self, step: int, indices: np.ndarray
    ) -> Iterator[tuple[np.ndarray, FactoredGradients]]:
        cached = self.cache.get(step) or []
        kept = np.concatenate([b.indices for b in cached]) if cached else np.zeros(0, np.int64)
        if len(kept) and np.isin(kept, indices).all():
            # Batches kept while fitting (all of ``indices``, or the examples the
            # curvature was estimated from) come from the cache; the rest are streamed.
            for batch in cached:
                yield batch.indices, self._factored(batch)
                self._tick(len(batch.indices))
            indices = np.setdiff1d(indices, kept)
            if len(indices) == 0:
                return
        for batch in loss_batches(
            self.trajectory,
            self.blocks,
            step,
            indices,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
        ):
            yield batch.indices, self._factored(batch)
            self._tick(len(batch.indices))


def loss_batches(
    trajectory: Trajectory,
    blocks: Sequence[LayerBlock],
    step: int,
    indices: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[BatchFactors]:
    """One pass over ``indices`` at checkpoint ``step``: the layer inputs and the
    training-loss output gradients of every batch (no Fisher targets)."""
    model = model_at(trajectory, step, blocks, device=device, dtype=dtype)
    return checkpoint_batches(
        model,
        blocks,
        trajectory.train,
        indices,
        trajectory.loss,
        fisher=None,
        want_loss=True,
        noise=None,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        step=step,
    )


def cache_training_factors(
    trajectory: Trajectory,
    blocks: Sequence[LayerBlock],
    checkpoints: Sequence[tuple[int, np.ndarray]],
    *,
    memory_limit: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
) -> dict[int, list[BatchFactors]]:
    """Layer inputs and training-loss output gradients at each ``(step, examples)``.

    What :class:`TrainingGradients` needs to score without another pass over the data, kept while ``memory_limit`` bytes allow: a
    checkpoint whose factors do not fit is left out (its pass stops as soon as its first
    batch shows they will not fit, and it is streamed again when scoring).
    """
    budget = CacheBudget(memory_limit)
    cache: dict[int, list[BatchFactors]] = {}
    for step, examples in tqdm(
        checkpoints, desc="caching gradients", disable=not (progress and is_main()), leave=False
    ):
        if len(examples) == 0:  # a rank's shard of a stage may be empty: nothing to cache
            continue
        kept = PassCache(budget, len(examples))
        for batch in loss_batches(
            trajectory, blocks, step, examples, batch_size=batch_size, device=device, dtype=dtype
        ):
            kept.offer(batch)
            if not kept.wanted():
                break
        batches = kept.close()
        if batches is None:
            break  # the budget is spent: stop caching rather than start more partial passes
        cache[step] = batches
    return cache
