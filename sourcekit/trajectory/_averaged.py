"""Averaged checkpoints: the weights of SOURCE's fast variant.

SOURCE treats curvature and training gradients as stationary inside a segment and
averages them over the segment's checkpoints. Its fast variant (Bae et al., 2024)
instead averages the checkpoints' parameters and evaluates curvature and gradients once,
at the averaged weights, so that the passes over the training data grow with the number
of segments instead of the number of checkpoints.

:func:`averaged_states` forms those weights; :class:`AveragedTrajectory` is the
trajectory as the passes see it, with each averaged state standing at the step of its
segment's first checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from ._architecture import load_state
from ._segments import Segment
from ._trajectory import Trajectory

__all__ = ["AveragedTrajectory", "averaged_states", "with_states"]


def averaged_states(
    trajectory: Trajectory, segments: Sequence[Segment]
) -> dict[int, dict[str, torch.Tensor]]:
    """For each segment with more than one checkpoint, the mean of its checkpoints' states,
    keyed by the segment's first checkpoint.

    Parameters and floating buffers (a batch norm's running statistics) are averaged in
    float64 and stored in their own dtype; other buffers (counters) are taken from the
    segment's last checkpoint. A segment with one checkpoint keeps it unchanged and is
    left out.
    """
    states = {}
    for segment in segments:
        if len(segment.checkpoints) < 2:
            continue
        checkpoints = [trajectory.checkpoint(step) for step in segment.checkpoints]
        merged = {**checkpoints[-1].params, **checkpoints[-1].buffers}
        state = {}
        for name, last in merged.items():
            if not last.is_floating_point():
                state[name] = last.clone()
                continue
            values = torch.stack([{**c.params, **c.buffers}[name].double() for c in checkpoints])
            state[name] = values.mean(dim=0).to(last.dtype)
        states[segment.checkpoints[0]] = state
    return states


class AveragedTrajectory:
    """``trajectory`` with the model at some steps replaced by averaged states.

    Only :meth:`build_model` differs; every other attribute is the trajectory's own, so
    the passes over the data (which build their models through it) see the averaged
    weights at those steps and the recorded ones everywhere else.
    """

    def __init__(self, trajectory: Trajectory, states: dict[int, dict[str, torch.Tensor]]) -> None:
        self.trajectory = trajectory
        self.states = states

    def build_model(self, step: int | None = None) -> nn.Module:
        if step is None or step not in self.states:
            return self.trajectory.build_model(step)
        state = self.states[step]
        params = {n: state[n] for n in self.trajectory.parameter_names}
        buffers = {n: t for n, t in state.items() if n not in params}
        return load_state(self.trajectory.architecture.build(), params, buffers)

    def __getattr__(self, name: str) -> Any:
        if name in ("trajectory", "states"):  # not yet set (a copy being made)
            raise AttributeError(name)
        return getattr(self.trajectory, name)


def with_states(trajectory: Trajectory, states: dict[int, dict[str, torch.Tensor]]) -> Trajectory:
    """``trajectory`` as the passes see it: with ``states`` at their steps, or itself when
    there are none.

    Typed as a ``Trajectory``: an :class:`AveragedTrajectory` answers every attribute a
    trajectory has (its own ``build_model``, the trajectory's for the rest), which is all
    the passes ask of it.
    """
    return cast(Trajectory, AveragedTrajectory(trajectory, states)) if states else trajectory
