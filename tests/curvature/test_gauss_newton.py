"""The dense Gauss-Newton sum of a batch: both forms (per-example Jacobians, Kronecker
factors of each pair of blocks) against the outer products of per-example gradients
formed here directly, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sourcekit.curvature._gauss_newton import (
    GaussNewtonSum,
    choose_pair_path,
    gauss_newton_path,
)
from sourcekit.gradients._layers import LayerBlock
from sourcekit.gradients._patches import ConvPatches

CPU = torch.device("cpu")
# Each entry sums n·V·T² < 1e4 products of numbers of order one in both forms, in
# different orders: they agree with the direct sum to ~1e4·eps ≈ 2e-12 of the largest
# entry at worst (the observed differences are ~1e-15).
RTOL = 1e-11


def _block(name: str, d_out: int, d_in: int, one_hot: bool = False) -> LayerBlock:
    return LayerBlock(name, "linear", f"{name}.weight", None, d_out, d_in, one_hot=one_hot)


def _direct(
    blocks: list[LayerBlock], a: dict[str, torch.Tensor], variants: list[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Σ_m Σ_v vec G_{m,v} vec G_{m,v}ᵀ with G = Σ_t s_t a_tᵀ formed example by example."""
    rows = []
    for v in variants:
        grads = [torch.einsum("nto,nti->noi", v[b.name], a[b.name]) for b in blocks]
        rows.append(torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1))
    j = torch.cat(rows)
    return j.T @ j


@given(
    n=st.integers(1, 6),
    positions=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    passes=st.integers(1, 5),
    widths=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
    path=st.sampled_from(["auto", "jacobian", "kronecker"]),
)
def test_both_forms_are_the_sum_of_outer_products_of_per_example_gradients(
    n: int,
    positions: list[int],
    passes: int,
    widths: list[tuple[int, int]],
    seed: int,
    path: str,
) -> None:
    g = torch.Generator().manual_seed(seed)
    blocks = [_block(f"b{i}", *widths[i]) for i in range(len(positions))]
    a = {
        b.name: torch.randn(n, t, b.d_in, generator=g, dtype=torch.float64)
        for b, t in zip(blocks, positions, strict=True)
    }
    variants = [
        {
            b.name: torch.randn(n, t, b.d_out, generator=g, dtype=torch.float64)
            for b, t in zip(blocks, positions, strict=True)
        }
        for _ in range(passes)
    ]
    total = GaussNewtonSum(blocks, torch.float64, CPU)
    with gauss_newton_path(path):
        total.add(a, variants)
        total.add(a, variants)  # two batches
    want = 2 * _direct(blocks, a, variants)
    got = total.matrix()
    torch.testing.assert_close(got, want, rtol=0, atol=RTOL * float(want.abs().max()))


def test_the_form_is_chosen_by_arithmetic() -> None:
    # Kronecker: n T T' P P' multiply-adds; Jacobian: n V P P'. The Kronecker form is
    # taken when T T' < V, for dense inputs only.
    b = _block("b", 3, 4)
    one_position = torch.zeros(2, 1, 4)
    four_positions = torch.zeros(2, 4, 4)
    assert choose_pair_path(b, one_position, b, one_position, passes=2) == "kronecker"
    assert choose_pair_path(b, one_position, b, one_position, passes=1) == "jacobian"
    assert choose_pair_path(b, four_positions, b, four_positions, passes=17) == "kronecker"
    assert choose_pair_path(b, four_positions, b, four_positions, passes=16) == "jacobian"
    assert choose_pair_path(b, four_positions, b, one_position, passes=5) == "kronecker"
    with gauss_newton_path("jacobian"):
        assert choose_pair_path(b, one_position, b, one_position, passes=10) == "jacobian"
    with gauss_newton_path("kronecker"):
        assert choose_pair_path(b, four_positions, b, four_positions, passes=2) == "kronecker"


def test_one_hot_and_convolution_inputs_keep_the_jacobian_form() -> None:
    dense, table = _block("dense", 3, 4), _block("table", 3, 5, one_hot=True)
    indices = torch.zeros(2, 1, dtype=torch.long)
    patches = ConvPatches(torch.zeros(2, 1, 4, 4), (2, 2), (1, 1), (0, 0), (1, 1), bias=False)
    with gauss_newton_path("kronecker"):
        assert choose_pair_path(table, indices, table, indices, passes=10) == "jacobian"
        assert choose_pair_path(dense, torch.zeros(2, 1, 4), table, indices, 10) == "jacobian"
        assert choose_pair_path(dense, patches, dense, patches, passes=10) == "jacobian"


def test_an_unknown_path_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"one of \('auto', 'jacobian', 'kronecker'\); got 'fast'"
    ):
        with gauss_newton_path("fast"):
            pass


def test_no_batch_gives_zeros() -> None:
    blocks = [_block("a", 2, 3), _block("b", 1, 2)]
    assert torch.equal(GaussNewtonSum(blocks, torch.float64, CPU).matrix(), torch.zeros(8, 8))
