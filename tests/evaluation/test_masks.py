"""Random subset masks and their validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sourcekit.evaluation import make_subset_masks
from sourcekit.evaluation._masks import check_masks


@given(
    n_train=st.integers(2, 60),
    alpha=st.floats(0.05, 0.95),
    n_subsets=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_every_row_keeps_exactly_round_alpha_n(
    n_train: int, alpha: float, n_subsets: int, seed: int
) -> None:
    size = round(alpha * n_train)
    if not 1 <= size <= n_train - 1:
        with pytest.raises(ValueError, match="keeps round"):
            make_subset_masks(n_train, alpha, n_subsets, random_state=seed)
        return
    masks = make_subset_masks(n_train, alpha, n_subsets, random_state=seed)
    assert masks.dtype == bool
    assert masks.shape == (n_subsets, n_train)
    np.testing.assert_array_equal(masks.sum(axis=1), size)


def test_masks_are_seeded_and_rows_differ() -> None:
    a = make_subset_masks(50, n_subsets=20, random_state=3)
    np.testing.assert_array_equal(a, make_subset_masks(50, n_subsets=20, random_state=3))
    assert not np.array_equal(a, make_subset_masks(50, n_subsets=20, random_state=4))
    assert len({row.tobytes() for row in a}) == 20


def test_every_example_is_kept_about_alpha_of_the_time() -> None:
    masks = make_subset_masks(20, alpha=0.25, n_subsets=4000, random_state=0)
    np.testing.assert_allclose(masks.mean(axis=0), 0.25, atol=0.03)


@pytest.mark.parametrize("alpha", [0, 1, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_alpha_outside_the_open_unit_interval_is_refused(alpha: object) -> None:
    with pytest.raises(
        ValueError, match=r"'alpha' parameter of make_subset_masks must be a float in \(0, 1\)"
    ):
        make_subset_masks(10, alpha)  # type: ignore[arg-type]


def test_alpha_that_keeps_no_example_is_refused() -> None:
    with pytest.raises(ValueError, match=r"keeps round\(0.01 \* 10\) = 0 of the 10"):
        make_subset_masks(10, alpha=0.01)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_subsets": 0}, "n_subsets"),
        ({"n_subsets": 2.0}, "n_subsets"),
        ({"n_train": 1}, "n_train"),
        ({"n_train": True}, "n_train"),
    ],
)
def test_bad_counts_are_refused(kwargs: dict, name: str) -> None:
    arguments = {"n_train": 10, **kwargs}
    with pytest.raises(
        ValueError, match=f"'{name}' parameter of make_subset_masks must be an int"
    ):
        make_subset_masks(**arguments)


def test_check_masks_accepts_zero_one_integers_and_names_bad_shapes() -> None:
    np.testing.assert_array_equal(check_masks([[1, 0, 1]]), [[True, False, True]])
    with pytest.raises(ValueError, match=r"2-d array of shape \(n_subsets, 3\).*got shape \(3,\)"):
        check_masks([True, False, True], 3)
    with pytest.raises(ValueError, match="have 2 columns but the trajectory has 3"):
        check_masks([[True, False]], 3)
    with pytest.raises(ValueError, match="boolean"):
        check_masks([[0.5, 1.0]])
