"""Self-influence and mislabel detection."""

from __future__ import annotations

import numpy as np
import pytest

import sourcekit
from sourcekit.evaluation import mislabel_detection_auc, self_influence

from .. import _cases


@pytest.mark.parametrize("block_size", [1, 5, 256])
def test_self_influence_is_the_diagonal_whatever_the_blocks(block_size: int) -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    attributor = sourcekit.UnrolledAttributor().fit(trajectory)
    full = attributor.transform(trajectory.train)
    np.testing.assert_allclose(
        self_influence(attributor, trajectory, block_size=block_size),
        np.diag(full),
        rtol=1e-6,
        atol=1e-9,
    )


def test_the_attributor_given_is_not_modified() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    unfitted = sourcekit.SourceAttributor(curvature="exact")
    values = self_influence(unfitted, trajectory)
    assert not hasattr(unfitted, "state_")
    other = sourcekit.SourceAttributor(curvature="exact").fit(_cases.trajectory("mlp_momentum"))
    np.testing.assert_array_equal(self_influence(other, trajectory), values)
    assert other.fingerprint_ == _cases.trajectory("mlp_momentum").fingerprint


def test_self_influence_finds_flipped_digits_labels() -> None:
    task = sourcekit.datasets.load_digits_task(label_noise=0.1)
    trajectory = task.record("early", progress=False)
    values = self_influence(sourcekit.InfluenceAttributor(), trajectory)
    assert values.shape == (1437,)
    assert mislabel_detection_auc(values, task.flipped) > 0.85


def test_the_auc_ranks_flipped_labels_first() -> None:
    flipped = np.array([True, False, True, False, False])
    assert mislabel_detection_auc([5.0, 1.0, 4.0, 2.0, 3.0], flipped) == 1.0
    assert mislabel_detection_auc([-5.0, -1.0, -4.0, -2.0, -3.0], flipped) == 0.0
    assert mislabel_detection_auc([1.0, 1.0, 1.0, 1.0, 1.0], flipped.astype(int)) == 0.5


@pytest.mark.parametrize(
    ("scores", "flipped", "match"),
    [
        ([1.0, 2.0], [True, False, True], "same length"),
        ([[1.0, 2.0]], [[True, False]], "1-d arrays"),
        ([1.0, np.nan], [True, False], "NaN"),
        ([1.0, 2.0], [False, False], "both flipped and clean.*all False"),
        ([1.0, 2.0], [0.5, 1.0], "must be boolean"),
    ],
)
def test_bad_detection_inputs_are_reported(scores: list, flipped: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mislabel_detection_auc(scores, flipped)


def test_bad_block_size_is_reported() -> None:
    with pytest.raises(
        ValueError, match="'block_size' parameter of self_influence must be an int >= 1"
    ):
        self_influence(sourcekit.UnrolledAttributor(), _cases.trajectory("mlp_sgd"), block_size=0)
