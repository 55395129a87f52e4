"""The built-in losses and measurements: class targets outside the outputs are refused."""

from __future__ import annotations

import pytest
import torch

from sourcekit.objectives import IGNORE_INDEX, cross_entropy, margin


@pytest.mark.parametrize("objective", [cross_entropy, margin])
def test_class_targets_outside_the_outputs_are_refused(objective) -> None:  # type: ignore[no-untyped-def]
    logits = torch.zeros(4, 3)
    for bad in (3, -1):
        with pytest.raises(
            ValueError,
            match=rf"class target is {bad}, outside \[0, 3\) for outputs with 3 classes \(example 2\)",
        ):
            objective(logits, torch.tensor([0, 2, bad, 1]))
    # sequences: the ignore index is not a class, but it is allowed
    sequence = torch.zeros(2, 4, 3)
    targets = torch.tensor([[0, 1, IGNORE_INDEX, 2], [2, IGNORE_INDEX, 1, 0]])
    assert objective(sequence, targets).shape == (2,)
    with pytest.raises(ValueError, match=r"class target is 5, .*\(example 0, position 1\)"):
        objective(sequence, targets.masked_fill(targets == 1, 5))
