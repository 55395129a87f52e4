"""Post-processing score matrices: the strongest proponents and opponents per query.

``TopKProponents`` is a scikit-learn transformer, so it follows an attributor in a
``Pipeline``::

    Pipeline([("attr", SourceAttributor()), ("top", TopKProponents(k=5))])

and the pipeline stays searchable over ``attr__damping``.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ._validation import Interval, Options, validate_parameters

__all__ = ["TopK", "TopKProponents"]


class TopK(NamedTuple):
    """Indices (into the training set) and scores, each of shape (n_queries, k).

    What :meth:`TopKProponents.select` returns (2k columns with ``kind="both"``).

    Attributes
    ----------
    indices : ndarray of int
        The selected training examples of each query.
    scores : ndarray
        Their scores (normalised if ``normalize`` was set).

    Examples
    --------
    >>> import numpy as np
    >>> from sourcekit import TopKProponents
    >>> scores = np.array([[0.3, -0.2, 0.1, -0.5], [0.0, 0.4, -0.1, 0.2]])
    >>> top = TopKProponents(k=1).fit(scores).select(scores)
    >>> top.indices  # per query: the strongest proponent, then the strongest opponent
    array([[0, 3],
           [1, 2]])
    >>> top.scores
    array([[ 0.3, -0.5],
           [ 0.4, -0.1]])
    """

    indices: np.ndarray
    scores: np.ndarray


def _normalise(scores: np.ndarray, norm: str | None) -> np.ndarray:
    if norm is None:
        return scores
    if norm == "l1":
        scale = np.abs(scores).sum(axis=1, keepdims=True)
    elif norm == "l2":
        scale = np.sqrt((scores * scores).sum(axis=1, keepdims=True))
    else:  # "max"
        scale = np.abs(scores).max(axis=1, keepdims=True)
    return scores / np.where(scale > 0, scale, 1.0)


class TopKProponents(TransformerMixin, BaseEstimator):
    """Keep, for every query, its k strongest proponents and/or opponents.

    Parameters
    ----------
    k : int, default=10
        How many training examples to keep per query and kind.
    kind : {"proponents", "opponents", "both"}, default="both"
        Proponents have the largest (most positive) scores, opponents the smallest. With
        "both", the k proponents come first, then the k opponents.
    output : {"indices", "scores"}, default="indices"
        What ``transform`` returns: the training-example indices, or their scores.
        :meth:`select` returns both.
    normalize : {None, "l1", "l2", "max"}, default=None
        Divide each query's scores by their norm first (affects returned scores only;
        the ranking is unchanged).

    Attributes
    ----------
    n_features_in_ : int
        Number of training examples (columns) seen in ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> from sourcekit import TopKProponents
    >>> scores = np.array([[0.3, -0.2, 0.1, -0.5]])
    >>> TopKProponents(k=1).fit(scores).transform(scores)
    array([[0, 3]])
    >>> TopKProponents(k=2, kind="proponents", output="scores").fit_transform(scores)
    array([[0.3, 0.1]])
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "k": [Interval(int, 1, None)],
        "kind": [Options("proponents", "opponents", "both")],
        "output": [Options("indices", "scores")],
        "normalize": [None, Options("l1", "l2", "max")],
    }

    def __init__(
        self,
        k: int = 10,
        *,
        kind: str = "both",
        output: str = "indices",
        normalize: str | None = None,
    ) -> None:
        self.k = k
        self.kind = kind
        self.output = output
        self.normalize = normalize

    def fit(self, X: Any, y: Any = None) -> TopKProponents:
        """Check the parameters and remember the number of training examples."""
        validate_parameters(self, self._parameter_constraints)
        scores = self._as_scores(X)
        if self.k > scores.shape[1]:
            raise ValueError(
                f"The 'k' parameter of TopKProponents is {self.k}, but the scores have only "
                f"{scores.shape[1]} training examples. Use k <= {scores.shape[1]}."
            )
        self.n_features_in_ = scores.shape[1]
        return self

    def select(self, X: Any) -> TopK:
        """The selected training examples and their scores, each (n_queries, k or 2k)."""
        check_is_fitted(self)
        scores = self._as_scores(X)
        if scores.shape[1] != self.n_features_in_:
            raise ValueError(
                f"The scores have {scores.shape[1]} training examples, but TopKProponents was "
                f"fitted with {self.n_features_in_}. Fit it again on scores of this trajectory."
            )
        order = np.argsort(-scores, axis=1, kind="stable")
        parts = []
        if self.kind in ("proponents", "both"):
            parts.append(order[:, : self.k])
        if self.kind in ("opponents", "both"):
            parts.append(order[:, ::-1][:, : self.k])
        indices = np.concatenate(parts, axis=1)
        values = np.take_along_axis(_normalise(scores, self.normalize), indices, axis=1)
        return TopK(indices, values)

    def transform(self, X: Any) -> np.ndarray:
        """Indices or scores of the selected examples, shape (n_queries, k or 2k)."""
        selected = self.select(X)
        return selected.indices if self.output == "indices" else selected.scores

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        check_is_fitted(self)
        names = []
        if self.kind in ("proponents", "both"):
            names += [f"proponent{i}" for i in range(self.k)]
        if self.kind in ("opponents", "both"):
            names += [f"opponent{i}" for i in range(self.k)]
        return np.asarray(names, dtype=object)

    @staticmethod
    def _as_scores(X: Any) -> np.ndarray:
        scores = np.asarray(X, dtype=np.float64)
        if scores.ndim != 2:
            raise ValueError(
                "TopKProponents needs a score matrix of shape (n_queries, n_train); got an "
                f"array of shape {scores.shape}. Pass the output of an attributor's transform."
            )
        return scores
