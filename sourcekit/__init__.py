"""sourcekit: training data attribution for PyTorch.

Given a trained model and the record of how it was trained (a :class:`Trajectory`),
sourcekit scores, for each query prediction, how much each training example pushed it
up or down. Every attributor follows scikit-learn's shape::

    scores = Attributor(...).fit(trajectory).transform(queries)   # (n_queries, n_train)

``scores[q, m]`` is the first-order effect of *including* training example m on the
measurement of query q (positive: m pushed it up), with the 1/N scale included.
"""

from . import datasets, evaluation, exceptions, objectives
from .base import BaseAttributor, __version__
from .estimators import (
    EnsembleAttributor,
    GradientSimilarityAttributor,
    InfluenceAttributor,
    RepresentationSimilarityAttributor,
    SourceAttributor,
    TracInAttributor,
    TRAKAttributor,
    UnrolledAttributor,
)
from .evaluation import LDSScorer
from .postprocessing import TopKProponents
from .trajectory import (
    AttributionTask,
    Examples,
    OptimizerSpec,
    Runs,
    TrainingStage,
    Trajectory,
    TrajectoryRecorder,
    train,
)

__all__ = [
    "AttributionTask",
    "BaseAttributor",
    "EnsembleAttributor",
    "Examples",
    "GradientSimilarityAttributor",
    "InfluenceAttributor",
    "LDSScorer",
    "OptimizerSpec",
    "RepresentationSimilarityAttributor",
    "Runs",
    "SourceAttributor",
    "TRAKAttributor",
    "TopKProponents",
    "TracInAttributor",
    "TrainingStage",
    "Trajectory",
    "TrajectoryRecorder",
    "UnrolledAttributor",
    "__version__",
    "datasets",
    "evaluation",
    "exceptions",
    "objectives",
    "train",
]
