"""Curvature objects against the dense matrices they stand for.

Every object represents a symmetric matrix H: block-diagonal Q diag(Λ) Qᵀ with
Q = Q_S ⊗ Q_A per block (row-major vec of the (d_out, d_in) block) for
``EigenbasisCurvature``, the matrix itself for ``DenseCurvature``. ``apply(fn, V, shift)``
must equal fn(H + D) V with D the (per-block) shift, computed densely with ``eigh``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from sourcekit.curvature import (
    CURVATURES,
    DenseCurvature,
    EigenbasisCurvature,
    KroneckerFactors,
    fit_curvature,
)
from sourcekit.curvature._passes import FitSettings
from sourcekit.curvature._spectral import Decay, DiscreteResidual, Inverse, Residual
from sourcekit.gradients._layers import LayerBlock, find_blocks

from .. import _cases

EPS64 = float(np.finfo(np.float64).eps)


# --- dense views (shared with test_fit) --------------------------------------------------------
def block_dense(block: LayerBlock, factors: KroneckerFactors) -> torch.Tensor:
    """Q diag(vec Λ) Qᵀ with Q = Q_S ⊗ Q_A (the identity where a factor is None)."""
    eye = functools.partial(torch.eye, dtype=torch.float64)
    q_s = eye(block.d_out) if factors.q_s is None else factors.q_s
    q_a = eye(block.d_in) if factors.q_a is None else factors.q_a
    q = torch.kron(q_s.contiguous(), q_a.contiguous())  # kron needs contiguous inputs
    return q @ torch.diag(factors.eigenvalues.reshape(-1)) @ q.T


def dense_matrix(curvature: EigenbasisCurvature | DenseCurvature) -> torch.Tensor:
    """The matrix a curvature object represents, blocks in order, each block row-major."""
    if isinstance(curvature, DenseCurvature):
        return curvature.matrix
    return torch.block_diag(*[block_dense(b, curvature.factors[b.name]) for b in curvature.blocks])


def block_slices(blocks: list[LayerBlock]) -> dict[str, slice]:
    out, start = {}, 0
    for b in blocks:
        out[b.name] = slice(start, start + b.n_params)
        start += b.n_params
    return out


def flatten(blocks: list[LayerBlock], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[b.name].reshape(grads[b.name].shape[0], -1) for b in blocks], dim=1)


def shift_diagonal(blocks: list[LayerBlock], shift: float | dict[str, float]) -> torch.Tensor:
    return torch.cat(
        [
            torch.full(
                (b.n_params,),
                shift[b.name] if isinstance(shift, dict) else shift,
                dtype=torch.float64,
            )
            for b in blocks
        ]
    )


def dense_apply(
    fn: Callable, matrix: torch.Tensor, shift_diag: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """fn(H + D) v by a dense eigendecomposition, and the tolerance a comparison deserves.

    eigh is backward stable: it decomposes H + D + E with ‖E‖ ≲ P·eps·‖H + D‖. For symmetric
    matrices ‖fn(H + E) − fn(H)‖_F ≤ L·‖E‖_F, L the largest divided difference of fn on
    the spectrum (≤ its Lipschitz constant there), and each application adds P·eps·max|fn|
    per row. The object's own rounding is of the same kind, so 10× that covers both.
    """
    shifted = matrix + torch.diag(shift_diag)
    lam, q = torch.linalg.eigh(0.5 * (shifted + shifted.T))
    out = ((v @ q) * fn(lam)) @ q.T
    grid = torch.linspace(float(lam.min()), float(lam.max()), 2001, dtype=torch.float64)
    values = fn(grid)
    lipschitz = (
        float((values.diff().abs() / grid.diff().clamp_min(1e-300)).max())
        if len(grid) > 1
        else 0.0
    )
    size = matrix.shape[0]
    norm = float(torch.linalg.matrix_norm(shifted, ord=2))
    scale = (lipschitz * norm + float(fn(lam).abs().max())) * float(v.abs().max())
    return out, 10 * size * EPS64 * scale


# --- objects to check: fitted ones of every kind, and hand-made ones -------------------------------
@functools.cache
def fitted(kind: str) -> EigenbasisCurvature | DenseCurvature:
    trajectory = _cases.trajectory("mlp_sgd")
    blocks = find_blocks(trajectory.architecture.build())
    settings = FitSettings(fisher="true", batch_size=5, dtype=torch.float64)
    return fit_curvature(kind, trajectory, blocks, [1, 4], trajectory.stages[0].examples, settings)


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


@functools.cache
def hand_made() -> EigenbasisCurvature:
    """Random orthogonal factors (some missing) and positive eigenvalues, seeded."""
    g = torch.Generator().manual_seed(0)
    blocks = [
        LayerBlock("a", "linear", "a.weight", "a.bias", 3, 4),
        LayerBlock("b", "linear", "b.weight", None, 2, 3),
        LayerBlock("c", "conv2d", "c.weight", "c.bias", 4, 5),
    ]
    factors = {
        "a": KroneckerFactors(
            _orthogonal(3, g), _orthogonal(4, g), torch.rand(3, 4, generator=g).double()
        ),
        "b": KroneckerFactors(None, _orthogonal(3, g), torch.rand(2, 3, generator=g).double()),
        "c": KroneckerFactors(
            _orthogonal(4, g), None, torch.rand(4, 5, generator=g).double() + 0.5
        ),
    }
    return EigenbasisCurvature("ekfac", blocks, factors)


OBJECTS = [*CURVATURES, "hand_made"]


def _object(name: str) -> EigenbasisCurvature | DenseCurvature:
    return hand_made() if name == "hand_made" else fitted(name)


def _grads(blocks: list[LayerBlock], n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        b.name: torch.randn(n, b.d_out, b.d_in, generator=g, dtype=torch.float64) for b in blocks
    }


FUNCTIONS = {
    "residual": Residual(2.0),
    "decay": Decay(1.5),
    "inverse": Inverse(),
    "discrete_residual": DiscreteResidual([0.3, 0.2, 0.4]),
}


# The inverse needs damping (undamped eigenvalues reach 0): no "zero" shift for it.
SHIFTED_FUNCTIONS = [
    (fn_name, shift_kind)
    for fn_name in FUNCTIONS
    for shift_kind in ("zero", "float", "per_block", "equal_per_block")
    if not (fn_name == "inverse" and shift_kind == "zero")
]


@pytest.mark.parametrize("name", OBJECTS)
@pytest.mark.parametrize(("fn_name", "shift_kind"), SHIFTED_FUNCTIONS)
def test_apply_equals_the_dense_matrix_function(name: str, fn_name: str, shift_kind: str) -> None:
    curvature = _object(name)
    blocks = curvature.blocks
    if shift_kind == "zero":
        shift: float | dict[str, float] = 0.0
    elif shift_kind == "float":
        shift = 1.0  # above |λ_min| ≈ 0.4 of the Hessian: the inverse stays bounded
    elif shift_kind == "per_block":
        shift = {b.name: 0.8 + 0.7 * i for i, b in enumerate(blocks)}
    else:
        shift = {b.name: 0.9 for b in blocks}
    fn = FUNCTIONS[fn_name]
    grads = _grads(blocks)
    got = flatten(blocks, curvature.apply(fn, grads, shift))
    want, tolerance = dense_apply(
        fn, dense_matrix(curvature), shift_diagonal(blocks, shift), flatten(blocks, grads)
    )
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", OBJECTS)
def test_apply_keeps_the_block_shapes_and_returns_float64(name: str) -> None:
    curvature = _object(name)
    grads = {k: v.float() for k, v in _grads(curvature.blocks, n=2).items()}
    out = curvature.apply(Residual(1.0), grads, 0.1)
    assert set(out) == {b.name for b in curvature.blocks}
    for b in curvature.blocks:
        assert out[b.name].shape == (2, b.d_out, b.d_in)
        assert out[b.name].dtype == torch.float64


@pytest.mark.parametrize("name", OBJECTS)
def test_diagonal_and_mean_eigenvalues_equal_the_dense_matrix(name: str) -> None:
    curvature = _object(name)
    matrix = dense_matrix(curvature)
    # Forming Q diag(Λ) Qᵀ and the object's (Q∘Q)Λ(Q∘Q)ᵀ both sum ≤ P products of size
    # ≤ max|Λ|: a few P·eps·max|H| apart.
    scale = float(matrix.abs().max())
    tolerance = 4 * matrix.shape[0] * EPS64 * scale
    slices = block_slices(curvature.blocks)
    diagonal = curvature.diagonal()
    means = curvature.mean_eigenvalues()
    for b in curvature.blocks:
        part = matrix[slices[b.name], slices[b.name]]
        want = torch.diagonal(part).reshape(b.d_out, b.d_in)
        torch.testing.assert_close(diagonal[b.name], want, rtol=0, atol=tolerance)
        # mean eigenvalue = trace / dimension (the trace is invariant under the rotation).
        assert abs(means[b.name] - float(torch.trace(part)) / b.n_params) <= tolerance


def test_dense_curvature_symmetrises_and_flattens_block_by_block() -> None:
    blocks = [
        LayerBlock("a", "linear", "a.weight", "a.bias", 2, 3),
        LayerBlock("b", "linear", "b.weight", None, 1, 2),
    ]
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(8, 8, generator=g, dtype=torch.float64)
    curvature = DenseCurvature("exact", blocks, raw)
    torch.testing.assert_close(curvature.matrix, 0.5 * (raw + raw.T), rtol=0, atol=0)
    grads = _grads(blocks, n=3)
    flat = curvature.flatten(grads)
    assert flat.shape == (3, 8)
    assert torch.equal(flat[:, :6].reshape(3, 2, 3), grads["a"])
    back = curvature.unflatten(flat)
    assert all(torch.equal(back[k], grads[k]) for k in grads)


def test_identity_applies_the_function_of_one_plus_the_shift() -> None:
    curvature = fitted("identity")
    grads = _grads(curvature.blocks)
    shift = {b.name: 0.25 * (i + 1) for i, b in enumerate(curvature.blocks)}
    out = curvature.apply(Residual(3.0), grads, shift)
    for b in curvature.blocks:
        factor = Residual(3.0)(torch.tensor(1.0 + shift[b.name], dtype=torch.float64))
        assert torch.equal(out[b.name], factor * grads[b.name])
    assert all(torch.equal(d, torch.ones_like(d)) for d in curvature.diagonal().values())
    assert set(curvature.mean_eigenvalues().values()) == {1.0}


@pytest.mark.parametrize("name", ["ekfac", "exact", "hand_made"])
def test_to_device_keeps_the_curvature(name: str) -> None:
    curvature = _object(name)
    moved = curvature.to(torch.device("cpu"))
    assert type(moved) is type(curvature) and moved.kind == curvature.kind
    torch.testing.assert_close(dense_matrix(moved), dense_matrix(curvature), rtol=0, atol=0)
    assert curvature.kind in repr(curvature)


@pytest.mark.parametrize("name", OBJECTS)
@pytest.mark.parametrize("per_block", [False, True])
def test_apply_many_equals_apply_for_each_function(name: str, per_block: bool) -> None:
    curvature = _object(name)
    shift: float | dict[str, float] = 0.5
    if per_block:
        shift = {b.name: 0.6 + 0.5 * i for i, b in enumerate(curvature.blocks)}
    grads = _grads(curvature.blocks)
    fns = list(FUNCTIONS.values())
    many = curvature.apply_many(fns, grads, shift)
    assert len(many) == len(fns)
    for fn, out in zip(fns, many, strict=True):
        one = curvature.apply(fn, grads, shift)
        if per_block and isinstance(curvature, DenseCurvature) and isinstance(fn, Inverse):
            # Alone, the inverse under unequal per-block shifts is a Cholesky solve rather
            # than the eigendecomposition the other functions share: the same product in
            # float64, to rounding (the shifted matrix's eigenvalues are at least 0.6).
            for b in curvature.blocks:
                torch.testing.assert_close(out[b.name], one[b.name], rtol=1e-10, atol=1e-12)
            continue
        # The same operations on the same rotated gradients: identical results.
        assert all(torch.equal(out[b.name], one[b.name]) for b in curvature.blocks)
