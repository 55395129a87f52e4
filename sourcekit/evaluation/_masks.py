"""Subset masks: which training examples each counterfactual retraining keeps.

A mask matrix has one row per subset and one column per training example; ``True``
keeps the example. The linear datamodeling score draws random subsets of a fixed size
(an α fraction of the training set, METHOD.md section 7); leave-one-out and subset
removal build their own masks.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .._validation import bad_value

__all__ = ["check_masks", "make_subset_masks"]


def _check_int(name: str, value: Any, low: int, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(bad_value(name, value, f"an int >= {low}", owner=owner))
    return int(value)


def make_subset_masks(
    n_train: int,
    alpha: float = 0.5,
    n_subsets: int = 100,
    random_state: int | np.random.Generator | None = 0,
) -> np.ndarray:
    """Draw random training subsets of a fixed size, as boolean masks.

    Each row keeps exactly ``round(alpha * n_train)`` examples (Python's rounding: ties
    to even), drawn uniformly without replacement and independently of the other rows.

    Parameters
    ----------
    n_train : int
        Number of training examples (``trajectory.n_train``).
    alpha : float, default=0.5
        Fraction of the training set each subset keeps, in (0, 1); the paper uses 0.5.
    n_subsets : int, default=100
        Number of subsets (rows); the paper uses 100.
    random_state : int, Generator or None, default=0
        Seed of the draw (None: fresh randomness).

    Returns
    -------
    masks : ndarray of bool, shape (n_subsets, n_train)
        ``masks[j, m]`` is True when subset j keeps training example m.

    Examples
    --------
    >>> from sourcekit.evaluation import make_subset_masks
    >>> masks = make_subset_masks(10, alpha=0.3, n_subsets=4)
    >>> masks.shape, masks.sum(axis=1).tolist()
    ((4, 10), [3, 3, 3, 3])
    """
    owner = "make_subset_masks"
    n_train = _check_int("n_train", n_train, 2, owner)
    n_subsets = _check_int("n_subsets", n_subsets, 1, owner)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < float(alpha) < 1:
        raise ValueError(
            bad_value(
                "alpha",
                alpha,
                "a float in (0, 1)",
                "It is the fraction of the training set each subset keeps; the paper uses 0.5.",
                owner=owner,
            )
        )
    size = round(float(alpha) * n_train)
    if not 1 <= size <= n_train - 1:
        raise ValueError(
            f"alpha={alpha!r} keeps round({alpha!r} * {n_train}) = {size} of the {n_train} "
            "training examples; every subset must keep at least one example and leave out at "
            f"least one. Choose alpha with 1 <= alpha * n_train <= n_train - 1."
        )
    rng = np.random.default_rng(random_state)
    # The `size` smallest of n_train uniform keys are a uniform subset of that size.
    chosen = np.argsort(rng.random((n_subsets, n_train)), axis=1, kind="stable")[:, :size]
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    np.put_along_axis(masks, chosen, True, axis=1)
    return masks


def check_masks(masks: Any, n_train: int | None = None, *, name: str = "masks") -> np.ndarray:
    """Return ``masks`` as a boolean (n_subsets, n_train) array, or raise a clear error.

    Booleans and integer 0/1 arrays are accepted; ``n_train``, when given, is the number
    of columns required.
    """
    array = np.asarray(masks)
    expected = "(n_subsets, n_train)" if n_train is None else f"(n_subsets, {n_train})"
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(
            f"The {name!r} must be a 2-d array of shape {expected}, one row per subset and one "
            f"column per training example; got shape {array.shape}. Draw them with "
            "make_subset_masks(trajectory.n_train)."
        )
    if n_train is not None and array.shape[1] != n_train:
        raise ValueError(
            f"The {name!r} have {array.shape[1]} columns but the trajectory has {n_train} "
            f"training examples; pass masks of shape {expected} (one column per training "
            "example), e.g. make_subset_masks(trajectory.n_train)."
        )
    if array.dtype != bool:
        if not (np.issubdtype(array.dtype, np.integer) and np.isin(array, (0, 1)).all()):
            raise ValueError(
                f"The {name!r} must be boolean (True keeps a training example) or hold only 0 "
                f"and 1; got an array of dtype {array.dtype}."
            )
        array = array.astype(bool)
    return array
