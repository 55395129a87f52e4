"""TRAK against dense computations: the projected formula, and the unprojected influence
function with the empirical Fisher when the projection loses nothing.

If R (P × k, k ≥ P) has orthonormal rows, complete it to an orthogonal k × k matrix
[R; R⊥]: then RᵀMR + λI = [R; R⊥]ᵀ diag(M + λI, λI) [R; R⊥], and since φ = Rᵀg,

    φ_qᵀ (RᵀMR + λI)⁻¹ φ_m = g_qᵀ (M + λI)⁻¹ g_m    (M = GᵀG/N, the empirical Fisher).

Tolerances: x = K⁻¹g_m computed in float64 through an eigendecomposition (or a solve)
of a k × k matrix K with condition number κ has a normwise error of a small multiple of
k·κ·eps·‖x‖, so a score −(1/N) g_qᵀx is accurate to that multiple of ‖g_q‖‖x‖/N.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourcekit import TRAKAttributor
from sourcekit.gradients._layers import LayerBlock
from sourcekit.scoring._trak import (
    RandomProjection,
    TRAKCheckpoint,
    kernel_eigendecomposition,
    trak_scores,
)

from .. import _cases
from .test_similarity import reference_gradients

EPS64 = float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def run():
    return _cases.trajectory("mlp_sgd")  # 12 examples, 38 parameters, no weight decay


def _bound(g_q: torch.Tensor, solved: torch.Tensor, kappa: float) -> np.ndarray:
    """4 k κ eps ‖g_q‖‖x_m‖/N for queries g_q (n_q, k) and solutions x_m = K⁻¹g_m (k, N)."""
    k, n = solved.shape
    scale = torch.outer(g_q.norm(dim=1), solved.norm(dim=0)) / n
    return (4 * k * kappa * EPS64 * scale).numpy()


@pytest.mark.parametrize("extra", [0, 7])
def test_an_orthogonal_projection_recovers_the_empirical_fisher_influence_function(run, extra):
    queries = _cases.queries("mlp_sgd")
    g_m = reference_gradients(run, run.n_steps, run.train, "loss")  # (12, 38)
    g_q = reference_gradients(run, run.n_steps, queries, "measurement")
    n, p = g_m.shape
    k = p + extra
    q, _ = torch.linalg.qr(
        torch.randn(k, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    r = q[:p]  # P × k with orthonormal rows
    phi = g_m @ r
    values, vectors = kernel_eigendecomposition(phi)
    fisher = g_m.T @ g_m / n
    lam = 0.1 * float(torch.trace(fisher)) / p
    scores = trak_scores(
        [g_q @ r], [TRAKCheckpoint(run.n_steps, phi, values, vectors)], [lam], dtype=torch.float64
    )
    solved = torch.linalg.solve(fisher + lam * torch.eye(p, dtype=torch.float64), g_m.T)
    expected = -(g_q @ solved) / n
    kappa = (float(torch.linalg.eigvalsh(fisher).max()) + lam) / lam
    diff = (scores - expected).abs().numpy()
    assert np.all(diff <= _bound(g_q, solved, kappa))


@pytest.mark.parametrize("checkpoints", ["final", "all"])
def test_the_estimator_is_the_dense_projected_formula_averaged_over_checkpoints(run, checkpoints):
    queries = _cases.queries("mlp_sgd")
    lam = 1e-3
    trak = TRAKAttributor(
        projection_dim=76, damping=lam, checkpoints=checkpoints, device="cpu", dtype="float64"
    ).fit(run)
    steps = [run.n_steps] if checkpoints == "final" else [1, 4, 7, run.n_steps]
    assert [c.step for c in trak.state_.checkpoints] == steps
    r = trak.state_.projection.matrix()  # (38, 76), in find_blocks' parameter order
    assert r.shape == (38, 76)
    expected = torch.zeros(len(queries), run.n_train, dtype=torch.float64)
    bound = np.zeros(expected.shape)
    for step in steps:
        phi = reference_gradients(run, step, run.train, "loss") @ r
        phi_q = reference_gradients(run, step, queries, "measurement") @ r
        kernel = phi.T @ phi / run.n_train + lam * torch.eye(76, dtype=torch.float64)
        solved = torch.linalg.solve(kernel, phi.T)
        expected -= phi_q @ solved / run.n_train / len(steps)
        kappa = float(torch.linalg.eigvalsh(kernel).max()) / lam
        bound += _bound(phi_q, solved, kappa) / len(steps)
    scores = trak.transform(queries)
    assert np.all(np.abs(scores - expected.numpy()) <= bound)


def test_zero_damping_is_the_pseudo_inverse(run):
    # k = 40 > N = 12: ΦᵀΦ/N is singular, and λ = 0 means its pseudo-inverse.
    queries = _cases.queries("mlp_sgd")
    trak = TRAKAttributor(projection_dim=40, damping=0.0, device="cpu", dtype="float64").fit(run)
    (checkpoint,) = trak.state_.checkpoints
    phi = checkpoint.features
    r = trak.state_.projection.matrix()
    phi_q = reference_gradients(run, run.n_steps, queries, "measurement") @ r
    gram = phi.T @ phi / run.n_train
    solved = torch.linalg.pinv(gram, hermitian=True) @ phi.T
    expected = -(phi_q @ solved) / run.n_train
    nonzero = torch.linalg.eigvalsh(gram)[-run.n_train :]  # rank N: the rest are rounding
    kappa = float(nonzero.max() / nonzero.min())  # on the span that matters
    bound = _bound(phi_q, solved, kappa)
    assert np.all(np.abs(trak.transform(queries) - expected.numpy()) <= bound)


def _blocks() -> list[LayerBlock]:
    return [
        LayerBlock("a", "linear", "a.weight", "a.bias", 3, 4),
        LayerBlock("b", "linear", "b.weight", None, 2, 5),
    ]


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_the_projection_is_seeded_and_generated_piece_by_piece(kind):
    whole = RandomProjection.for_blocks(_blocks(), 6, kind, seed=3)
    assert len(whole.pieces(0)) == 1 and len(whole.pieces(1)) == 1
    pieces = RandomProjection.for_blocks(_blocks(), 6, kind, seed=3, piece_rows=2)
    assert len(pieces.pieces(0)) == 6 and len(pieces.pieces(1)) == 5
    r = pieces.matrix()
    assert r.shape == (22, 6)
    np.testing.assert_array_equal(r.numpy(), pieces.matrix().numpy())  # deterministic
    other_seed = RandomProjection.for_blocks(_blocks(), 6, kind, seed=4, piece_rows=2)
    assert not torch.equal(r, other_seed.matrix())
    assert not torch.equal(r, whole.matrix())  # pieces of other sizes come from other seeds
    if kind == "rademacher":
        assert set(np.unique(r.numpy() * np.sqrt(6)).tolist()) == {-1.0, 1.0}
    grads = {
        "a": torch.randn(5, 3, 4, dtype=torch.float64),
        "b": torch.randn(5, 2, 5, dtype=torch.float64),
    }
    flat = torch.cat([grads["a"].reshape(5, -1), grads["b"].reshape(5, -1)], dim=1)
    for budget in (0, 10**6):  # pieces regenerated at every use, or kept
        projector = pieces.projector(torch.device("cpu"), torch.float64, budget)
        for _ in range(2):
            np.testing.assert_allclose(
                projector(grads).numpy(), (flat @ r).numpy(), rtol=0, atol=64 * EPS64 * 22
            )


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_the_projection_preserves_inner_products_on_average(kind):
    # E[R Rᵀ] = I. With k = 4096 each diagonal entry of R Rᵀ has mean 1 and standard
    # deviation √(2/k) ≈ 0.022 (Gaussian; less for Rademacher, where it is exactly 1) and
    # each off-diagonal entry has standard deviation 1/√k ≈ 0.016: six standard deviations
    # bound every entry of this fixed draw.
    blocks = [LayerBlock("a", "linear", "a.weight", "a.bias", 5, 8)]
    r = RandomProjection.for_blocks(blocks, 4096, kind, seed=0).matrix()
    gram = r @ r.T
    assert torch.all((torch.diagonal(gram) - 1).abs() < 6 * (2 / 4096) ** 0.5)
    off = gram - torch.diag(torch.diagonal(gram))
    assert torch.all(off.abs() < 6 / 4096**0.5)
