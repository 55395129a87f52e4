"""Fitting curvature over a segment's checkpoints (METHOD.md section 5) against dense
float64 references: the Gauss-Newton matrix from Jacobians, the Hessian from autograd,
and the Kronecker factors summed directly from the collected layer inputs and output
gradients."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, hessian, jacrev

from sourcekit import Examples, OptimizerSpec, Trajectory
from sourcekit.curvature import (
    CURVATURES,
    Carried,
    Curvature,
    Decay,
    DenseCurvature,
    EigenbasisCurvature,
    Residual,
    fit_curvature,
)
from sourcekit.curvature._gauss_newton import GAUSS_NEWTON_PATHS, gauss_newton_path
from sourcekit.curvature._passes import FitSettings, fisher_seed
from sourcekit.exceptions import NonFiniteError
from sourcekit.gradients._layers import LayerBlock, find_blocks
from sourcekit.gradients._per_example import FisherNoise, checkpoint_batches, model_at
from sourcekit.gradients._training import CacheBudget, LossCache, TrainingGradients
from sourcekit.trajectory import Checkpoint, Stage

from .. import _cases
from ..gradients.test_layers import (
    TokenModel,
    conv_net,
    parameter_names,
    pooled_sequence_mlp,
    sequence_mlp,
    token_data,
)
from .test_objects import block_dense, block_slices, dense_matrix

EPS64 = float(np.finfo(np.float64).eps)
CPU = torch.device("cpu")
# Dense float64 curvature entries are sums over ≤ n·C·T (< 1e3 here) products: two ways of
# forming them agree to ~1e3·eps ≈ 2e-13 of the largest entry; 1e-12 bounds that.
DENSE_RTOL = 1e-12

Steps = Sequence[int]
Modules = list[str] | None


def settings(fisher: str = "expected", batch_size: int = 5, random_state: int = 0) -> FitSettings:
    return FitSettings(
        fisher=fisher,
        random_state=random_state,
        batch_size=batch_size,
        device=CPU,
        dtype=torch.float64,
    )


def assert_dense_close(got: torch.Tensor, want: torch.Tensor, rtol: float = DENSE_RTOL) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=rtol * float(want.abs().max()))


# --- tiny runs of every supported layer shape ------------------------------------------------
def custom_trajectory(
    model: nn.Module, train: Examples, loss: str, n_checkpoints: int = 2, seed: int = 0
) -> Trajectory:
    """A one-stage run whose checkpoints 0..T are seeded random float64 states of ``model``.

    Curvature reads checkpoints only, so no training is needed to exercise it.
    """
    model = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(seed)
    checkpoints = {}
    for step in range(n_checkpoints + 1):
        params = {
            name: 0.6 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            for name, p in model.named_parameters()
        }
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        checkpoints[step] = Checkpoint(step, params, buffers)
    n = len(train)
    stage = Stage("train", OptimizerSpec("sgd", lr=0.1), 0, n_checkpoints, np.arange(n), n)
    return Trajectory(
        architecture=model,
        train=train,
        stages=[stage],
        learning_rates=np.full(n_checkpoints, 0.1),
        batches=None,
        checkpoints=checkpoints,
        checkpoint_steps=range(n_checkpoints),
        loss=loss,
        measurement="margin" if loss == "cross_entropy" else "output",
    )


@functools.cache
def run(name: str) -> Trajectory:
    """Recorded cases by name, and custom runs.

    Custom runs: "conv", "pooled", "sequence", "tokens", "single_linear" and "single_mlp".
    """
    g = torch.Generator().manual_seed(4)
    if name == "tokens":  # Embedding (with a padding row) + GPT-2's Conv1D + Linear
        tokens = token_data(6, g)
        return custom_trajectory(
            TokenModel(), Examples(tokens, torch.randint(0, 3, (6,), generator=g)), "cross_entropy"
        )
    if name == "conv":
        x = torch.randn(6, 2, 9, 9, generator=g, dtype=torch.float64)
        return custom_trajectory(
            conv_net(), Examples(x, torch.randint(0, 3, (6,), generator=g)), "cross_entropy"
        )
    if name == "pooled":
        x = torch.randn(8, 6, 4, generator=g, dtype=torch.float64)
        return custom_trajectory(
            pooled_sequence_mlp(),
            Examples(x, torch.randint(0, 3, (8,), generator=g)),
            "cross_entropy",
        )
    if name == "sequence":  # outputs (n, T, C)
        x = torch.randn(5, 6, 4, generator=g, dtype=torch.float64)
        return custom_trajectory(
            sequence_mlp(), Examples(x, torch.randint(0, 3, (5, 6), generator=g)), "cross_entropy"
        )
    if name == "single_linear":  # one training example, a multi-output Linear model
        x = torch.randn(1, 3, generator=g, dtype=torch.float64)
        return custom_trajectory(nn.Linear(3, 4), Examples(x, torch.tensor([2])), "cross_entropy")
    if name == "single_mlp":
        x = torch.randn(1, 3, generator=g, dtype=torch.float64)
        return custom_trajectory(
            _cases.make_tanh_mlp(), Examples(x, torch.tensor([1])), "cross_entropy"
        )
    return _cases.trajectory(name)


def blocks_of(trajectory: Trajectory, modules: list[str] | None = None) -> list[LayerBlock]:
    return find_blocks(trajectory.architecture.build(), modules)


def examples_of(trajectory: Trajectory) -> np.ndarray:
    return trajectory.stages[0].examples


def fit(
    kind: str, name: str, steps: Steps, modules: Modules = None, **kwargs: Any
) -> EigenbasisCurvature | DenseCurvature:
    trajectory = run(name)
    fit_settings = kwargs.pop("fit_settings", None) or settings()
    return fit_curvature(
        kind,
        trajectory,
        blocks_of(trajectory, modules),
        steps,
        examples_of(trajectory),
        fit_settings,
        **kwargs,
    )


# --- independent references -----------------------------------------------------------------
def _block_order(model: nn.Module, blocks: list[LayerBlock]) -> torch.Tensor:
    """Permutation from the natural parameter vector (parameters concatenated in
    ``parameter_names`` order) to the blocks' layout (each block's matrix row-major)."""
    params = dict(model.named_parameters())
    index, start = {}, 0
    for name in parameter_names(blocks):
        size = params[name].numel()
        index[name] = torch.arange(start, start + size).reshape(params[name].shape)
        start += size
    return torch.cat([b.matrix(index).reshape(-1) for b in blocks])


def reference(
    kind: str, trajectory: Trajectory, blocks: list[LayerBlock], steps: Steps
) -> torch.Tensor:
    """mean over ``steps`` of the Gauss-Newton matrix (1/n) Σ_m J_mᵀ ∇²_z L J_m, or of the
    Hessian of the mean loss, from torch.func in float64, in the blocks' layout."""
    data = trajectory.train[examples_of(trajectory)].to(dtype=torch.float64)
    names = parameter_names(blocks)
    total = torch.zeros(())
    for step in steps:
        model = trajectory.build_model(step).double().eval()
        base = {k: v.detach() for k, v in model.named_parameters()}
        base.update(dict(model.named_buffers()))
        shapes = [base[name].shape for name in names]
        flat0 = torch.cat([base[name].reshape(-1) for name in names])

        def call(
            flat: torch.Tensor,
            x: torch.Tensor,
            model: nn.Module = model,
            base: dict[str, torch.Tensor] = base,
            shapes: list[torch.Size] = shapes,
        ) -> torch.Tensor:
            tensors, start = dict(base), 0
            for name, shape in zip(names, shapes, strict=True):
                tensors[name] = flat[start : start + shape.numel()].reshape(shape)
                start += shape.numel()
            return functional_call(model, tensors, (x,))

        if kind == "hessian":
            matrix = hessian(lambda f: trajectory.loss(call(f, data.inputs), data.targets).mean())(
                flat0
            )
        else:
            # Outputs of any shape (n, ...): an example's Jacobian is (outputs, P) and the
            # Hessian of its loss with respect to all its outputs at once (for a loss over
            # positions, the block-diagonal of its position-weighted Hessians).
            jac = jacrev(call)(flat0, data.inputs).reshape(len(data), -1, len(flat0))
            z = call(flat0, data.inputs).detach()
            matrix = torch.zeros(len(flat0), len(flat0), dtype=torch.float64)
            for i in range(len(z)):
                h_z = hessian(
                    lambda v, i=i: trajectory.loss(v[None], data.targets[i : i + 1]).sum()
                )(z[i]).reshape(jac.shape[1], jac.shape[1])
                matrix += jac[i].T @ h_z @ jac[i]
            matrix /= len(z)
        order = _block_order(model, blocks)
        total = total + matrix[order][:, order] / len(steps)
    return total


def factor_covariances(
    trajectory: Trajectory,
    blocks: list[LayerBlock],
    steps: Steps,
    fisher: str,
    random_state: int = 0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Ā = mean_c E[a aᵀ] (over positions) and S̄ = mean_c E[Σ_t Σ_variants s sᵀ], summed
    here directly from the collector's layer inputs and Fisher output gradients."""
    out = {b.name: [torch.zeros(()), torch.zeros(())] for b in blocks}
    for step in steps:
        model = model_at(trajectory, step, blocks, device=CPU, dtype=torch.float64)
        a_parts: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
        s_parts: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
        for batch in checkpoint_batches(
            model,
            blocks,
            trajectory.train,
            examples_of(trajectory),
            trajectory.loss,
            fisher=fisher,
            want_loss=False,
            noise=FisherNoise(fisher_seed(random_state, step)),
            batch_size=1000,
            device=CPU,
            dtype=torch.float64,
            step=step,
        ):
            for b in blocks:
                a_parts[b.name].append(batch.a[b.name])
                s_parts[b.name].append(torch.stack([v[b.name] for v in batch.fisher]))
        for b in blocks:
            a = torch.cat(a_parts[b.name]).flatten(0, 1)  # (n·T, d_in)
            s = torch.cat(s_parts[b.name], dim=1)  # (variants, n, T, d_out)
            n = s.shape[1]
            out[b.name][0] = out[b.name][0] + (a.T @ a / len(a)) / len(steps)
            s = s.flatten(0, 2)
            out[b.name][1] = out[b.name][1] + (s.T @ s / n) / len(steps)
    return {k: (v[0], v[1]) for k, v in out.items()}


# --- "exact" and "hessian" against torch.func -------------------------------------------------
DENSE_RUNS = [
    ("mlp_sgd", (1,), None),
    ("mlp_momentum", (1, 4, 7), None),
    ("mlp_sgd", (4,), ["2"]),
    ("conv", (0, 1), None),
    ("pooled", (1,), None),
    ("tokens", (0, 1), None),
]


@pytest.mark.parametrize("path", GAUSS_NEWTON_PATHS)
@pytest.mark.parametrize(("name", "steps", "modules"), DENSE_RUNS)
def test_exact_curvature_is_the_gauss_newton_matrix(
    name: str, steps: Steps, modules: Modules, path: str
) -> None:
    # Every form of the sum (by arithmetic, per-example Jacobians, Kronecker factors of
    # the blocks with dense inputs) against the reference.
    with gauss_newton_path(path):
        curvature = fit("exact", name, steps, modules)
    assert isinstance(curvature, DenseCurvature)
    trajectory = run(name)
    want = reference("gauss_newton", trajectory, blocks_of(trajectory, modules), steps)
    assert_dense_close(curvature.matrix, want)


@pytest.mark.parametrize(
    ("name", "steps", "modules"), [DENSE_RUNS[1], DENSE_RUNS[2], DENSE_RUNS[4], DENSE_RUNS[5]]
)
def test_hessian_curvature_is_the_hessian_of_the_mean_loss(
    name: str, steps: Steps, modules: Modules
) -> None:
    curvature = fit("hessian", name, steps, modules, fit_settings=settings(batch_size=5))
    trajectory = run(name)
    want = reference("hessian", trajectory, blocks_of(trajectory, modules), steps)
    # An embedding's padding row gets no gradient although the forward pass reads it, so
    # autograd's "Hessian" has a zero row there but not a zero column; DenseCurvature
    # holds the symmetric part (it is symmetric for every other model here).
    assert_dense_close(curvature.matrix, 0.5 * (want + want.T))


def test_gauss_newton_equals_the_hessian_for_linear_regression() -> None:
    trajectory = run("linear_gd")
    exact = fit("exact", "linear_gd", (1, 3))
    hess = fit("hessian", "linear_gd", (1, 3))
    # ½(wᵀx + b − y)² has Hessian x̃ x̃ᵀ with x̃ = (x, 1), whatever the parameters.
    x = trajectory.train.inputs.double()
    x_tilde = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    want = x_tilde.T @ x_tilde / len(x)
    assert_dense_close(exact.matrix, want)
    assert_dense_close(hess.matrix, want)


def test_dense_curvature_refuses_large_models() -> None:
    model = nn.Linear(200, 101)  # 20 301 parameters
    train = Examples(
        torch.zeros(2, 200, dtype=torch.float64), torch.zeros(2, 101, dtype=torch.float64)
    )
    trajectory = custom_trajectory(model, train, "squared_error", n_checkpoints=1)
    with pytest.raises(ValueError, match="20301 x 20301"):
        fit_curvature("exact", trajectory, blocks_of(trajectory), [0], np.arange(2), settings())


# --- EK-FAC, K-FAC and diagonal against the dense Gauss-Newton matrix ------------------------
EIGENBASIS_RUNS = [
    ("mlp_sgd", (1,), None),
    ("mlp_sgd", (1, 4, 7), None),
    ("mlp_sgd", (4,), ["2"]),
    ("conv", (0, 1), None),
    ("pooled", (0, 1), None),
    ("tokens", (0, 1), ["proj", "head"]),
]


@pytest.mark.parametrize(("name", "steps", "modules"), EIGENBASIS_RUNS)
def test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_its_basis(
    name: str, steps: Steps, modules: Modules
) -> None:
    ekfac = fit("ekfac", name, steps, modules)
    exact = fit("exact", name, steps, modules)
    slices = block_slices(ekfac.blocks)
    for b in ekfac.blocks:
        f = ekfac.factors[b.name]
        # Row-major vec of Q_Sᵀ G Q_A is (Q_S ⊗ Q_A)ᵀ vec G.
        q = torch.kron(f.q_s, f.q_a)
        block = exact.matrix[slices[b.name], slices[b.name]]
        want = torch.diagonal(q.T @ block @ q).reshape(b.d_out, b.d_in)
        torch.testing.assert_close(
            f.eigenvalues, want, rtol=0, atol=DENSE_RTOL * float(block.abs().max())
        )


@pytest.mark.parametrize(("name", "steps", "modules"), EIGENBASIS_RUNS)
def test_diagonal_curvature_is_the_gauss_newton_diagonal(
    name: str, steps: Steps, modules: Modules
) -> None:
    diagonal = fit("diagonal", name, steps, modules)
    exact = fit("exact", name, steps, modules)
    assert all(f.q_s is None and f.q_a is None for f in diagonal.factors.values())
    want = torch.diagonal(exact.matrix)
    got = torch.cat([diagonal.factors[b.name].eigenvalues.reshape(-1) for b in diagonal.blocks])
    torch.testing.assert_close(got, want, rtol=0, atol=DENSE_RTOL * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal"])
def test_embedding_blocks_get_the_gauss_newton_diagonal_whatever_the_kind(kind: str) -> None:
    # One-hot inputs: the block's curvature is E[G∘G] in parameter coordinates (the exact
    # Gauss-Newton diagonal with expected-Fisher targets); the other blocks keep the kind's
    # own form (EK-FAC eigenvalues in the Kronecker basis, and so on).
    curvature = fit(kind, "tokens", (0, 1))
    exact = fit("exact", "tokens", (0, 1))
    slices = block_slices(curvature.blocks)
    embed = curvature.factors["embed"]
    assert embed.q_s is None and embed.q_a is None
    block = exact.matrix[slices["embed"], slices["embed"]]
    want = torch.diagonal(block).reshape(4, 9)
    torch.testing.assert_close(
        embed.eigenvalues, want, rtol=0, atol=DENSE_RTOL * float(block.abs().max())
    )
    assert torch.all(embed.eigenvalues[:, 0] == 0)  # the padding row never moves
    others = [curvature.factors[name] for name in ("proj", "head")]
    assert all((f.q_s is None) is (kind == "diagonal") for f in others)


@pytest.mark.parametrize(
    ("name", "steps", "modules"), [EIGENBASIS_RUNS[1], EIGENBASIS_RUNS[3], EIGENBASIS_RUNS[4]]
)
def test_kfac_is_the_kronecker_product_of_the_averaged_factors(
    name: str, steps: Steps, modules: Modules
) -> None:
    trajectory = run(name)
    kfac = fit("kfac", name, steps, modules)
    covariances = factor_covariances(trajectory, kfac.blocks, steps, "expected")
    for b in kfac.blocks:
        a, s = covariances[b.name]
        f = kfac.factors[b.name]
        # Eigenvalues are the outer product of the factors' (clamped at 0, eigh's order).
        lam = torch.outer(
            torch.linalg.eigvalsh(s).clamp_min(0), torch.linalg.eigvalsh(a).clamp_min(0)
        )
        scale = float(lam.abs().max())
        # eigh is backward stable: eigenvalues within d·eps·‖M‖ for either computation.
        torch.testing.assert_close(f.eigenvalues, lam, rtol=0, atol=1e-12 * scale)
        assert_dense_close(block_dense(b, f), torch.kron(s, a))


@pytest.mark.parametrize("name", ["mlp_sgd", "conv"])
def test_ekfac_averages_the_covariances_before_the_eigendecomposition(name: str) -> None:
    trajectory = run(name)
    steps = (1, 4) if name == "mlp_sgd" else (0, 1)
    ekfac = fit("ekfac", name, steps)
    covariances = factor_covariances(trajectory, ekfac.blocks, steps, "expected")
    for b in ekfac.blocks:
        a, s = covariances[b.name]
        f = ekfac.factors[b.name]
        # One shared basis per segment: Q_A and Q_S diagonalise the *averaged* Ā and S̄.
        for q, m in ((f.q_a, a), (f.q_s, s)):
            rotated = q.T @ m @ q
            off = rotated - torch.diag(torch.diagonal(rotated))
            assert float(off.abs().max()) <= 1e-12 * float(m.abs().max())


@pytest.mark.parametrize("steps", [(0,), (1,), (0, 1)])
@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_kronecker_curvatures_are_exact_for_one_example_of_a_linear_model(
    kind: str, steps
) -> None:  # type: ignore[no-untyped-def]
    # One example through a Linear model: G_c = m_c aᵀ, so GN = (Σ_c m_c m_cᵀ) ⊗ a aᵀ = S ⊗ A,
    # and over checkpoints mean_c S_c ⊗ A = S̄ ⊗ A, the averaged-covariance K-FAC, exactly.
    curvature = fit(kind, "single_linear", steps)
    exact = fit("exact", "single_linear", steps)
    assert_dense_close(dense_matrix(curvature), exact.matrix)


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_kronecker_curvatures_are_exact_per_block_for_one_example(kind: str) -> None:
    curvature = fit(kind, "single_mlp", (1,))
    exact = fit("exact", "single_mlp", (1,))
    slices = block_slices(curvature.blocks)
    for b in curvature.blocks:
        want = exact.matrix[slices[b.name], slices[b.name]]
        assert_dense_close(block_dense(b, curvature.factors[b.name]), want)


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_kronecker_curvatures_are_exact_for_scalar_linear_regression(kind: str) -> None:
    # Scalar output, squared loss: s = 1 for every example, so GN = 1 ⊗ E[x̃ x̃ᵀ].
    curvature = fit(kind, "linear_gd", (1, 3))
    exact = fit("exact", "linear_gd", (1, 3))
    assert_dense_close(dense_matrix(curvature), exact.matrix)


def _empirical_fisher(
    trajectory: Trajectory, blocks: list[LayerBlock], steps: Steps
) -> torch.Tensor:
    """mean over steps of (1/n) Σ_m g_m g_mᵀ, g_m the per-example loss gradients."""
    fisher = torch.zeros(0)
    for step in steps:
        model = trajectory.build_model(step).double().eval()
        data = trajectory.train[examples_of(trajectory)].to(dtype=torch.float64)
        grads = []
        for i in range(len(data)):
            value = trajectory.loss(model(data.inputs[i : i + 1]), data.targets[i : i + 1]).sum()
            params = dict(model.named_parameters())
            names = parameter_names(blocks)
            g = dict(
                zip(names, torch.autograd.grad(value, [params[k] for k in names]), strict=True)
            )
            grads.append(torch.cat([b.matrix(g).reshape(-1) for b in blocks]))
        flat = torch.stack(grads)
        part = flat.T @ flat / len(flat) / len(steps)
        fisher = part if fisher.numel() == 0 else fisher + part
    return fisher


@pytest.mark.parametrize(("name", "steps"), [("mlp_sgd", (1, 4)), ("conv", (1,))])
def test_empirical_fisher_curvatures_use_the_loss_gradients(name: str, steps: Steps) -> None:
    # One output position per example: the per-example gradients' outer products,
    # exactly (tests/curvature/test_positions.py covers outputs with positions).
    trajectory = run(name)
    ekfac = fit("ekfac", name, steps, fit_settings=settings("empirical"))
    diagonal = fit("diagonal", name, steps, fit_settings=settings("empirical"))
    fisher = _empirical_fisher(trajectory, ekfac.blocks, steps)
    slices = block_slices(ekfac.blocks)
    for b in ekfac.blocks:
        f = ekfac.factors[b.name]
        q = torch.kron(f.q_s, f.q_a)
        block = fisher[slices[b.name], slices[b.name]]
        atol = DENSE_RTOL * float(block.abs().max())
        want = torch.diagonal(q.T @ block @ q).reshape(b.d_out, b.d_in)
        torch.testing.assert_close(f.eigenvalues, want, rtol=0, atol=atol)
        want = torch.diagonal(block).reshape(b.d_out, b.d_in)
        torch.testing.assert_close(diagonal.factors[b.name].eigenvalues, want, rtol=0, atol=atol)


def test_identity_curvature_needs_no_data() -> None:
    identity = fit("identity", "mlp_sgd", (1, 4))
    assert identity.kind == "identity"
    for b in identity.blocks:
        f = identity.factors[b.name]
        assert f.q_s is None and f.q_a is None
        assert torch.equal(f.eigenvalues, torch.ones(b.d_out, b.d_in, dtype=torch.float64))


# --- averaging over checkpoints -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "hessian", "diagonal"])
def test_curvature_over_two_checkpoints_is_the_average(kind: str) -> None:
    both = dense_matrix(fit(kind, "mlp_sgd", (1, 4)))
    first = dense_matrix(fit(kind, "mlp_sgd", (1,)))
    second = dense_matrix(fit(kind, "mlp_sgd", (4,)))
    assert_dense_close(both, (first + second) / 2)


# --- cached and uncached passes --------------------------------------------------------------
def _same_factors(x: EigenbasisCurvature, y: EigenbasisCurvature) -> bool:
    for name, f in x.factors.items():
        g = y.factors[name]
        for left, right in ((f.q_s, g.q_s), (f.q_a, g.q_a), (f.eigenvalues, g.eigenvalues)):
            if (left is None) != (right is None) or (
                left is not None and not torch.equal(left, right)
            ):
                return False
    return True


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal"])
@pytest.mark.parametrize("fisher", ["true", "expected", "empirical"])
def test_cached_and_uncached_fits_are_identical(kind: str, fisher: str) -> None:
    trajectory = run("mlp_two_stage")
    blocks = blocks_of(trajectory)
    steps, indices = (5, 6, 8), trajectory.stages[1].examples
    fit_settings = settings(fisher, batch_size=3)
    uncached = fit_curvature(
        kind, trajectory, blocks, steps, indices, fit_settings, budget=CacheBudget(0)
    )
    budget, cache = CacheBudget(10**9), LossCache()
    cached = fit_curvature(
        kind, trajectory, blocks, steps, indices, fit_settings, budget=budget, loss_cache=cache
    )
    # The same arithmetic on the same batches, whether kept in memory or recomputed.
    assert _same_factors(cached, uncached)
    assert sorted(cache.batches) == list(steps)
    # Fisher batches kept for the eigenvalue correction are given back; the loss cache stays.
    assert budget.used == cache.nbytes()


class TrackingBudget(CacheBudget):
    """A budget that records the most bytes it ever lent."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.peak = 0

    def take(self, nbytes: int) -> bool:
        granted = super().take(nbytes)
        self.peak = max(self.peak, self.used)
        return granted


@functools.cache
def _uncached_ekfac() -> EigenbasisCurvature:
    trajectory = run("mlp_sgd")
    return fit_curvature(
        "ekfac",
        trajectory,
        blocks_of(trajectory),
        (1, 4),
        examples_of(trajectory),
        settings("true", 4),
    )


@given(limit=st.integers(0, 12_000))
def test_the_loss_cache_is_filled_only_within_the_budget(limit: int) -> None:
    trajectory = run("mlp_sgd")
    blocks, indices = blocks_of(trajectory), examples_of(trajectory)
    budget, cache = TrackingBudget(limit), LossCache()
    curvature = fit_curvature(
        "ekfac",
        trajectory,
        blocks,
        (1, 4),
        indices,
        settings("true", 4),
        budget=budget,
        loss_cache=cache,
    )
    assert budget.peak <= limit
    assert budget.used == cache.nbytes() <= limit
    assert _same_factors(curvature, _uncached_ekfac())
    for step, batches in cache.batches.items():
        # A step is cached whole or not at all, with the training-loss gradients scoring needs.
        assert np.array_equal(np.sort(np.concatenate([b.indices for b in batches])), indices)
        source = TrainingGradients(
            trajectory, blocks, cache.batches, batch_size=4, device=CPU, dtype=torch.float64
        )
        stream = TrainingGradients(
            trajectory, blocks, None, batch_size=4, device=CPU, dtype=torch.float64
        )
        for (i_c, g_c), (i_s, g_s) in zip(
            source(step, indices), stream(step, indices), strict=True
        ):
            assert np.array_equal(i_c, i_s)
            assert all(torch.equal(g_c[k], g_s[k]) for k in g_s)


# --- invariances ---------------------------------------------------------------------------
def _min_relative_gap(m: torch.Tensor) -> float:
    lam = torch.linalg.eigvalsh(m)
    return float(lam.diff().min()) / float(lam.abs().max())


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal"])
def test_true_fisher_curvature_does_not_depend_on_the_batch_size(kind: str) -> None:
    trajectory = run("mlp_sgd")
    blocks, steps = blocks_of(trajectory), (1, 4)
    fits = [
        fit_curvature(
            kind, trajectory, blocks, steps, examples_of(trajectory), settings("true", size)
        )
        for size in (1, 5, 1000)
    ]
    covariances = factor_covariances(trajectory, blocks, steps, "true")
    for b in blocks:
        a, s = covariances[b.name]
        # Batching changes only summation orders: the covariances move by ≲ n·eps relative,
        # their eigenvectors by that over the relative eigengap (Davis-Kahan), and the
        # eigenvalues in the rotated basis by twice that (n = 12 examples).
        # (The diagonal has no eigenvectors to turn.)
        gaps = 1 / _min_relative_gap(a) + 1 / _min_relative_gap(s)
        rotation = 0.0 if kind == "diagonal" else 12 * EPS64 * gaps
        want = block_dense(b, fits[0].factors[b.name])
        for other in fits[1:]:
            got = block_dense(b, other.factors[b.name])
            torch.testing.assert_close(
                got, want, rtol=0, atol=4 * (rotation + 12 * EPS64) * float(want.abs().max())
            )


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal"])
def test_float32_fits_agree_with_float64_to_float32_precision(kind: str) -> None:
    trajectory = run("mlp_sgd")
    blocks, steps = blocks_of(trajectory), (1, 4)
    single = FitSettings(fisher="expected", batch_size=5, device=CPU, dtype=torch.float32)
    low = fit_curvature(kind, trajectory, blocks, steps, examples_of(trajectory), single)
    high = fit_curvature(kind, trajectory, blocks, steps, examples_of(trajectory), settings())
    covariances = factor_covariances(trajectory, blocks, steps, "expected")
    eps32 = float(np.finfo(np.float32).eps)
    for b in blocks:
        a, s = covariances[b.name]
        # float32 forward and backward passes and float32 Gram sums over n = 12 examples
        # move the covariances and per-example gradients by ≲ n·eps32 relative; the
        # eigenvectors turn by that over the relative eigengaps (Davis-Kahan).
        # The diagonal has no eigenvectors to turn.
        turn = 0.0 if kind == "diagonal" else 1 / _min_relative_gap(a) + 1 / _min_relative_gap(s)
        error = 12 * eps32 * (1 + turn)
        want = block_dense(b, high.factors[b.name])
        got = block_dense(b, low.factors[b.name])
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=4 * error * float(want.abs().max()))


def test_sampled_fisher_depends_on_the_random_state_only() -> None:
    again = fit("ekfac", "mlp_sgd", (1, 4), fit_settings=settings("true", 4))
    assert _same_factors(again, _uncached_ekfac())
    other = fit("ekfac", "mlp_sgd", (1, 4), fit_settings=settings("true", 4, random_state=1))
    assert not _same_factors(other, _uncached_ekfac())


# --- non-finite checkpoints --------------------------------------------------------------------
@functools.cache
def _diverged() -> Trajectory:
    """mlp_sgd with NaN parameters in the checkpoint at step 4."""
    trajectory = run("mlp_sgd")
    checkpoints = {s: trajectory.checkpoint(s) for s in trajectory.stored_steps}
    good = checkpoints[4]
    nan = {k: torch.full_like(v, float("nan")) for k, v in good.params.items()}
    checkpoints[4] = Checkpoint(4, nan, good.buffers, good.optimizer)
    return _cases.rebuild(trajectory, checkpoints=checkpoints)


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal"])
@pytest.mark.parametrize("fisher", ["true", "expected", "empirical"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_nan_checkpoints_raise_naming_the_step_or_layer(
    kind: str, fisher: str, with_cache: bool
) -> None:
    trajectory = _diverged()
    options = {"loss_cache": LossCache(), "budget": CacheBudget(10**8)} if with_cache else {}
    with pytest.raises(NonFiniteError, match=r"checkpoint step 4|of layer '[02]'"):
        fit_curvature(
            kind,
            trajectory,
            blocks_of(trajectory),
            (1, 4),
            examples_of(trajectory),
            settings(fisher),
            **options,
        )


@pytest.mark.parametrize("kind", ["exact", "hessian"])
def test_nan_checkpoints_make_dense_curvature_raise(kind: str) -> None:
    trajectory = _diverged()
    with pytest.raises(NonFiniteError):
        fit_curvature(
            kind, trajectory, blocks_of(trajectory), (1, 4), examples_of(trajectory), settings()
        )


@pytest.mark.parametrize("kind", ["exact", "hessian"])
def test_nan_checkpoints_in_dense_curvature_name_the_step(kind: str) -> None:
    trajectory = _diverged()
    with pytest.raises(NonFiniteError, match="step 4"):
        fit_curvature(
            kind, trajectory, blocks_of(trajectory), (1, 4), examples_of(trajectory), settings()
        )


@pytest.mark.parametrize("kind", CURVATURES)
def test_every_registered_kind_fits_a_curvature_with_the_whole_interface(kind: str) -> None:
    # The registry's contract, which a new kind meets by its fitter alone: a Curvature of
    # that kind over the blocks, whose every method answers per block in the blocks'
    # shapes, and whose carried form equals apply_many (up to one rotation and back).
    trajectory = run("mlp_sgd")
    blocks = blocks_of(trajectory)
    curvature = fit_curvature(
        kind, trajectory, blocks, (1, 4), examples_of(trajectory), settings("true", 5)
    )
    assert isinstance(curvature, Curvature) and curvature.kind == kind
    assert [b.name for b in curvature.blocks] == [b.name for b in blocks]
    shapes = {b.name: (b.d_out, b.d_in) for b in blocks}
    assert {k: tuple(v.shape) for k, v in curvature.diagonal().items()} == shapes
    assert set(curvature.mean_eigenvalues()) == set(shapes)
    g = torch.Generator().manual_seed(0)
    v = {k: torch.randn(2, *s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    fns = [Residual(0.3), Decay(0.3)]
    many = curvature.apply_many(fns, v, 1e-2)
    carried = curvature.apply_carried(fns, Carried(v), 1e-2)
    for want, got in zip(many, carried, strict=True):
        for name, w in want.items():
            assert w.shape == v[name].shape
            scale = float(w.abs().max())
            torch.testing.assert_close(got.in_parameters()[name], w, rtol=0, atol=1e-13 * scale)
    torch.testing.assert_close(curvature.apply(fns[0], v, 1e-2), many[0])
    assert type(curvature.to(CPU)) is type(curvature)
