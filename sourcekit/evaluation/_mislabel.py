"""Mislabel detection: self-influence ranks training examples with wrong labels.

An example's self-influence is its score on itself, τ[m, m]: the first-order effect of
including z_m on its own measurement. A mislabelled example can only be fitted by
memorising it, so including it raises its own margin (for its recorded, wrong label) far
more than a typical example's; ranking by self-influence finds label noise, and the ROC
AUC against the known flips measures how well.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from .._validation import bad_value
from ..trajectory import Trajectory

__all__ = ["mislabel_detection_auc", "self_influence"]


def self_influence(
    attributor: Any, trajectory: Trajectory, *, block_size: int = 256
) -> np.ndarray:
    """Each training example's score on itself: the diagonal of ``transform(trajectory.train)``.

    The training examples are scored as queries ``block_size`` at a time and only the
    diagonal of each block is kept, so memory grows with ``block_size × n_train``, never
    with ``n_train²``.

    Parameters
    ----------
    attributor : BaseAttributor
        Used as is if it is fitted to ``trajectory``; otherwise a clone is fitted (the
        attributor given is never modified).
    trajectory : Trajectory
    block_size : int, default=256
        Training examples scored together.

    Returns
    -------
    ndarray of shape (n_train,)
        ``τ[m, m]`` in sourcekit's convention, with the trajectory's measurement.

    Examples
    --------
    >>> import torch, sourcekit
    >>> from sourcekit.evaluation import self_influence
    >>> g = torch.Generator().manual_seed(0)
    >>> data = sourcekit.Examples(torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=3, batch_size=4)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> self_influence(sourcekit.UnrolledAttributor(), trajectory, block_size=5).shape
    (16,)
    """
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"self_influence needs a Trajectory; got {type(trajectory).__name__}.")
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(
            bad_value("block_size", block_size, "an int >= 1", owner="self_influence")
        )
    if getattr(attributor, "fingerprint_", None) != trajectory.fingerprint:
        attributor = clone(attributor).fit(trajectory)
    n = trajectory.n_train
    diagonal = np.empty(n, dtype=np.float64)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block = np.asarray(attributor.transform(trajectory.train[start:stop]))
        diagonal[start:stop] = block[np.arange(stop - start), np.arange(start, stop)]
    return diagonal


def mislabel_detection_auc(self_influence: Any, flipped: Any) -> float:
    """ROC AUC of self-influence as a detector of flipped labels.

    Parameters
    ----------
    self_influence : array-like of shape (n_train,)
        Detection scores (larger: more suspect), e.g. from
        :func:`~sourcekit.evaluation.self_influence`.
    flipped : array-like of bool, shape (n_train,)
        Which training labels are known to be wrong (``DigitsTask.flipped``).

    Returns
    -------
    float
        0.5 is chance; 1 ranks every flipped label above every clean one.

    Examples
    --------
    >>> from sourcekit.evaluation import mislabel_detection_auc
    >>> mislabel_detection_auc([0.9, 0.1, 0.4, 0.2], [True, False, True, False])
    1.0
    """
    scores = np.asarray(self_influence, dtype=np.float64)
    labels = np.asarray(flipped)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            "The self-influence scores and the flipped labels must be 1-d arrays of the same "
            f"length (one entry per training example); got shapes {scores.shape} and "
            f"{labels.shape}."
        )
    if not np.isfinite(scores).all():
        raise ValueError("The self-influence scores hold NaN or infinite values.")
    if labels.dtype != bool:
        if not (np.issubdtype(labels.dtype, np.integer) and np.isin(labels, (0, 1)).all()):
            raise ValueError(
                f"The 'flipped' labels must be boolean (True: the label is wrong); got dtype "
                f"{labels.dtype}."
            )
        labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError(
            "The AUC needs both flipped and clean examples; 'flipped' is "
            f"{'all True' if labels.all() else 'all False'}. Load data with label noise, e.g. "
            "load_digits_task(label_noise=0.1)."
        )
    return float(roc_auc_score(labels, scores))
