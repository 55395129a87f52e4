"""Krylov iterations for functions of a symmetric operator, against dense float64 results,
within the error bounds of their mathematics:

- Lanczos: ‖f(A)v − ‖v‖ W_k f(T_k) e₁‖ ≤ 2‖v‖ E_{k−1}(f), E the best uniform polynomial
  approximation error of degree k − 1 on [λ_min, λ_max], bounded here by Chebyshev
  truncation in a Bernstein ellipse (Trefethen, ATAP Theorem 8.2):
  E_n ≤ 2 M_ρ ρ^{−n} / (ρ − 1) for f analytic inside the ellipse E_ρ with |f| ≤ M_ρ there;
- the block Krylov space of r starting vectors (Rayleigh-Ritz): for any v in their span
  it contains K_k(A, v), so the Lanczos bound holds for it at every step k;
- conjugate gradients: ‖x_k − x‖_A ≤ 2 ((√κ − 1)/(√κ + 1))^k ‖x‖_A, κ the condition
  number of the preconditioned operator, and no worse than preconditioned Richardson.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sourcekit.curvature import Decay, DiscreteDecay, DiscreteResidual, Inverse, Residual
from sourcekit.curvature._krylov import (
    conjugate_gradients,
    krylov_subspace,
    lanczos,
    principal_combinations,
)

EPS64 = float(np.finfo(np.float64).eps)
# Rounding of the iterations: orthogonalisation and products over P ≤ 40 numbers, about
# P·k·eps of the result's scale; 1e-10 of ‖v‖·max|f| bounds it with room.
ROUNDING = 1e-10


def spd(n: int, low: float, high: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random symmetric matrix with eigenvalues spread log-uniformly over [low, high]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64)
    lam = lam[torch.randperm(n, generator=g)]
    return (q * lam) @ q.T, lam


def dense_function(a: torch.Tensor, fn: Callable, v: torch.Tensor) -> torch.Tensor:
    lam, q = torch.linalg.eigh(a)
    return ((v @ q) * fn(lam)) @ q.T


RHO = np.geomspace(1.001, 200.0, 4000)
HALF_AXIS = 0.5 * (RHO + 1 / RHO)  # max |x| = max −Re x over the Bernstein ellipse E_ρ of [−1, 1]


def chebyshev_bound(log_bound_on_ellipse: np.ndarray, degree: int) -> float:
    """min over ρ of 2 M_ρ ρ^{−n}/(ρ − 1), from log M_ρ on the grid RHO: every ρ gives a
    valid bound on E_n, so the minimum over any grid of them is one too."""
    logs = math.log(2) + log_bound_on_ellipse - degree * np.log(RHO) - np.log(RHO - 1)
    return float(np.exp(logs.min()))


def decay_bound(s: float, low: float, high: float) -> np.ndarray:
    c, h = 0.5 * (low + high), 0.5 * (high - low)
    # |e^{−sσ}| = e^{−s Re σ}, with Re σ ≥ c − h·HALF_AXIS on the ellipse around [low, high]
    return -s * (c - h * HALF_AXIS)


def residual_bound(s: float, low: float, high: float) -> np.ndarray:
    c, h = 0.5 * (low + high), 0.5 * (high - low)
    # |(1 − e^{−sσ})/σ| = |∫₀ˢ e^{−tσ} dt| ≤ s · max(1, e^{−s Re σ})
    return math.log(s) + np.maximum(0.0, -s * (c - h * HALF_AXIS))


def bounded_problem(
    name: str, seed: int, s: float
) -> tuple[torch.Tensor, torch.Tensor, Callable, np.ndarray]:
    """A 30 × 30 matrix with eigenvalues over [1e-3, 2], SOURCE's decay or residual over
    s, and log M_ρ of that function on the Bernstein ellipses around the spectrum."""
    a, lam = spd(30, 1e-3, 2.0, seed)
    low, high = float(lam.min()), float(lam.max())
    if name == "decay":
        return a, lam, Decay(s), decay_bound(s, low, high)
    return a, lam, Residual(s), residual_bound(s, low, high)


@pytest.mark.parametrize("name", ["decay", "residual"])
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), s=st.floats(0.5, 50.0), n_vectors=st.integers(1, 3))
def test_lanczos_converges_to_the_matrix_function_within_its_bound(
    name: str, seed: int, s: float, n_vectors: int
) -> None:
    a, lam, fn, bound = bounded_problem(name, seed, s)
    v = torch.randn(
        n_vectors, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    exact = dense_function(a, fn, v)
    scale = float(v.norm(dim=1).max()) * float(fn(lam).abs().max())
    errors = []
    full = lanczos(lambda x: x @ a, v, 30)
    for k in range(1, 31):
        (approx,) = full.leading(k).apply([fn])
        error = float((approx - exact).norm(dim=1).max())
        limit = 2 * float(v.norm(dim=1).max()) * chebyshev_bound(bound, k - 1)
        assert error <= limit + ROUNDING * scale, (k, error, limit)
        errors.append(error)
    assert errors[-1] <= ROUNDING * scale  # k = n: the whole space, exact


def test_one_basis_serves_every_function_and_the_discrete_forms() -> None:
    a, _ = spd(12, 1e-2, 1.0, 3)
    v = torch.randn(2, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rates = [0.3, 0.2, 0.2, 0.1]
    fns = [Decay(2.0), Residual(2.0), DiscreteDecay(rates), DiscreteResidual(rates)]
    basis = lanczos(lambda x: x @ a, v, 12)
    for fn, approx in zip(fns, basis.apply(fns), strict=True):
        torch.testing.assert_close(approx, dense_function(a, fn, v), rtol=0, atol=1e-12)
    # a polynomial of degree 4 (the discrete decay over 4 steps) is exact from 5 steps on
    (approx,) = lanczos(lambda x: x @ a, v, 5).apply([DiscreteDecay(rates)])
    torch.testing.assert_close(
        approx, dense_function(a, DiscreteDecay(rates), v), rtol=0, atol=1e-13
    )


def test_lanczos_of_an_eigenvector_or_a_zero_vector_is_exact_at_once() -> None:
    a, _ = spd(10, 0.1, 3.0, 4)
    lam, q = torch.linalg.eigh(a)
    v = torch.stack([q[:, 3], torch.zeros(10, dtype=torch.float64)])
    for k in (1, 2, 6):  # steps past the invariant subspace add nothing
        (approx,) = lanczos(lambda x: x @ a, v, k).apply([Decay(1.5)])
        torch.testing.assert_close(
            approx[0], torch.exp(-1.5 * lam[3]) * q[:, 3], rtol=0, atol=1e-13
        )
        assert torch.equal(approx[1], torch.zeros(10, dtype=torch.float64))


@pytest.mark.parametrize("name", ["decay", "residual"])
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), s=st.floats(0.5, 50.0), rank=st.integers(1, 3))
def test_a_block_krylov_space_meets_the_lanczos_bound_for_every_vector_of_its_span(
    name: str, seed: int, s: float, rank: int
) -> None:
    a, lam, fn, bound = bounded_problem(name, seed, s)
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(rank, 30, generator=g, dtype=torch.float64)
    v = torch.randn(5, rank, generator=g, dtype=torch.float64) @ start  # 5 vectors in the span
    exact = dense_function(a, fn, v)
    scale = float(v.norm(dim=1).max()) * float(fn(lam).abs().max())
    for k in range(1, -(-30 // rank) + 1):
        space = krylov_subspace(lambda x: x @ a, start, k)
        assert space.basis.shape[0] == min(30, rank * k)
        (approx,) = space.apply([fn], v)
        error = float((approx - exact).norm(dim=1).max())
        limit = 2 * float(v.norm(dim=1).max()) * chebyshev_bound(bound, k - 1)
        assert error <= limit + ROUNDING * scale, (k, error, limit)
    assert error <= ROUNDING * scale  # the whole space: exact


def test_a_block_krylov_space_drops_repeated_and_zero_directions() -> None:
    a, _ = spd(12, 1e-2, 1.0, 6)
    x = torch.randn(12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    start = torch.stack([x, 2 * x, torch.zeros(12, dtype=torch.float64), -x])
    calls = []

    def product(y: torch.Tensor) -> torch.Tensor:
        calls.append(y.shape[0])
        return y @ a

    space = krylov_subspace(product, start, 20)
    # one direction per step until the space is whole, then no more products
    assert calls == [1] * 12 and space.basis.shape == (12, 12)
    eye = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(space.basis @ space.basis.T, eye, rtol=0, atol=1e-13)
    (approx,) = space.apply([Decay(1.0)], start)
    torch.testing.assert_close(approx, dense_function(a, Decay(1.0), start), rtol=0, atol=1e-12)
    empty = krylov_subspace(product, torch.zeros(2, 12, dtype=torch.float64), 3)
    assert empty.basis.shape == (0, 12) and len(calls) == 12
    (none,) = empty.apply([Decay(1.0)], start)
    assert torch.equal(none, torch.zeros_like(start))


def test_principal_combinations_span_the_best_approximation_of_their_rank() -> None:
    v = torch.randn(8, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    v = v * torch.logspace(0, -3, 8, dtype=torch.float64)[:, None]
    assert torch.equal(principal_combinations(v, None), torch.eye(8, dtype=torch.float64))
    assert torch.equal(principal_combinations(v, 8), torch.eye(8, dtype=torch.float64))
    sigma = torch.linalg.svdvals(v)
    for rank in (1, 3, 5):
        rows = principal_combinations(v, rank) @ v
        q, _ = torch.linalg.qr(rows.T)
        left = v - (v @ q) @ q.T
        # Eckart-Young: what is left outside the span is the trailing singular values' part
        torch.testing.assert_close(left.norm() ** 2, (sigma[rank:] ** 2).sum(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("decay", [1e-6, 0.5])
def test_many_rows_find_their_leading_combinations_by_a_randomized_range_finder(
    decay: float,
) -> None:
    # 300 rows, rank 4: past 4r + 64 rows the combinations come from random probes of
    # v vᵀ, whose eigenvalues are σ². The range finder's error in the leading space falls
    # like (σ_{r+1}/σ_r)² there (Halko, Martinsson and Tropp 2011): 1e-12 of the
    # energy past the rank for the steep fall-off, well below 1e-3 of it for the gentle
    # one (σ_5/σ_4 = 1/4, and 16 extra probes). The first r rows, not the leading
    # combinations, leave 3.6 to 6 times the best outside.
    g = torch.Generator().manual_seed(9)
    left, _ = torch.linalg.qr(torch.randn(300, 40, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(50, 40, generator=g, dtype=torch.float64))
    sigma = torch.cat(
        [
            torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=torch.float64),
            decay * torch.logspace(0, -2, 36, dtype=torch.float64),
        ]
    )
    v = (left * sigma) @ right.T
    combinations = principal_combinations(v, 4)
    assert combinations.shape == (4, 300)
    torch.testing.assert_close(
        combinations @ combinations.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12
    )
    q, _ = torch.linalg.qr((combinations @ v).T)
    best = (sigma[4:] ** 2).sum()
    outside = (v - (v @ q) @ q.T).norm() ** 2
    assert outside >= best * (1 - 1e-9)
    assert outside <= best * (1 + (1e-9 if decay < 1e-3 else 1e-3))


def a_norm(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return ((x @ a) * x).sum(dim=1).sqrt()


def kappa_of(a: torch.Tensor, m: torch.Tensor | None) -> float:
    if m is None:
        lam = torch.linalg.eigvalsh(a)
    else:
        lam_m, q_m = torch.linalg.eigh(m)
        root = (q_m * lam_m.sqrt()) @ q_m.T
        lam = torch.linalg.eigvalsh(root @ a @ root)
    return float(lam.max() / lam.min())


@pytest.mark.parametrize("preconditioned", [False, True])
@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), damping=st.floats(1e-4, 1e-1))
def test_conjugate_gradients_meet_their_bound(
    preconditioned: bool, seed: int, damping: float
) -> None:
    a, _ = spd(30, 1e-3, 2.0, seed)
    a = a + damping * torch.eye(30, dtype=torch.float64)
    m = None
    if preconditioned:  # an approximate inverse: the inverse of a perturbed matrix
        noise, _ = spd(30, 1e-3, 0.5, seed + 1)
        m = torch.linalg.inv(a + noise)
    b = torch.randn(2, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = torch.linalg.solve(a, b.T).T
    kappa = kappa_of(a, m)
    rate = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    start = a_norm(exact, a)
    for k in range(1, 31):
        x = conjugate_gradients(
            lambda x: x @ a, b, k, None if m is None else (lambda r, m=m: r @ m)
        )
        error = a_norm(x - exact, a)
        # rounding: the products and updates add about k·P·eps·κ of ‖x‖_A
        slack = 1e3 * EPS64 * kappa * start
        assert bool((error <= 2 * rate**k * start + slack).all()), (k, error, rate)


def test_conjugate_gradients_beat_preconditioned_richardson_at_every_step() -> None:
    # x ← x + α M (b − A x) from 0 with the best fixed α: its k-th iterate lies in the
    # same Krylov space, where CG's is the best in the A-norm.
    a, _ = spd(25, 1e-3, 2.0, 7)
    a = a + 1e-2 * torch.eye(25, dtype=torch.float64)
    noise, _ = spd(25, 1e-3, 0.5, 8)
    m = torch.linalg.inv(a + noise)
    b = torch.randn(1, 25, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = torch.linalg.solve(a, b.T).T
    for k in (1, 2, 4, 8):
        cg = float(a_norm(conjugate_gradients(lambda x: x @ a, b, k, lambda r: r @ m) - exact, a))
        best = math.inf
        for alpha in np.linspace(0.05, 2.0, 40):
            x = torch.zeros_like(b)
            for _ in range(k):
                x = x + alpha * (b - x @ a) @ m
            best = min(best, float(a_norm(x - exact, a)))
        assert cg <= best * (1 + 1e-9)


def test_conjugate_gradients_of_a_zero_right_hand_side_are_zero() -> None:
    a, _ = spd(5, 0.1, 1.0, 0)
    b = torch.zeros(2, 5, dtype=torch.float64)
    b[1, 2] = 1.0
    x = conjugate_gradients(lambda x: x @ a, b, 5)
    assert torch.equal(x[0], torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(x[1] @ a, b[1], rtol=0, atol=1e-12)


def test_steps_must_be_positive() -> None:
    a = torch.eye(2, dtype=torch.float64)
    v = torch.ones(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 1"):
        lanczos(lambda x: x @ a, v, 0)
    with pytest.raises(ValueError, match="at least 1; got 0"):
        krylov_subspace(lambda x: x @ a, v, 0)
    with pytest.raises(ValueError, match="at least 1"):
        conjugate_gradients(lambda x: x @ a, v, 0)
    assert Inverse()(torch.tensor(2.0)) == 0.5
