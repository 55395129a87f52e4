"""Curvature of models whose outputs have positions (sequence models), against a dense
Gauss-Newton matrix computed here independently.

For a per-example loss L = Σ_t w_t ℓ_t over output positions t (a mean over the counted
positions: w_t = 1/T_counted, 0 where the target is the ignore index), the objective's
Gauss-Newton matrix is mean_m Σ_t w_t J_tᵀ ∇²ℓ_t J_t. The reference below takes the
Hessian of the whole per-example loss with respect to all its outputs (which is that
block-diagonal, weights included) and the Jacobian from torch.func: it never uses the
loss's ``per_position`` description, so it checks it too.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from sourcekit import Examples, Trajectory
from sourcekit.curvature import DenseCurvature, EigenbasisCurvature, fit_curvature
from sourcekit.curvature._gauss_newton import GAUSS_NEWTON_PATHS, gauss_newton_path
from sourcekit.objectives import IGNORE_INDEX, cross_entropy

from ..gradients.test_layers import parameter_names, sequence_mlp
from .test_fit import (
    DENSE_RTOL,
    _block_order,
    assert_dense_close,
    blocks_of,
    custom_trajectory,
    examples_of,
    reference,
    settings,
)
from .test_objects import block_slices, dense_matrix

Kind = str


class CausalMean(nn.Module):
    """Position t sees the mean of the positions up to t: outputs mix positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counts = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
        return x.cumsum(dim=1) / counts[:, None]


def token_lm(vocabulary: int = 8, width: int = 6) -> nn.Module:
    """Embedding → tanh → Linear at every position: next-token logits (n, T, vocabulary)."""
    return nn.Sequential(nn.Embedding(vocabulary, width), nn.Tanh(), nn.Linear(width, vocabulary))


def causal_lm(vocabulary: int = 6, width: int = 4) -> nn.Module:
    """Embedding → Linear → tanh → causal mean → Linear: every output depends on earlier tokens."""
    return nn.Sequential(
        nn.Embedding(vocabulary, width),
        nn.Linear(width, width),
        nn.Tanh(),
        CausalMean(),
        nn.Linear(width, vocabulary),
    )


class TiedLM(nn.Module):
    """Embedding → Linear → tanh → causal mean → the embedding table again, transposed, as
    the output layer (tied weights): one parameter read by two layers."""

    def __init__(self, vocabulary: int = 6, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocabulary, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(CausalMean()(torch.tanh(self.mix(self.embed(tokens)))))


def masked_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """½‖z_t − y_t‖² averaged over the counted positions.

    The targets carry one more channel than the outputs: 1 where the position counts,
    0 where it is ignored (targets shaped like the outputs, as Fisher targets drawn
    from the model are, count everywhere).
    """
    values, weights = _masked_per_position(outputs, targets)
    return (values * weights).sum(dim=1)


def _masked_per_position(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if targets.shape[-1] == outputs.shape[-1]:
        counted = torch.ones(targets.shape[:-1], dtype=torch.bool, device=targets.device)
    else:
        counted, targets = targets[..., -1] > 0, targets[..., :-1]
    diff = torch.where(counted[..., None], outputs - targets, 0.0)
    values = 0.5 * diff.pow(2).sum(dim=-1)
    weights = counted.to(outputs.dtype)
    return values, weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


def _gaussian_targets(outputs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    return outputs.detach() + torch.special.ndtri(uniforms.clamp(1e-12, 1 - 1e-12)).to(outputs)


def _identity_root(outputs: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(outputs.shape[-1], dtype=torch.float64)
    return eye.expand(*outputs.shape, outputs.shape[-1])


masked_squared_error.per_position = _masked_per_position  # type: ignore[attr-defined]
masked_squared_error.sample_targets = _gaussian_targets  # type: ignore[attr-defined]
masked_squared_error.output_hessian_sqrt = _identity_root  # type: ignore[attr-defined]


def _ignore_some(targets: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Padding at the end of some sequences, and one example with no counted position."""
    targets = targets.clone()
    lengths = torch.randint(1, targets.shape[1] + 1, (len(targets),), generator=g)
    for i, length in enumerate(lengths.tolist()):
        targets[i, length:] = IGNORE_INDEX
    targets[-1] = IGNORE_INDEX
    return targets


@functools.cache
def run(name: str) -> Trajectory:
    """Seeded float64 runs (checkpoints are random states; curvature reads them only)."""
    g = torch.Generator().manual_seed(11)
    if name in ("token_lm", "token_lm_ignored", "token_lm_t1"):
        positions = 1 if name == "token_lm_t1" else 5
        tokens = torch.randint(0, 8, (7, positions), generator=g)
        targets = torch.randint(0, 8, (7, positions), generator=g)
        if name == "token_lm_ignored":
            targets = _ignore_some(targets, g)
        return custom_trajectory(token_lm(), Examples(tokens, targets), "cross_entropy")
    if name == "causal_lm":
        tokens = torch.randint(0, 6, (6, 4), generator=g)
        targets = _ignore_some(torch.randint(0, 6, (6, 4), generator=g), g)
        return custom_trajectory(causal_lm(), Examples(tokens, targets), "cross_entropy")
    if name == "causal_lm_next_token":  # the labels are the inputs, padded at the end
        tokens = torch.randint(0, 6, (6, 4), generator=g)
        labels = _ignore_some(tokens, g)
        return custom_trajectory(causal_lm(), Examples(tokens, labels), "next_token_cross_entropy")
    if name == "tied_lm":
        tokens = torch.randint(0, 6, (6, 4), generator=g)
        labels = _ignore_some(tokens, g)
        return custom_trajectory(TiedLM(), Examples(tokens, labels), "next_token_cross_entropy")
    if name == "sequence_mlp":
        x = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
        targets = _ignore_some(torch.randint(0, 3, (6, 4), generator=g), g)
        return custom_trajectory(sequence_mlp(), Examples(x, targets), "cross_entropy")
    if name == "masked_regression":  # one Linear layer, masked mean squared error
        x = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
        y = torch.randn(6, 5, 2, generator=g, dtype=torch.float64)
        counted = torch.ones(6, 5, 1, dtype=torch.float64)
        counted[:3, 3:] = 0.0
        counted[0, 1:] = 0.0
        targets = torch.cat([y, counted], dim=-1)
        return custom_trajectory(nn.Linear(3, 2), Examples(x, targets), masked_squared_error)
    raise KeyError(name)


SEQUENCE_RUNS = [
    "token_lm",
    "token_lm_ignored",
    "token_lm_t1",
    "causal_lm",
    "causal_lm_next_token",
    "tied_lm",
    "sequence_mlp",
]


def fit(kind: Kind, name: str, fisher: str = "expected", random_state: int = 0, steps=(0, 1)):  # type: ignore[no-untyped-def]
    trajectory = run(name)
    return fit_curvature(
        kind,
        trajectory,
        blocks_of(trajectory),
        steps,
        examples_of(trajectory),
        settings(fisher, batch_size=4, random_state=random_state),
    )


@functools.cache
def gauss_newton(name: str) -> torch.Tensor:
    trajectory = run(name)
    return reference("gauss_newton", trajectory, blocks_of(trajectory), (0, 1))


# --- the dense kinds, the diagonal and EK-FAC with the expected Fisher: rounding -----------------
@pytest.mark.parametrize("path", GAUSS_NEWTON_PATHS)
@pytest.mark.parametrize("name", SEQUENCE_RUNS)
def test_exact_curvature_is_the_gauss_newton_matrix_of_the_mean_loss(name: str, path: str) -> None:
    with gauss_newton_path(path):
        exact = fit("exact", name)
    assert isinstance(exact, DenseCurvature)
    assert_dense_close(exact.matrix, gauss_newton(name))


@pytest.mark.parametrize("name", ["token_lm_ignored", "causal_lm"])
def test_hessian_curvature_is_the_hessian_of_the_mean_loss(name: str) -> None:
    trajectory = run(name)
    want = reference("hessian", trajectory, blocks_of(trajectory), (0, 1))
    assert_dense_close(fit("hessian", name).matrix, 0.5 * (want + want.T))


@pytest.mark.parametrize("name", SEQUENCE_RUNS)
def test_diagonal_curvature_is_the_gauss_newton_diagonal(name: str) -> None:
    diagonal = fit("diagonal", name)
    want = torch.diagonal(gauss_newton(name))
    got = torch.cat([diagonal.factors[b.name].eigenvalues.reshape(-1) for b in diagonal.blocks])
    torch.testing.assert_close(got, want, rtol=0, atol=DENSE_RTOL * float(want.abs().max()))


@pytest.mark.parametrize("name", SEQUENCE_RUNS)
def test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_its_basis(name: str) -> None:
    ekfac = fit("ekfac", name)
    assert isinstance(ekfac, EigenbasisCurvature)
    matrix = gauss_newton(name)
    slices = block_slices(ekfac.blocks)
    for b in ekfac.blocks:
        f = ekfac.factors[b.name]
        block = matrix[slices[b.name], slices[b.name]]
        q = torch.eye(b.n_params, dtype=torch.float64)
        if f.q_s is not None:  # (embedding blocks keep the diagonal, in parameter coordinates)
            q = torch.kron(f.q_s, f.q_a)
        want = torch.diagonal(q.T @ block @ q).reshape(b.d_out, b.d_in)
        torch.testing.assert_close(
            f.eigenvalues, want, rtol=0, atol=DENSE_RTOL * float(block.abs().max())
        )


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_curvatures_are_exact_for_a_linear_layer_under_a_masked_squared_error(
    kind: Kind,
) -> None:
    # s_t = √w_t M e_c with M = I: S = mean_m Σ_t w_t I, and Ā = Σ w a aᵀ / Σ w, so
    # Ā ⊗ S = mean_m Σ_t w_t a_t a_tᵀ ⊗ I, the Gauss-Newton matrix exactly, padding
    # included (a uniform average over positions would count the ignored ones).
    curvature = fit(kind, "masked_regression")
    assert_dense_close(dense_matrix(curvature), gauss_newton("masked_regression"))


# --- sampled Fisher targets: unbiased at the objective's scale -----------------------------------
def _seed_draws(kind: Kind, name: str, fisher: str, seeds: int) -> torch.Tensor:
    """The fitted curvature's diagonal for each seed of the sampled targets: (seeds, P)."""
    return torch.stack(
        [dense_matrix(fit(kind, name, fisher, random_state=r)).diagonal() for r in range(seeds)]
    )


def _seed_average(
    kind: Kind, name: str, fisher: str, seeds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over seeds of the fitted diagonal, and the standard error of that mean."""
    draws = _seed_draws(kind, name, fisher, seeds)
    return draws.mean(dim=0), draws.std(dim=0) / seeds**0.5


def _assert_within_sampling_error(
    mean: torch.Tensor, error: torch.Tensor, want: torch.Tensor
) -> None:
    # Each entry is a mean of independent, identically distributed draws (the seeds'
    # targets are independent): by the central limit theorem it lies within 5 standard
    # errors of its expectation except with probability ~6e-7 per entry; rounding adds
    # ≤ 1e-12 of the largest entry. A curvature T times too small is far outside.
    bound = 5 * error + DENSE_RTOL * float(want.abs().max())
    excess = (mean - want).abs() - bound
    assert float(excess.max()) <= 0, f"largest excess {float(excess.max()):.3g}"


@pytest.mark.parametrize(
    "name", ["token_lm", "token_lm_ignored", "causal_lm", "causal_lm_next_token"]
)
def test_true_fisher_diagonal_averages_to_the_gauss_newton_diagonal(name: str) -> None:
    mean, error = _seed_average("diagonal", name, "true", seeds=200)
    _assert_within_sampling_error(mean, error, torch.diagonal(gauss_newton(name)))


def test_true_fisher_has_the_scale_of_the_objective() -> None:
    # The measurement of the bug this guards against: with 5 positions the per-example
    # gradient of the mean loss gave a Fisher about 5 times too small. Per block, the
    # total of the sampled diagonal is a mean of independent per-seed totals: within 5
    # standard errors of the dense total.
    draws = _seed_draws("diagonal", "token_lm", "true", seeds=200)
    want = torch.diagonal(gauss_newton("token_lm"))
    trajectory = run("token_lm")
    for name, part in block_slices(blocks_of(trajectory)).items():
        totals = draws[:, part].sum(dim=1)
        error = float(totals.std()) / len(totals) ** 0.5
        assert abs(float(totals.mean()) - float(want[part].sum())) <= 5 * error, name


def _per_position_empirical_fisher(name: str) -> torch.Tensor:
    """mean over checkpoints and examples of Σ_t w_t (J_tᵀ ∇ℓ_t)(J_tᵀ ∇ℓ_t)ᵀ, ℓ_t at the
    recorded targets (the cross-position terms left out), from torch.func."""
    trajectory = run(name)
    blocks = blocks_of(trajectory)
    names = parameter_names(blocks)
    data = trajectory.train.to(dtype=torch.float64)
    total = torch.zeros(())
    for step in (0, 1):
        model = trajectory.build_model(step).double().eval()
        base = {k: v.detach() for k, v in model.named_parameters()}
        shapes = [base[k].shape for k in names]
        flat0 = torch.cat([base[k].reshape(-1) for k in names])

        def call(flat: torch.Tensor, model=model, base=base, shapes=shapes) -> torch.Tensor:  # type: ignore[no-untyped-def]
            tensors, start = dict(base), 0
            for k, shape in zip(names, shapes, strict=True):
                tensors[k] = flat[start : start + shape.numel()].reshape(shape)
                start += shape.numel()
            return functional_call(model, tensors, (data.inputs,))

        jac = jacrev(call)(flat0)  # (n, T, C, P)
        logits = call(flat0).detach()
        probs = logits.softmax(dim=-1)
        targets = data.targets
        counted = targets != IGNORE_INDEX
        weights = counted.double() / counted.sum(dim=1, keepdim=True).clamp_min(1)
        onehot = torch.nn.functional.one_hot(targets.clamp_min(0), probs.shape[-1]).double()
        dlogits = probs - onehot  # ∇ℓ_t with respect to position t's logits
        per_position = torch.einsum("ntc,ntcp->ntp", dlogits, jac)
        matrix = torch.einsum("nt,ntp,ntq->pq", weights, per_position, per_position)
        order = _block_order(model, blocks)
        total = total + (matrix / len(data))[order][:, order] / 2
    return total


@pytest.mark.parametrize("name", ["token_lm_ignored", "causal_lm"])
def test_empirical_fisher_averages_to_the_per_position_empirical_fisher(name: str) -> None:
    mean, error = _seed_average("diagonal", name, "empirical", seeds=200)
    _assert_within_sampling_error(
        mean, error, torch.diagonal(_per_position_empirical_fisher(name))
    )


def test_empirical_fisher_with_one_position_is_the_per_example_outer_product() -> None:
    # T = 1: no sign is drawn, the pass is the training loss's own, and every seed agrees.
    first = fit("diagonal", "token_lm_t1", "empirical", random_state=0)
    other = fit("diagonal", "token_lm_t1", "empirical", random_state=1)
    want = _per_position_empirical_fisher("token_lm_t1").diagonal()
    got = dense_matrix(first).diagonal()
    torch.testing.assert_close(got, want, rtol=0, atol=DENSE_RTOL * float(want.abs().max()))
    assert torch.equal(got, dense_matrix(other).diagonal())


def test_one_position_sequences_have_the_curvature_of_plain_classification() -> None:
    # Outputs (n, 1, C) with targets (n, 1) and outputs (n, C) with targets (n,) are the
    # same problem: the same curvature for every kind that reads the Fisher.
    trajectory = run("token_lm_t1")
    flat = custom_trajectory(
        _Squeeze(token_lm()),
        Examples(trajectory.train.inputs, trajectory.train.targets[:, 0]),
        "cross_entropy",
    )
    for kind in ("exact", "ekfac"):
        ours = dense_matrix(fit(kind, "token_lm_t1"))
        theirs = dense_matrix(
            fit_curvature(
                kind, flat, blocks_of(flat), (0, 1), np.arange(7), settings(batch_size=4)
            )
        )
        assert_dense_close(ours, theirs)


class _Squeeze(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[:, 0]


def test_the_loss_of_ignored_positions_and_examples_is_zero() -> None:
    logits = torch.randn(2, 3, 4, dtype=torch.float64)
    targets = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX] * 3])
    values = cross_entropy(logits, targets)
    want = torch.nn.functional.cross_entropy(logits[0, [0, 2]], targets[0, [0, 2]])
    torch.testing.assert_close(values[0], want)
    assert float(values[1]) == 0.0
