"""Adam's preconditioned curvature: the eigenbasis form against the dense one.

``DenseAdam`` forms K = p^½ (H̄ + c) p^½ + w as a matrix; ``EigenbasisAdam`` projects p,
c and w on H̄'s eigenbasis. The projection is exact where the basis is the identity (the
diagonal kind) and where p is constant on each block (then p commutes with H̄), so there
the two must agree to rounding: each entry of u and v_next is a sum over the P
eigen-directions of products of a few rounded factors, within a small multiple of
P ε₆₄ of the results' scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourcekit import SourceAttributor
from sourcekit.curvature import Carried, DenseCurvature, EigenbasisCurvature
from sourcekit.curvature._preconditioner import (
    DenseAdam,
    EigenbasisAdam,
    basis_diagonal,
    preconditioned_curvature,
)
from sourcekit.curvature._spectral import DiscreteDecay, DiscreteResidual

from .. import _cases

EPS64 = float(np.finfo(np.float64).eps)


def dense_of(curvature: EigenbasisCurvature) -> DenseCurvature:
    """The eigenbasis curvature as one dense matrix over its blocks (block-diagonal)."""
    sizes = [b.n_params for b in curvature.blocks]
    matrix = torch.zeros(sum(sizes), sum(sizes), dtype=torch.float64)
    start = 0
    for block, size in zip(curvature.blocks, sizes, strict=True):
        f = curvature.factors[block.name]
        q_s = torch.eye(block.d_out, dtype=torch.float64) if f.q_s is None else f.q_s
        q_a = torch.eye(block.d_in, dtype=torch.float64) if f.q_a is None else f.q_a
        q = torch.kron(q_s, q_a)
        matrix[start : start + size, start : start + size] = (
            q @ torch.diag(f.eigenvalues.reshape(-1)) @ q.T
        )
        start += size
    return DenseCurvature("exact", curvature.blocks, matrix)


@pytest.mark.parametrize("case", ["mlp_adam", "mlp_adamw"])
@pytest.mark.parametrize("kind", ["diagonal", "ekfac"])
def test_the_eigenbasis_form_is_exact_where_the_projection_is(case: str, kind: str) -> None:
    source = SourceAttributor(n_segments=2, curvature=kind, device="cpu", dtype="float64")
    source.fit(_cases.trajectory(case))
    g = torch.Generator().manual_seed(0)
    for model in source.state_.segments:
        assert isinstance(model.adam, EigenbasisAdam) and model.preconditioner is not None
        p = model.preconditioner
        if kind == "ekfac":  # constant on each block: the projection is exact
            p = {k: torch.full_like(t, float(t.mean())) for k, t in p.items()}
        options = {"coupled": model.weight_decay, "decoupled": model.decoupled_decay}
        structured = preconditioned_curvature(model.curvature, p, **options)
        dense = preconditioned_curvature(dense_of(model.curvature), p, **options)
        assert isinstance(structured, EigenbasisAdam) and isinstance(dense, DenseAdam)
        fns = (DiscreteResidual(model.learning_rates), DiscreteDecay(model.learning_rates))
        v = {
            b.name: torch.randn(3, b.d_out, b.d_in, generator=g, dtype=torch.float64)
            for b in model.curvature.blocks
        }
        u1, after1 = structured.apply(fns, Carried(v), 1e-3, True)
        u2, after2 = dense.apply(fns, Carried(v), 1e-3, True)
        assert after1 is not None and after2 is not None
        n = sum(b.n_params for b in model.curvature.blocks)
        for want, got in ((u2, u1), (after2.in_parameters(), after1.in_parameters())):
            scale = max(float(t.abs().max()) for t in want.values())
            for name in want:
                torch.testing.assert_close(
                    got[name], want[name], rtol=0, atol=64 * n * EPS64 * scale
                )


def test_a_preconditioner_that_varies_in_a_block_changes_the_eigenbasis_form() -> None:
    # The projection keeps H̄'s basis: with p varying inside a block of EK-FAC, the
    # eigenbasis form departs from the dense K (the test above is not trivially true).
    source = SourceAttributor(n_segments=1, curvature="ekfac", device="cpu", dtype="float64")
    model = source.fit(_cases.trajectory("mlp_adam")).state_.segments[0]
    assert model.preconditioner is not None
    structured = preconditioned_curvature(model.curvature, model.preconditioner)
    dense = preconditioned_curvature(dense_of(model.curvature), model.preconditioner)
    fns = (DiscreteResidual(model.learning_rates), DiscreteDecay(model.learning_rates))
    v = {
        b.name: torch.ones(1, b.d_out, b.d_in, dtype=torch.float64) for b in model.curvature.blocks
    }
    u1 = structured.apply(fns, Carried(v), 0.0, False)[0]
    u2 = dense.apply(fns, Carried(v), 0.0, False)[0]
    gap = max(float((u1[k] - u2[k]).abs().max() / u2[k].abs().max()) for k in u2)
    assert gap > 1e-6


def test_basis_diagonal_is_the_diagonal_of_the_rotated_operator() -> None:
    g = torch.Generator().manual_seed(1)
    q_s = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    m = torch.rand(3, 4, generator=g, dtype=torch.float64)
    from sourcekit.curvature import KroneckerFactors

    factors = KroneckerFactors(q_s, q_a, torch.ones(3, 4, dtype=torch.float64))
    q = torch.kron(q_s, q_a)  # row-major vec of a (3, 4) matrix
    want = torch.diagonal(q.T @ torch.diag(m.reshape(-1)) @ q).reshape(3, 4)
    torch.testing.assert_close(basis_diagonal(factors, m), want, rtol=0, atol=1e-14)
