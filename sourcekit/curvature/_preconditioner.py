"""Adam's diagonal preconditioner over a segment (METHOD.md section 4, Adam).

Under Adam and AdamW, a segment's updates are preconditioned by P = 1/(√v̂ + ε), v̂ the
bias-corrected second moment. SOURCE takes P̄, its mean over the segment's checkpoints,
from the recorded optimiser states, per block in the blocks' (d_out, d_in) layout. Each
parameter takes the β₂ and ε of its own parameter group; a parameter its stage does
not train has no moments and takes no step, and gets P = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..exceptions import TrajectoryError
from ..gradients._layers import LayerBlock
from ..trajectory import Segment, Trajectory
from ..trajectory._settings import stage_groups

__all__ = ["adam_preconditioner"]


def adam_preconditioner(
    trajectory: Trajectory, segment: Segment, blocks: Sequence[LayerBlock]
) -> dict[str, torch.Tensor]:
    """P̄ = mean over the segment's checkpoints of 1/(√v̂ + ε), v̂ the bias-corrected second moment.

    A checkpoint at a stage's first step holds the previous stage's optimiser state (or
    none), so only checkpoints after the stage's first update count.
    """
    stage = trajectory.stages[segment.stage]
    total: dict[str, torch.Tensor] = {}
    used = 0
    for step in segment.checkpoints:
        if step <= stage.start:
            continue
        state = trajectory.checkpoint(step).optimizer
        if "exp_avg_sq" not in state or "step" not in state:
            continue
        # Each parameter's own group: its β₂ at the last update before the checkpoint, its ε.
        settings = {}
        for group in stage_groups(trajectory, stage):
            spec, _ = group.at(step - 1 - stage.start)
            settings.update({name: (spec.betas[1], spec.eps) for name in group.parameters})
        moments = state["exp_avg_sq"]
        shapes = trajectory._param_shapes
        # Parameters the stage does not train have no moments; they take no step (their
        # rate is 0), so any positive preconditioner does: 1.
        root = {
            n: (moments[n].double() / (1 - settings[n][0] ** state["step"])).sqrt()
            + settings[n][1]
            if n in moments and n in settings
            else torch.ones(shapes[n], dtype=torch.float64)
            for b in blocks
            for n in (b.weight, b.bias)
            if n is not None
        }
        for block in blocks:
            p = 1.0 / block.matrix(root)
            total[block.name] = total.get(block.name, 0) + p
        used += 1
    if used == 0:
        raise TrajectoryError(
            f"Segment {segment.index} (steps {segment.start}..{segment.end - 1}) trains with "
            f"{stage.optimizer.kind}, but none of its checkpoints {list(segment.checkpoints)} holds "
            "second moments from this stage. SOURCE needs a checkpoint after the stage's first step: "
            "record checkpoints with TrajectoryRecorder or sourcekit.train."
        )
    return {k: v / used for k, v in total.items()}
