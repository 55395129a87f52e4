"""The linear datamodeling score (LDS, METHOD.md section 7).

Scores predict that a training subset S contributes Σ_{m∈S} τ[q, m] to the measurement
of query q. For M random subsets S_1..S_M with retrained measurements f(z_q, θ_{S_j}),
the LDS of query q is the Spearman rank correlation across j between the predicted
group effects and the retrained measurements; the reported figure is its mean over
queries, with a bootstrap confidence interval over queries.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from .._validation import bad_value
from ._masks import check_masks

__all__ = ["LDSResult", "linear_datamodeling_score", "spearman_rows"]

_BOOTSTRAP_CHUNK = 256


@dataclass(frozen=True, eq=False)
class LDSResult:
    """The linear datamodeling score of an attributor on a set of queries.

    Attributes
    ----------
    per_query : ndarray of shape (n_queries,)
        Spearman correlation of each query; NaN where it is undefined (constant predicted
        group effects or constant retrained outputs across the subsets).
    mean : float
        Mean of ``per_query`` over the queries where it is defined (NaN if none is).
    confidence_interval : tuple of float or None
        Bootstrap percentile interval of ``mean`` (queries resampled with replacement);
        None when ``n_bootstrap=0``.
    confidence : float
        Level of ``confidence_interval``.
    n_undefined : int
        Queries left out of ``mean`` because their correlation is undefined.
    n_queries : int
        Number of queries, defined or not.

    Examples
    --------
    >>> import numpy as np
    >>> from sourcekit.evaluation import linear_datamodeling_score, make_subset_masks
    >>> rng = np.random.default_rng(0)
    >>> scores = rng.normal(size=(3, 20))
    >>> masks = make_subset_masks(20, n_subsets=30)
    >>> outputs = scores @ masks.T + 0.1 * rng.normal(size=(3, 30))
    >>> outputs[2] = 1.0  # constant retrained outputs: no rank correlation for query 2
    >>> result = linear_datamodeling_score(scores, masks, outputs)
    >>> result.per_query.shape, result.n_queries, result.n_undefined
    ((3,), 3, 1)
    >>> bool(float(result) == result.mean > 0.9), result.confidence
    (True, 0.95)
    """

    per_query: np.ndarray
    mean: float
    confidence_interval: tuple[float, float] | None
    confidence: float
    n_undefined: int

    @property
    def n_queries(self) -> int:
        return int(self.per_query.shape[0])

    def __float__(self) -> float:
        return float(self.mean)

    def __repr__(self) -> str:
        interval = ""
        if self.confidence_interval is not None:
            low, high = self.confidence_interval
            interval = f", {self.confidence:.0%} CI [{low:.3f}, {high:.3f}]"
        return (
            f"LDSResult(mean={self.mean:.3f}{interval}, n_queries={self.n_queries}, "
            f"n_undefined={self.n_undefined})"
        )


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b``.

    Ties get average ranks; a row whose ranks are constant in ``a`` or ``b`` gives NaN.

    Examples
    --------
    >>> import numpy as np
    >>> spearman_rows(np.array([[1.0, 2, 3], [1, 1, 1]]), np.array([[3.0, 5, 9], [1, 2, 3]]))
    array([ 1., nan])
    """
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    out = np.full(a.shape[0], np.nan)
    defined = norm > 0
    out[defined] = np.clip((ra * rb).sum(axis=1)[defined] / norm[defined], -1.0, 1.0)
    return out


def _as_finite_2d(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"The {name!r} must be a 2-d array; got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"The {name!r} hold NaN or infinite values; the LDS needs finite {name}.")
    return array


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < 1:
        raise ValueError(bad_value(name, value, "a float in (0, 1)", owner="the LDS"))
    return float(value)


def _bootstrap_interval(
    values: np.ndarray, n_bootstrap: int, confidence: float, random_state: Any
) -> tuple[float, float]:
    if values.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(random_state)
    means = np.empty(n_bootstrap)
    for start in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
        stop = min(start + _BOOTSTRAP_CHUNK, n_bootstrap)
        draws = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[draws].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return (float(low), float(high))


def linear_datamodeling_score(
    scores: Any,
    masks: Any,
    outputs: Any,
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    random_state: int | np.random.Generator | None = 0,
) -> LDSResult:
    """The linear datamodeling score of attribution scores against retrained outputs.

    For query q, the predicted group effect of subset j is ``masks[j] @ scores[q]`` and
    the LDS is the Spearman correlation, across the subsets, between the predicted group
    effects and ``outputs[q]``.

    Parameters
    ----------
    scores : array-like of shape (n_queries, n_train)
        Attribution scores (``attributor.transform(queries)``).
    masks : array-like of bool, shape (n_subsets, n_train)
        The subsets the outputs were retrained on.
    outputs : array-like of shape (n_queries, n_subsets)
        Retrained measurements (``retrain_measurements(...).outputs``).
    n_bootstrap : int, default=1000
        Bootstrap resamples of the queries for the confidence interval (0: none).
    confidence : float, default=0.95
        Level of the interval.
    random_state : int, Generator or None, default=0
        Seed of the bootstrap.

    Returns
    -------
    LDSResult
        Per-query correlations, their mean and its confidence interval.

    Notes
    -----
    A query whose predicted group effects are constant across the subsets (e.g. all its
    scores are zero) or whose retrained outputs are constant has no rank correlation:
    its ``per_query`` entry is NaN, it is left out of ``mean`` and of the bootstrap, and
    ``n_undefined`` counts it. If no query is defined, ``mean`` is NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from sourcekit.evaluation import linear_datamodeling_score, make_subset_masks
    >>> rng = np.random.default_rng(0)
    >>> scores = rng.normal(size=(3, 20))
    >>> masks = make_subset_masks(20, n_subsets=30)
    >>> outputs = scores @ masks.T + 0.1 * rng.normal(size=(3, 30))
    >>> result = linear_datamodeling_score(scores, masks, outputs)
    >>> bool(result.mean > 0.9), result.n_undefined
    (True, 0)
    """
    masks = check_masks(masks)
    n_subsets, n_train = masks.shape
    if n_subsets < 2:
        raise ValueError(
            f"The LDS correlates across subsets, so it needs at least 2 subsets; the masks have "
            f"{n_subsets} row. Draw more with make_subset_masks(n_train, n_subsets=...)."
        )
    scores = _as_finite_2d(scores, "scores")
    if scores.shape[1] != n_train:
        hint = ""
        if scores.shape[0] == n_train:
            hint = (
                " Scores of shape (n_train, n_queries), as some libraries return them, must be "
                "transposed."
            )
        raise ValueError(
            f"The 'scores' must have shape (n_queries, {n_train}), one column per training "
            f"example of the masks; got {scores.shape}.{hint}"
        )
    outputs = _as_finite_2d(outputs, "outputs")
    if outputs.shape != (scores.shape[0], n_subsets):
        raise ValueError(
            f"The 'outputs' must have shape (n_queries, n_subsets) = ({scores.shape[0]}, "
            f"{n_subsets}): one row per query of the scores and one column per subset of the "
            f"masks; got {outputs.shape}."
        )
    if (
        isinstance(n_bootstrap, bool)
        or not isinstance(n_bootstrap, numbers.Integral)
        or n_bootstrap < 0
    ):
        raise ValueError(
            bad_value("n_bootstrap", n_bootstrap, "an int >= 0 (0: no interval)", owner="the LDS")
        )
    confidence = _check_fraction("confidence", confidence)
    predicted = scores @ masks.T.astype(np.float64)
    per_query = spearman_rows(predicted, outputs)
    defined = per_query[~np.isnan(per_query)]
    mean = float(defined.mean()) if defined.size else math.nan
    interval = (
        None
        if n_bootstrap == 0
        else _bootstrap_interval(defined, int(n_bootstrap), confidence, random_state)
    )
    return LDSResult(
        per_query=per_query,
        mean=mean,
        confidence_interval=interval,
        confidence=confidence,
        n_undefined=int(per_query.size - defined.size),
    )
