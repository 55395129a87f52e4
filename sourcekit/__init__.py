"""sourcekit: training data attribution for PyTorch.

Given a trained model and the record of how it was trained (a :class:`Trajectory`),
sourcekit scores, for each query prediction, how much each training example pushed it
up or down. Every attributor follows scikit-learn's shape::

    scores = Attributor(...).fit(trajectory).transform(queries)   # (n_queries, n_train)

``scores[q, m]`` is the first-order effect of *including* training example m on the
measurement of query q (positive: m pushed it up), with the 1/N scale included.
"""

from . import datasets, exceptions, objectives
from .base import BaseAttributor, __version__
from .postprocessing import TopKProponents
from .estimators import InfluenceAttributor, SourceAttributor, UnrolledAttributor
from .trajectory import (
    AttributionTask,
    Examples,
    OptimizerSpec,
    TrainingStage,
    Trajectory,
    TrajectoryRecorder,
    train,
)

__all__ = [
    "AttributionTask",
    "BaseAttributor",
    "Examples",
    "InfluenceAttributor",
    "OptimizerSpec",
    "SourceAttributor",
    "TopKProponents",
    "TrainingStage",
    "Trajectory",
    "TrajectoryRecorder",
    "UnrolledAttributor",
    "__version__",
    "datasets",
    "exceptions",
    "objectives",
    "train",
]
