"""Exact Gauss-Newton-vector products against the dense Gauss-Newton matrix from torch.func
(``tests/curvature/test_fit.py``'s reference), on every supported layer shape and on
outputs with positions (weights and ignored positions included).

The products and the reference both sum ≤ n·C·T (< 1e3 here) float64 products per entry,
in different orders: they agree to ~1e3·eps of the result's scale (DENSE_RTOL).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourcekit.curvature._products import GaussNewtonProducts, flatten_blocks, unflatten_blocks

from . import test_positions
from .test_fit import CPU, DENSE_RTOL, blocks_of, examples_of, reference, run

LAYER_RUNS = ["mlp_momentum", "linear_sgd", "conv", "pooled", "sequence", "tokens", "single_mlp"]


def products_of(trajectory, steps, **kwargs):  # type: ignore[no-untyped-def]
    return GaussNewtonProducts(
        trajectory,
        blocks_of(trajectory),
        steps,
        examples_of(trajectory),
        batch_size=kwargs.pop("batch_size", 4),
        device=CPU,
        dtype=torch.float64,
        memory_limit=kwargs.pop("memory_limit", 2**26),
    )


def check(trajectory, steps, memory_limit: int = 2**26) -> None:  # type: ignore[no-untyped-def]
    matrix = reference("gauss_newton", trajectory, blocks_of(trajectory), steps)
    products = products_of(trajectory, steps, memory_limit=memory_limit)
    x = torch.randn(
        3, matrix.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    want = x @ matrix
    got = products(x)
    torch.testing.assert_close(got, want, rtol=0, atol=DENSE_RTOL * float(want.abs().max()))
    assert products.n_products == 1
    diagonal = flatten_blocks(
        products.blocks, {k: t[None] for k, t in products.diagonal().items()}
    )
    want_diagonal = torch.diagonal(matrix)
    torch.testing.assert_close(
        diagonal[0], want_diagonal, rtol=0, atol=DENSE_RTOL * float(want_diagonal.abs().max())
    )


@pytest.mark.parametrize("name", LAYER_RUNS)
def test_products_are_the_gauss_newton_matrix_times_the_vectors(name: str) -> None:
    trajectory = run(name)
    steps = (
        tuple(trajectory.checkpoint_steps[:2])
        if name in ("mlp_momentum", "linear_sgd")
        else (0, 1)
    )
    check(trajectory, steps)


@pytest.mark.parametrize("name", ["token_lm_ignored", "causal_lm", "masked_regression"])
def test_products_weigh_positions_as_the_loss_does(name: str) -> None:
    check(test_positions.run(name), (0, 1))


def test_a_small_memory_limit_splits_the_vectors_and_examples_without_changing_the_result() -> (
    None
):
    # one pair (vector, example) at a time: every chunk boundary is crossed
    check(run("mlp_momentum"), (1,), memory_limit=1)


def test_flat_vectors_round_trip() -> None:
    blocks = blocks_of(run("mlp_momentum"))
    x = torch.arange(2 * sum(b.n_params for b in blocks), dtype=torch.float64).reshape(2, -1)
    assert torch.equal(flatten_blocks(blocks, unflatten_blocks(blocks, x)), x)
    assert np.array_equal(
        [t.shape[1:] for t in unflatten_blocks(blocks, x).values()],
        [(b.d_out, b.d_in) for b in blocks],
    )
