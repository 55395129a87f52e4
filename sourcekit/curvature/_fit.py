"""The curvature kinds: one fitter per kind, registered in one table.

Each kind is a function in a module of its own that takes the passes over the data a
curvature is fitted from (:class:`~sourcekit.curvature._passes.CurvaturePasses`) and
returns a :class:`~sourcekit.curvature._objects.Curvature`. :data:`CURVATURE_KINDS`
maps the names that ``curvature=`` accepts to them; the attributors' constraints, the
command line and the tests read the names from it (:data:`CURVATURES`). A new kind is a
new module with its fitter (and, if none of the existing objects represents it, its
``Curvature`` subclass) and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..gradients._layers import LayerBlock
from ..gradients._per_example import FISHER
from ..gradients._training import CacheBudget, LossCache
from ..trajectory import Trajectory
from ._dense import fit_gauss_newton, fit_hessian
from ._diagonal import fit_diagonal
from ._ekfac import fit_ekfac
from ._identity import fit_identity
from ._kfac import fit_kfac
from ._objects import Curvature
from ._passes import CurvaturePasses, FitSettings

__all__ = ["CURVATURES", "CURVATURE_KINDS", "fit_curvature"]

CURVATURE_KINDS: dict[str, Callable[[CurvaturePasses], Curvature]] = {
    "ekfac": fit_ekfac,
    "kfac": fit_kfac,
    "diagonal": fit_diagonal,
    "identity": fit_identity,
    "exact": fit_gauss_newton,
    "hessian": fit_hessian,
}
"""The fitter of every curvature kind, by the name ``curvature=`` accepts."""

CURVATURES = tuple(CURVATURE_KINDS)
"""The values of ``curvature=`` that :func:`fit_curvature` and the attributors accept."""


def fit_curvature(
    kind: str,
    trajectory: Trajectory,
    blocks: Sequence[LayerBlock],
    steps: Sequence[int],
    indices: np.ndarray,
    settings: FitSettings,
    *,
    budget: CacheBudget | None = None,
    loss_cache: LossCache | None = None,
) -> Curvature:
    """Fit one curvature over the checkpoints ``steps`` using the examples ``indices``.

    When ``loss_cache`` is given, the layer inputs and training-loss output gradients of
    every batch are stored in it while the budget allows (they are what scoring needs).

    Parameters
    ----------
    kind : {"ekfac", "kfac", "diagonal", "identity", "exact", "hessian"}
        The approximation: a key of :data:`CURVATURE_KINDS` (listed in :data:`CURVATURES`).
    trajectory : Trajectory
        The recorded run; its checkpoints are read, its model is never modified.
    blocks : sequence of LayerBlock
        The layers to attribute through (``find_blocks(model, modules)``).
    steps : sequence of int
        The checkpoints to average over (a segment's, or the final step).
    indices : ndarray of int
        The training examples to average over (the segment's stage), or this rank's
        shard of them under ``torch.distributed``: the sums and counts are then summed
        over the ranks, so every rank must make the same call with its own shard.
    settings : FitSettings
        Fisher targets, seed, batch size, device and precision of the passes.
    budget : CacheBudget, optional
        Bytes that cached layer inputs and output gradients may occupy (default: none).
    loss_cache : LossCache, optional
        Filled with the training-loss factors of every batch, within the budget.

    Returns
    -------
    Curvature
        An EigenbasisCurvature for "ekfac", "kfac", "diagonal" and "identity", a
        DenseCurvature for "exact" and "hessian".

    Raises
    ------
    NonFiniteError
        If NaN or infinity appears in the covariances or eigenvalues (a diverged
        checkpoint).

    Examples
    --------
    ``LayerBlock``, ``find_blocks`` and ``FitSettings`` are not part of the public API
    yet; the attributors call this function for you.

    >>> import numpy as np
    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.curvature import fit_curvature
    >>> from sourcekit.curvature._passes import FitSettings
    >>> from sourcekit.gradients._layers import find_blocks
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(model, data, [stage], progress=False)
    >>> blocks = find_blocks(trajectory.build_model())
    >>> [(b.name, b.d_out, b.d_in) for b in blocks]  # the bias is an extra input column
    [('0', 4, 4), ('2', 2, 5)]
    >>> curvature = fit_curvature(
    ...     "kfac", trajectory, blocks, trajectory.checkpoint_steps[:3],
    ...     np.arange(trajectory.n_train), FitSettings(fisher="empirical"),
    ... )
    >>> curvature
    EigenbasisCurvature(kind='kfac', blocks=['0', '2'])
    """

    if kind not in CURVATURE_KINDS:
        raise ValueError(f"The curvature kind must be one of {CURVATURES}; got {kind!r}.")
    if settings.fisher not in FISHER:
        raise ValueError(f"The 'fisher' setting must be one of {FISHER}; got {settings.fisher!r}.")
    passes = CurvaturePasses(
        trajectory, blocks, steps, indices, settings, budget or CacheBudget(0), loss_cache
    )
    return CURVATURE_KINDS[kind](passes)
