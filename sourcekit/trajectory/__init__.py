"""Recorded training runs: the record every attribution method reads."""

from ._architecture import Architecture
from ._examples import Examples
from ._optimizer import OptimizerSpec, optimizer_step
from ._recorder import TrajectoryRecorder
from ._runs import Runs, RunsTask
from ._segments import Segment
from ._settings import (
    GradientClipping,
    MicroBatches,
    ParameterGroup,
    RandomStates,
    effective_learning_rates,
    weight_decays,
)
from ._stages import Stage
from ._storage import Checkpoint
from ._tokens import token_queries
from ._trainer import TrainingStage, learning_rate_schedule, train
from ._trajectory import AttributionTask, Trajectory

__all__ = [
    "Architecture",
    "AttributionTask",
    "Checkpoint",
    "Examples",
    "GradientClipping",
    "MicroBatches",
    "OptimizerSpec",
    "ParameterGroup",
    "RandomStates",
    "Runs",
    "RunsTask",
    "Segment",
    "Stage",
    "TrainingStage",
    "Trajectory",
    "TrajectoryRecorder",
    "effective_learning_rates",
    "learning_rate_schedule",
    "optimizer_step",
    "token_queries",
    "train",
    "weight_decays",
]
