"""The passes over the training data that a curvature is fitted from.

A fitter of the registry (``sourcekit.curvature._fit``) receives a
:class:`CurvaturePasses`: the run (or SOURCE's averaged-checkpoint view of it), the
layer blocks, the checkpoints to average over, this rank's training examples and the
:class:`FitSettings` of the passes, with the byte budget and the cache in which the
training-loss factors of every batch may be kept for scoring. Its :meth:`batches`
streams one checkpoint's batches with the settings' Fisher targets.

Under ``torch.distributed`` each rank passes its shard of the examples (see
``sourcekit._distributed.shard``): the sums a fitter forms and the counts that normalise
them are summed over the ranks (:func:`sum_over_ranks`) before they are divided or
eigendecomposed, so every rank fits the same curvature, that of all the examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .._distributed import all_reduce_sum, is_distributed
from ..exceptions import NonFiniteError
from ..gradients._layers import LayerBlock
from ..gradients._per_example import BatchFactors, FisherNoise, checkpoint_batches, model_at
from ..gradients._training import CacheBudget, LossCache
from ..trajectory import Trajectory

__all__ = [
    "CurvaturePasses",
    "FitSettings",
    "check_finite",
    "eigh",
    "fisher_seed",
    "sum_over_ranks",
]


@dataclass
class FitSettings:
    """How passes over the training data are run.

    ``dtype`` is the working precision of the covariances and of their rotations;
    ``gradient_dtype`` that of the forward and backward passes and of the kept batches
    (None: ``dtype``). Eigendecompositions always run in float64.
    """

    fisher: str = "true"
    random_state: int | None = 0
    batch_size: int = 256
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    gradient_dtype: torch.dtype | None = None

    @property
    def pass_dtype(self) -> torch.dtype:
        return self.dtype if self.gradient_dtype is None else self.gradient_dtype


def fisher_seed(random_state: int | None, step: int) -> int:
    """Seed of the Fisher targets sampled at checkpoint ``step``."""
    base = 0 if random_state is None else int(random_state)
    return int(np.random.SeedSequence([base, int(step), 7]).generate_state(1)[0])


@dataclass
class CurvaturePasses:
    """What a curvature is fitted from (see the module notes).

    Attributes
    ----------
    trajectory : Trajectory
        The recorded run (the models of the passes are built through it).
    blocks : sequence of LayerBlock
        The layers to attribute through.
    steps : sequence of int
        The checkpoints to average over (a segment's, or the final step).
    indices : ndarray of int
        The training examples to average over, or this rank's shard of them.
    settings : FitSettings
    budget : CacheBudget
        Bytes that kept layer inputs and output gradients may occupy.
    loss_cache : LossCache or None
        Where the training-loss factors of every batch are kept for scoring, within the
        budget (None: not kept).
    """

    trajectory: Trajectory
    blocks: Sequence[LayerBlock]
    steps: Sequence[int]
    indices: np.ndarray
    settings: FitSettings
    budget: CacheBudget = field(default_factory=lambda: CacheBudget(0))
    loss_cache: LossCache | None = None

    def batches(
        self, step: int, *, want_loss: bool | Callable[[], bool]
    ) -> Iterator[BatchFactors]:
        """One pass over ``indices`` at checkpoint ``step`` with the settings' Fisher targets."""
        settings = self.settings
        model = model_at(
            self.trajectory, step, self.blocks, device=settings.device, dtype=settings.pass_dtype
        )
        return checkpoint_batches(
            model,
            self.blocks,
            self.trajectory.train,
            self.indices,
            self.trajectory.loss,
            fisher=settings.fisher,
            want_loss=want_loss,
            noise=FisherNoise(fisher_seed(settings.random_state, step)),
            batch_size=settings.batch_size,
            device=settings.device,
            dtype=settings.pass_dtype,
            step=step,
        )


def check_finite(matrix: torch.Tensor, what: str, name: str) -> None:
    if not torch.isfinite(matrix).all():
        raise NonFiniteError(
            f"NaN or infinity in the {what} of layer {name!r}. The checkpoints of this segment may "
            "have diverged; choose other checkpoints or check the recorded data."
        )


def eigh(matrix: torch.Tensor, what: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    check_finite(matrix, what, name)
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = torch.linalg.eigh(sym.double())
    return values.clamp_min(0.0), vectors


def sum_over_ranks(sums: Sequence[torch.Tensor], counts: Sequence[float]) -> list[float]:
    """Sum ``sums`` (in place) and ``counts`` over the ranks; return the summed counts.

    The seam between a pass over this rank's shard of the examples and the
    normalisation: in one process nothing changes; under ``torch.distributed`` every
    rank then holds the sums and counts of the whole training set.
    """
    if not is_distributed():
        return list(counts)
    table = torch.tensor(list(counts), dtype=torch.float64)  # integers exact up to 2**53
    all_reduce_sum([*sums, table])
    return table.tolist()
