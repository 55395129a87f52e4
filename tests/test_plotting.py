"""``plotting.proponents_figure`` takes images in the forms PyTorch and scikit-learn use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from sourcekit.plotting import _as_images, proponents_figure

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("shape", "shown"),
    [
        ((6, 8, 8), (6, 8, 8)),  # grey images
        ((6, 1, 8, 8), (6, 8, 8)),  # PyTorch's channels-first grey images
        ((6, 3, 8, 8), (6, 8, 8, 3)),  # channels-first colour
        ((6, 8, 8, 3), (6, 8, 8, 3)),  # channels-last colour
        ((6, 64), (6, 8, 8)),  # flat rows of a square of pixels (scikit-learn's digits)
    ],
)
def test_images_in_every_common_form_are_drawn(shape: tuple, shown: tuple, tmp_path: Path) -> None:
    images = torch.from_numpy(RNG.random(shape))
    assert _as_images(images, "train_images").shape == shown
    path = proponents_figure(images[:2], images, RNG.normal(size=(2, 6)), tmp_path / "f.png", k=2)
    assert path.stat().st_size > 0


def test_images_of_another_shape_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"flat rows of 10 values, which is not a square number"):
        _as_images(np.zeros((3, 10)), "query_images")
    with pytest.raises(ValueError, match=r"have shape \(3, 5, 8, 8\); pass images of shape"):
        _as_images(np.zeros((3, 5, 8, 8)), "query_images")


def test_fewer_images_than_scores_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"scores have shape \(2, 9\), but there are 2 query images and 6"
    ):
        proponents_figure(
            RNG.random((2, 8, 8)), RNG.random((6, 8, 8)), np.zeros((2, 9)), tmp_path / "f.png"
        )
