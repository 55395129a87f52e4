"""Counterfactual evaluation: retraining ground truth, the LDS, subset removal, label noise.

- :func:`make_subset_masks` draws random training subsets;
- :func:`retrain_measurements` retrains the run's own recipe on each subset (several
  seeds, in parallel, cached on disk) and measures the queries;
  :func:`leave_one_out_measurements` does the same leaving out single examples;
- :func:`linear_datamodeling_score` and :class:`LDSScorer` (for scikit-learn's
  ``scoring=``) compare scores with the retrained outputs;
- :func:`subset_removal` retrains without each query's top proponents;
- :func:`self_influence` and :func:`mislabel_detection_auc` detect flipped labels.
"""

from ._lds import LDSResult, linear_datamodeling_score
from ._leave_one_out import LeaveOneOutResult, leave_one_out_measurements
from ._masks import make_subset_masks
from ._mislabel import mislabel_detection_auc, self_influence
from ._recipe import retrain_model, stages_from_recipe
from ._removal import SubsetRemovalResult, subset_removal
from ._retrain import RetrainingResult, retrain_measurements
from ._scorer import LDSScorer

__all__ = [
    "LDSResult",
    "LDSScorer",
    "LeaveOneOutResult",
    "RetrainingResult",
    "SubsetRemovalResult",
    "leave_one_out_measurements",
    "linear_datamodeling_score",
    "make_subset_masks",
    "mislabel_detection_auc",
    "retrain_measurements",
    "retrain_model",
    "self_influence",
    "stages_from_recipe",
    "subset_removal",
]
