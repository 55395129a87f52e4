"""``CurvatureAttributor``: the gradient attributors that fit a curvature (SOURCE, influence).

Their shared parameters (``curvature``, a kind of the registry
``sourcekit.curvature.CURVATURES``; ``fisher``; ``curvature_examples``;
``refine_steps``, ``refine_examples``, ``refine_weight``; ``random_state``), the
settings of the curvature passes, the fit of one curvature per job (a segment's
checkpoints and stage, or the final step) with one byte budget and one cache of
training-loss factors for all of them, and, when scoring with ``refine_steps``, the
fitted curvature of a job blended with the exact matrix of ``refine_examples``
(checkpoint, example) pairs of the job, applied by Krylov iterations on exact products
(:meth:`CurvatureAttributor._refined`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from .._distributed import local_examples
from .._validation import Interval, Options
from ..base import POSITIVE_INT
from ..curvature import CURVATURES, Curvature, fit_curvature
from ..curvature._passes import FitSettings
from ..curvature._products import GaussNewtonProducts
from ..curvature._refined import RefinedCurvature
from ..gradients._layers import LayerBlock
from ..gradients._per_example import FISHER, BatchFactors
from ..gradients._training import CacheBudget, LossCache
from ..trajectory import Trajectory
from ._gradient import GradientAttributor, resolve_seed

__all__ = ["CurvatureAttributor", "CurvatureJob", "curvature_subset", "refinement_pairs"]

# (checkpoints to average over, the examples to estimate from, the key of their subset)
CurvatureJob = tuple[Sequence[int], np.ndarray, int]


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


def refinement_pairs(
    examples: np.ndarray, steps: Sequence[int], limit: int | None, seed: int | None, stage: int
) -> dict[int, np.ndarray]:
    """The examples each checkpoint of ``steps`` streams for the refinement's products.

    ``limit`` (checkpoint, example) pairs in all, dealt evenly to the checkpoints (the
    first ``limit mod C`` take one more), each checkpoint drawing its share of
    ``examples`` without replacement (all of them when its share is not smaller) from
    a seed of its own: an unbiased sample of the pairs the segment's exact curvature
    averages over, at the cost of ``limit`` example passes per product however many
    checkpoints the segment has. None: every example at every checkpoint.
    """
    examples = np.asarray(examples, dtype=np.int64)
    if limit is None:
        return {step: examples for step in steps}
    out = {}
    for i, step in enumerate(steps):
        share = limit // len(steps) + (1 if i < limit % len(steps) else 0)
        if share >= len(examples):
            out[step] = examples
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed or 0, 104729, stage, step]))
        out[step] = np.sort(rng.choice(examples, size=max(share, 1), replace=False))
    return out


class CurvatureAttributor(GradientAttributor):
    """The base of the gradient attributors that fit a curvature (see the module notes)."""

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "curvature": [Options(*CURVATURES)],
        "fisher": [Options(*FISHER)],
        "curvature_examples": [None, POSITIVE_INT],
        "refine_steps": [Interval(int, 0, None)],
        "refine_examples": [None, POSITIVE_INT],
        "refine_weight": [Interval(float, 0.0, 1.0, closed="right")],
        "random_state": [None, Interval(int, 0, None)],
        **GradientAttributor._parameter_constraints,
    }

    curvature: str
    fisher: str
    curvature_examples: int | None
    refine_steps: int
    refine_examples: int | None
    refine_weight: float
    random_state: int | None

    def _fresh_each_fit(self) -> bool:
        # scikit-learn's random_state=None: fresh Fisher targets at every fit, no cache
        return self.random_state is None

    def _fit_settings(self) -> FitSettings:
        """The settings of the curvature passes (a fresh seed when ``random_state`` is None)."""
        return FitSettings(
            self.fisher,
            resolve_seed(self.random_state),
            self.batch_size,
            self._device(),
            self._torch_dtype(),
            self._pass_dtype(),
        )

    def _fit_curvatures(
        self,
        trajectory: Trajectory,
        passes: Trajectory,
        blocks: Sequence[LayerBlock],
        jobs: Iterable[CurvatureJob],
    ) -> tuple[list[Curvature], dict[int, list[BatchFactors]]]:
        """One curvature per job, and the training-loss factors kept on the way.

        Each job estimates from at most ``curvature_examples`` of its examples (this
        rank's shard of them); the passes build their models through ``passes`` (the
        run, or SOURCE's averaged-checkpoint view of it). The factors of every job's
        examples (a subset's too: scoring then streams only the others) are kept for
        scoring while half of ``memory_limit_`` allows.
        """
        settings = self._fit_settings()
        budget = CacheBudget(self.memory_limit_ // 2)
        cache = LossCache()
        curvatures = []
        for steps, examples, key in jobs:
            subset = curvature_subset(
                examples, self.curvature_examples, settings.random_state, key
            )
            curvatures.append(
                fit_curvature(
                    self.curvature,
                    passes,
                    blocks,
                    steps,
                    local_examples(trajectory, subset),
                    settings,
                    budget=budget,
                    loss_cache=cache,
                )
            )
        return curvatures, cache.batches

    # --- scoring -----------------------------------------------------------------------
    def _query_extra_bytes(self) -> int:
        # a refinement holds, per query and in float64, its vector flat and in the fitted
        # curvature's eigenbasis and the two functions' results in each (6 vectors), and,
        # where the iteration runs per query (conjugate gradients, the per-parameter-rate
        # form), a Krylov basis of refine_steps vectors; the shared Krylov spaces of the
        # other functions (3 × refine_rank × refine_steps vectors) do not grow with the
        # queries
        return 8 * (self.refine_steps + 6) if self.refine_steps else 0

    def _refined(
        self,
        curvature: Curvature,
        trajectory: Trajectory,
        steps: Sequence[int],
        job: CurvatureJob,
        rank: int | None = None,
    ) -> Curvature:
        """``curvature``, or with ``refine_steps`` its blend with the exact curvature it
        approximates, applied by Krylov iterations with it as guide
        (:class:`~sourcekit.curvature._refined.RefinedCurvature`).

        The products average over ``refine_examples`` (checkpoint, example) pairs of the
        job (:func:`refinement_pairs`): its ``steps`` (the checkpoints the curvature was
        fitted at, built through ``trajectory``: SOURCE's averaged view or the run) and
        its examples. ``rank``: the query combinations that start the shared Krylov
        spaces of the functions other than the inverse (None: every query).
        """
        if not self.refine_steps:
            return curvature
        if self.curvature == "hessian":
            raise ValueError(
                f"refine_steps={self.refine_steps} refines with exact Gauss-Newton products, "
                "but curvature='hessian' is the Hessian: the refinement would change the "
                "matrix. Use refine_steps=0 with curvature='hessian', or another curvature."
            )
        _, examples, key = job
        pairs = refinement_pairs(
            examples, steps, self.refine_examples, resolve_seed(self.random_state), key
        )
        products = GaussNewtonProducts(
            trajectory,
            curvature.blocks,
            steps,
            {step: local_examples(self.trajectory_, subset) for step, subset in pairs.items()},
            batch_size=self.batch_size,
            device=self._device(),
            dtype=self._torch_dtype(),
            memory_limit=self.memory_limit_ // 4,
            fisher=self.fisher,
            random_state=resolve_seed(self.random_state),
        )
        return RefinedCurvature(
            curvature, products, self.refine_steps, products.diagonal, self.refine_weight, rank
        )
