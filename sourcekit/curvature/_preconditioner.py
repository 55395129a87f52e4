"""Adam's diagonal preconditioner over a segment (METHOD.md section 4, Adam).

Under Adam and AdamW, a segment's updates are preconditioned by P = 1/(√v̂ + ε), v̂ the
bias-corrected second moment. SOURCE takes P̄, its mean over the segment's checkpoints,
from the recorded optimiser states, per block in the blocks' (d_out, d_in) layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..exceptions import TrajectoryError
from ..gradients._layers import LayerBlock
from ..trajectory import Segment, Trajectory

__all__ = ["adam_preconditioner"]


def adam_preconditioner(
    trajectory: Trajectory, segment: Segment, blocks: Sequence[LayerBlock]
) -> dict[str, torch.Tensor]:
    """P̄ = mean over the segment's checkpoints of 1/(√v̂ + ε), v̂ the bias-corrected second moment.

    A checkpoint at a stage's first step holds the previous stage's optimiser state (or
    none), so only checkpoints after the stage's first update count.
    """
    stage = trajectory.stages[segment.stage]
    beta2, eps = stage.optimizer.betas[1], stage.optimizer.eps
    total: dict[str, torch.Tensor] = {}
    used = 0
    for step in segment.checkpoints:
        if step <= stage.start:
            continue
        state = trajectory.checkpoint(step).optimizer
        if "exp_avg_sq" not in state or "step" not in state:
            continue
        v_hat = {
            k: v.double() / (1 - beta2 ** state["step"]) for k, v in state["exp_avg_sq"].items()
        }
        for block in blocks:
            p = 1.0 / (block.matrix(v_hat).sqrt() + eps)
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
