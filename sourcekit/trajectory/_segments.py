"""Segments: contiguous ranges of steps inside which SOURCE treats training as stationary.

A segment covers the steps ``start .. end-1`` of one stage and owns the checkpoints in
that range. Each checkpoint stands for the steps nearer to it than to its neighbours:
consecutive checkpoints c < c' split the steps between them at ⌈(c + c')/2⌉, so with a
checkpoint at every step, checkpoint k stands for exactly step k. Rules:

- segments never cross a stage boundary (multi-stage runs are cut at every stage);
- by default the attribution checkpoints of each stage are split into equal groups of
  consecutive checkpoints; the ``n_segments`` are shared among stages in proportion to
  their checkpoints (at least one each); the first segment of a stage starts at the
  stage's first step, the last ends with the stage, and neighbouring segments meet
  where their checkpoints' steps meet;
- explicit ``boundaries`` (global steps where a new segment starts) are used as given,
  together with the stage boundaries; every segment must hold a checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..exceptions import TrajectoryError

__all__ = ["Segment", "checkpoint_spans", "split_segments"]


@dataclass(frozen=True)
class Segment:
    """Steps ``start .. end-1`` of stage ``stage``, with the checkpoints inside them.

    Attributes
    ----------
    index : int
        Position of the segment in the run, from 0.
    stage : int
        Index of the stage the segment belongs to (segments never cross stages).
    start, end : int
        The global steps ``start .. end-1`` of the segment.
    checkpoints : tuple of int
        The attribution checkpoints the segment owns; its curvature and mean gradients
        are averaged over them.

    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> data = Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5, n_checkpoints=4)
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> for segment in trajectory.segments(n_segments=2):
    ...     print(segment)
    Segment(index=0, stage=0, start=0, end=4, checkpoints=(1, 3))
    Segment(index=1, stage=0, start=4, end=8, checkpoints=(5, 7))
    """

    index: int
    stage: int
    start: int
    end: int
    checkpoints: tuple[int, ...]

    @property
    def n_steps(self) -> int:
        return self.end - self.start


def _meet(left: int, right: int) -> int:
    """First step of the checkpoint ``right`` when its neighbour on the left is ``left``."""
    return (left + right + 1) // 2


def checkpoint_spans(trajectory) -> dict[int, tuple[int, int]]:  # type: ignore[no-untyped-def]
    """For every attribution checkpoint, the steps ``(start, end)`` it stands for."""
    spans = {}
    for stage in trajectory.stages:
        inside = [c for c in trajectory.checkpoint_steps if stage.start <= c < stage.end]
        for j, c in enumerate(inside):
            start = stage.start if j == 0 else _meet(inside[j - 1], c)
            end = stage.end if j == len(inside) - 1 else _meet(c, inside[j + 1])
            spans[c] = (start, end)
    return spans


def _share(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` into positive integers proportional to ``weights``, each <= its weight."""
    shares = [1] * len(weights)
    remaining = total - len(weights)
    while remaining > 0:
        # give the next segment to the stage with the most checkpoints per segment
        ratios = [w / s if s < w else -1.0 for w, s in zip(weights, shares, strict=True)]
        best = int(np.argmax(ratios))
        shares[best] += 1
        remaining -= 1
    return shares


def split_segments(
    trajectory, n_segments: int | None = None, boundaries: Sequence[int] | None = None
) -> list[Segment]:  # type: ignore[no-untyped-def]
    """The segments of ``trajectory`` (see the module docstring for the rules)."""
    stages = trajectory.stages
    by_stage: list[list[int]] = [[] for _ in stages]
    for step in trajectory.checkpoint_steps:
        for i, stage in enumerate(stages):
            if stage.start <= step < stage.end:
                by_stage[i].append(step)
    empty = [stages[i].name for i, c in enumerate(by_stage) if not c]
    if empty:
        raise TrajectoryError(
            f"Stage(s) {empty} have no attribution checkpoint, so their effect cannot be estimated. "
            "Record checkpoints inside every stage (checkpoint_steps or checkpoint_every)."
        )
    if boundaries is not None:
        cuts = sorted(
            {int(b) for b in boundaries} | {s.start for s in stages} | {trajectory.n_steps}
        )
        if cuts[0] < 0 or cuts[-1] > trajectory.n_steps:
            raise ValueError(
                f"The 'boundaries' must lie in [0, {trajectory.n_steps}]; got {list(boundaries)}."
            )
        segments: list[Segment] = []
        for start, end in itertools.pairwise(cuts):
            if start == end:
                continue
            stage = next(i for i, s in enumerate(stages) if s.start <= start < s.end)
            inside = tuple(c for c in trajectory.checkpoint_steps if start <= c < end)
            if not inside:
                raise ValueError(
                    f"The segment of steps {start}..{end - 1} (from 'boundaries') holds no checkpoint; "
                    f"checkpoints are at steps {list(trajectory.checkpoint_steps)}. Move the boundaries "
                    "or record more checkpoints."
                )
            segments.append(Segment(len(segments), stage, start, end, inside))
        return segments
    n_checkpoints = len(trajectory.checkpoint_steps)
    if n_segments is None:
        n_segments = len(stages)
    if n_segments < len(stages):
        raise ValueError(
            f"The 'n_segments' parameter is {n_segments}, but the run has {len(stages)} stages and "
            f"segments never cross a stage boundary. Use n_segments >= {len(stages)}."
        )
    if n_segments > n_checkpoints:
        raise ValueError(
            f"The 'n_segments' parameter is {n_segments}, but the trajectory has only {n_checkpoints} "
            f"attribution checkpoints (steps {list(trajectory.checkpoint_steps)}) and every segment "
            f"needs one. Use n_segments <= {n_checkpoints} or record more checkpoints."
        )
    shares = _share(n_segments, [len(c) for c in by_stage])
    segments = []
    for i, (stage, checkpoints, k) in enumerate(zip(stages, by_stage, shares, strict=True)):
        groups = [list(g) for g in np.array_split(np.asarray(checkpoints), k)]
        for j, group in enumerate(groups):
            start = stage.start if j == 0 else _meet(int(groups[j - 1][-1]), int(group[0]))
            end = (
                stage.end if j == len(groups) - 1 else _meet(int(group[-1]), int(groups[j + 1][0]))
            )
            segments.append(Segment(len(segments), i, start, end, tuple(int(c) for c in group)))
    return segments
