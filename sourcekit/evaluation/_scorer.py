"""``LDSScorer``: the linear datamodeling score as a scikit-learn scorer.

scikit-learn's model selection splits the samples axis, which for attribution is the
queries: ``X = trajectory.bind(queries)`` and ``y`` the matching rows of retrained
outputs. The masks are the same for every fold, so they live in the scorer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._lds import linear_datamodeling_score
from ._masks import check_masks

__all__ = ["LDSScorer"]


class LDSScorer:
    """A ``scoring=`` callable: mean LDS of an attributor on a fold of queries.

    ``scorer(estimator, X, y)`` returns
    ``linear_datamodeling_score(estimator.transform(X), masks, y).mean``.

    Parameters
    ----------
    masks : array-like of bool, shape (n_subsets, n_train)
        The subsets the outputs ``y`` were retrained on.

    Notes
    -----
    ``X`` is a bound :class:`~sourcekit.AttributionTask` (or queries) and ``y`` the
    (n_queries, n_subsets) retrained outputs, sliced together by scikit-learn. Queries
    with an undefined correlation are left out of the mean (see
    :func:`~sourcekit.evaluation.linear_datamodeling_score`); a fold where none is
    defined scores NaN.

    Examples
    --------
    >>> import torch, sourcekit
    >>> from sklearn.model_selection import GridSearchCV
    >>> from sourcekit.evaluation import LDSScorer, make_subset_masks, retrain_measurements
    >>> g = torch.Generator().manual_seed(0)
    >>> data = sourcekit.Examples(torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=3, batch_size=4, n_checkpoints=3)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> queries = sourcekit.Examples(torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g))
    >>> masks = make_subset_masks(trajectory.n_train, n_subsets=10)
    >>> y = retrain_measurements(trajectory, queries, masks, seeds=0, progress=False).outputs
    >>> search = GridSearchCV(sourcekit.SourceAttributor(curvature="exact"),
    ...                       {"damping": [1e-3, 1.0]}, scoring=LDSScorer(masks), cv=2)
    >>> search.fit(trajectory.bind(queries), y).best_params_["damping"] in (1e-3, 1.0)
    True
    """

    def __init__(self, masks: Any) -> None:
        self.masks = check_masks(masks)

    def __call__(self, estimator: Any, X: Any, y: Any) -> float:
        if y is None:
            raise ValueError(
                "LDSScorer needs y, the retrained outputs of shape (n_queries, n_subsets): pass "
                "them with X, e.g. search.fit(trajectory.bind(queries), result.outputs)."
            )
        scores = estimator.transform(X)
        return float(
            linear_datamodeling_score(scores, self.masks, np.asarray(y), n_bootstrap=0).mean
        )

    def __repr__(self) -> str:
        n_subsets, n_train = self.masks.shape
        return f"LDSScorer(n_subsets={n_subsets}, n_train={n_train})"
