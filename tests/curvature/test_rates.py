"""Curvature.apply_rates: a segment whose parameters train at their own rates.

Every kind computes u = P^½ R(K) P^½ v and v_next = v − (H + Λ) u with
K = P^½ (H + Λ) P^½ (sourcekit/curvature/_rates.py). Checked against the formula entry
by entry where the eigenbasis is the identity, and across the three implementations
(the eigenbasis kinds', the dense kinds' and the base class's) on one block-diagonal
curvature whose blocks each keep one sequence and one decay, where all three are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sourcekit.curvature import (
    Carried,
    Curvature,
    DenseCurvature,
    EigenbasisCurvature,
    KroneckerFactors,
)
from sourcekit.curvature._rates import BlockRates, SegmentRates
from sourcekit.gradients._layers import find_blocks

EPS64 = float(np.finfo(np.float64).eps)


def test_entrywise_rates_act_per_entry_in_an_identity_basis() -> None:
    # A block whose weight and bias train at different rates and decays: where the
    # eigenbasis is the identity ("diagonal"), the residual and the decay act entry by
    # entry with each entry's own sum and decay.
    block = find_blocks(nn.Linear(2, 2))[0]
    sigma = torch.tensor([[0.5, 1.0, 2.0], [0.1, 0.0, 3.0]], dtype=torch.float64)
    curvature = EigenbasisCurvature("diagonal", [block], {"": KroneckerFactors(None, None, sigma)})
    bias = torch.tensor([[False, False, True], [False, False, True]])
    rates = BlockRates(
        [(~bias, np.array([0.2, 0.1])), (bias, np.array([0.4, 0.4]))],
        (~bias).double() * 0.05,
        0.0,
    )
    v = {"": torch.randn(3, 2, 3, dtype=torch.float64)}
    u, carried = curvature.apply_rates(SegmentRates({"": rates}, "exp"), Carried(v), 0.01)
    s = bias.double() * 0.8 + (~bias).double() * (0.2 + 0.1)
    shifted = sigma + 0.01 + (~bias).double() * 0.05
    np.testing.assert_allclose(
        u.in_parameters()[""], (-torch.expm1(-s * shifted) / shifted) * v[""], rtol=1e-12
    )
    np.testing.assert_allclose(
        carried.in_parameters()[""], torch.exp(-s * shifted) * v[""], rtol=1e-12
    )
    u_d, carried_d = curvature.apply_rates(SegmentRates({"": rates}, "discrete"), Carried(v), 0.01)
    eta = [bias.double() * 0.4 + (~bias).double() * r for r in (0.2, 0.1)]
    want_u = (eta[0] * (1 - eta[1] * shifted) + eta[1]) * v[""]
    want_c = (1 - eta[0] * shifted) * (1 - eta[1] * shifted) * v[""]
    np.testing.assert_allclose(u_d.in_parameters()[""], want_u, rtol=1e-12)
    np.testing.assert_allclose(carried_d.in_parameters()[""], want_c, rtol=1e-12)


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _two_blocks() -> tuple[EigenbasisCurvature, DenseCurvature]:
    """A K-FAC-like curvature with rotated eigenbases, and the same matrix dense."""
    g = torch.Generator().manual_seed(0)
    blocks = find_blocks(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)))
    factors = {
        b.name: KroneckerFactors(
            _orthogonal(b.d_out, g),
            _orthogonal(b.d_in, g),
            torch.rand(b.d_out, b.d_in, generator=g, dtype=torch.float64) * 2,
        )
        for b in blocks
    }
    curvature = EigenbasisCurvature("kfac", blocks, factors)
    n = sum(b.n_params for b in blocks)
    basis = torch.eye(n, dtype=torch.float64)
    columns, start = {}, 0
    for b in blocks:  # H applied to every unit vector, block by block
        columns[b.name] = basis[:, start : start + b.n_params].reshape(n, b.d_out, b.d_in)
        start += b.n_params
    matrix = torch.cat(
        [v.reshape(n, -1) for v in curvature.apply(lambda s: s, columns).values()], dim=1
    )
    return curvature, DenseCurvature("exact", blocks, matrix)


@pytest.mark.parametrize("matrix_function", ["exp", "discrete"])
def test_every_implementation_agrees_on_block_diagonal_rates(matrix_function: str) -> None:
    # Block "0" trains at a third of block "2"'s rate (proportional sequences: the dense
    # form's reference sequence is then exact for the discrete form too), with a coupled
    # decay of its own.
    eigen, dense = _two_blocks()
    rates = SegmentRates(
        {
            "0": BlockRates([(None, np.array([0.1, 0.2, 0.05]))], 0.05, 0.0),
            "2": BlockRates([(None, np.array([0.3, 0.6, 0.15]))], 0.0, 0.0),
        },
        matrix_function,
    )
    g = torch.Generator().manual_seed(1)
    v = {
        b.name: torch.randn(4, b.d_out, b.d_in, generator=g, dtype=torch.float64)
        for b in eigen.blocks
    }
    results = {
        "eigenbasis": eigen.apply_rates(rates, Carried(v), 1e-3),
        "base class": Curvature.apply_rates(eigen, rates, Carried(v), 1e-3),
        "dense": dense.apply_rates(rates, Carried(v), 1e-3),
    }
    want_u, want_next = (c.in_parameters() for c in results["eigenbasis"])
    # A 26-dimensional eigendecomposition and rotations in float64, on vectors and
    # functions of order one: a few hundred units of roundoff.
    tol = 16 * 26 * EPS64
    for name, (u, after) in results.items():
        for block in eigen.blocks:
            got_u, got_next = u.in_parameters()[block.name], after.in_parameters()[block.name]
            torch.testing.assert_close(got_u, want_u[block.name], rtol=0, atol=tol, msg=name)
            torch.testing.assert_close(got_next, want_next[block.name], rtol=0, atol=tol, msg=name)
    # The rates matter: block "0" at block "2"'s rate gives other vectors.
    same = SegmentRates({k: rates.blocks["2"] for k in ("0", "2")}, matrix_function)
    other = eigen.apply_rates(same, Carried(v), 1e-3)[0].in_parameters()["0"]
    assert float((other - want_u["0"]).abs().max()) > 1e-2
