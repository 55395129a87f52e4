"""Per-example gradients at a checkpoint: loss and measurement gradients against autograd,
Fisher targets that do not depend on batching, and the samplers and output-Hessian
factors of the built-in losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from torch import nn
from torch.func import hessian

from sourcekit import Examples
from sourcekit.exceptions import NonFiniteError, UnsupportedModuleError
from sourcekit.gradients import cross_entropy, margin, squared_error
from sourcekit.gradients._layers import LayerBlock, block_gradients, find_blocks
from sourcekit.gradients._per_example import (
    BatchFactors,
    FisherNoise,
    checkpoint_batches,
    measurement_gradients,
    model_at,
)

from .. import _cases
from .test_layers import (
    MODELS,
    assert_gradients_match,
    model_data,
    parameter_names,
    reference_gradients,
    split_all,
)

EPS64 = float(np.finfo(np.float64).eps)
CPU = torch.device("cpu")


def _batches(
    model: nn.Module,
    blocks: list[LayerBlock],
    data: Examples,
    indices: np.ndarray,
    loss: Callable,
    **kwargs: Any,
) -> list[BatchFactors]:
    options = {
        "fisher": None,
        "want_loss": True,
        "noise": None,
        "batch_size": 3,
        "device": CPU,
        "dtype": torch.float64,
        "step": 0,
    }
    options.update(kwargs)
    return list(checkpoint_batches(model, blocks, data, indices, loss, **options))


def _fisher_by_example(
    batches: list[BatchFactors], blocks: list[LayerBlock]
) -> dict[int, dict[str, torch.Tensor]]:
    """Each example's Fisher output gradients, keyed by its index."""
    out = {}
    for batch in batches:
        for row, i in enumerate(batch.indices.tolist()):
            out[i] = {b.name: batch.fisher[0][b.name][row] for b in blocks}
    return out


# --- model_at -----------------------------------------------------------------------------
def test_model_at_loads_the_checkpoint_in_eval_mode_with_only_block_gradients() -> None:
    trajectory = _cases.trajectory("mlp_sgd")
    blocks = find_blocks(trajectory.architecture.build(), modules=["2"])
    model = model_at(trajectory, 4, blocks, device=CPU, dtype=torch.float64)
    assert not any(m.training for m in model.modules())
    saved = trajectory.checkpoint(4).params
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64
        assert p.requires_grad is (name in ("2.weight", "2.bias"))
        assert torch.equal(p.detach(), saved[name].double())  # float32 -> float64 is exact
    with torch.no_grad():
        model[0].weight.add_(1.0)
    again = model_at(trajectory, 4, blocks, device=CPU, dtype=torch.float64)
    assert torch.equal(again[0].weight.detach(), saved["0.weight"].double())


# --- loss and measurement gradients equal autograd's -----------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_checkpoint_batches_loss_gradients_equal_autograd(name: str, batch_size: int) -> None:
    model, x, y = model_data(name)
    blocks = find_blocks(model)
    indices = np.array([4, 0, 6, 2, 1, 5, 3])  # not in order: the indices travel with batches
    batches = _batches(
        model, blocks, Examples(x, y), indices, cross_entropy, batch_size=batch_size
    )
    assert np.array_equal(np.concatenate([b.indices for b in batches]), indices)
    assert all(b.fisher == [] for b in batches)
    grads = {
        b.name: torch.cat(
            [block_gradients(batch.a, batch.loss, blocks)[b.name] for batch in batches]
        )
        for b in blocks
    }
    want = reference_gradients(
        model, cross_entropy, x[indices], y[indices], parameter_names(blocks)
    )
    assert_gradients_match(split_all(blocks, grads, model), want)


@pytest.mark.parametrize("name", list(MODELS))
def test_measurement_gradients_equal_autograd(name: str) -> None:
    model, x, y = model_data(name)
    blocks = find_blocks(model)
    got = measurement_gradients(
        model,
        blocks,
        Examples(x, y),
        margin,
        batch_size=3,
        device=CPU,
        dtype=torch.float64,
        step=0,
    )
    want = reference_gradients(model, margin, x, y, parameter_names(blocks))
    assert_gradients_match(split_all(blocks, got, model), want)


def test_measurement_gradients_of_a_trajectory_checkpoint() -> None:
    trajectory = _cases.trajectory("mlp_adam")
    queries = _cases.queries("mlp_adam", 5)
    blocks = find_blocks(trajectory.architecture.build())
    model = model_at(trajectory, 7, blocks, device=CPU, dtype=torch.float64)
    got = measurement_gradients(
        model,
        blocks,
        queries,
        trajectory.measurement,
        batch_size=2,
        device=CPU,
        dtype=torch.float64,
        step=7,
    )
    q = queries.to(dtype=torch.float64)
    want = reference_gradients(model, margin, q.inputs, q.targets, parameter_names(blocks))
    assert_gradients_match(split_all(blocks, got, model), want)


def test_empirical_fisher_uses_the_recorded_targets() -> None:
    model, x, y = model_data("mlp")
    blocks = find_blocks(model)
    batches = _batches(
        model, blocks, Examples(x, y), np.arange(7), cross_entropy, fisher="empirical"
    )
    for batch in batches:
        assert len(batch.fisher) == 1
        for b in blocks:
            assert torch.equal(batch.fisher[0][b.name], batch.loss[b.name])


@pytest.mark.parametrize("loss", [cross_entropy, squared_error])
def test_expected_fisher_output_gradients_factor_the_output_hessian(loss: Callable) -> None:
    model, x, y = model_data("mlp")
    target = y if loss is cross_entropy else torch.randn(len(x), 3, dtype=torch.float64)
    blocks = find_blocks(model)
    batches = _batches(model, blocks, Examples(x, target), np.arange(7), loss, fisher="expected")
    last = blocks[-1].name  # its outputs are the model's outputs: s_c = column c of M
    for batch in batches:
        assert len(batch.fisher) == 3  # one backward pass per output
        s = torch.stack([v[last][:, 0] for v in batch.fisher], dim=-1)  # (n, C, variants)
        logits = model(x[batch.indices]).detach()
        labels = target[batch.indices]
        for i in range(len(batch.indices)):
            h = hessian(lambda z, y=labels[i : i + 1]: loss(z[None], y).sum())(logits[i])
            # Σ_c s_c s_cᵀ = M Mᵀ: C products of entries ≤ 1, a few ulps each.
            torch.testing.assert_close(s[i] @ s[i].T, h, rtol=0, atol=8 * 3 * EPS64)


# --- Fisher noise: fixed per example --------------------------------------------------------
@given(
    order=st.permutations(list(range(23))),
    cuts=st.lists(st.integers(1, 22), max_size=6, unique=True),
    chunk=st.sampled_from([1, 4, 256]),
)
def test_fisher_noise_does_not_depend_on_batching(
    order: list[int], cuts: list[int], chunk: int
) -> None:
    shape = (2, 3)
    reference = FisherNoise(11, chunk=chunk).uniforms(np.arange(23), shape)
    noise = FisherNoise(11, chunk=chunk)  # one object reused across batches, as in a pass
    order_array = np.array(order)
    for part in np.split(order_array, sorted(cuts)):
        if len(part):
            assert torch.equal(noise.uniforms(part, shape), reference[part])


def test_fisher_noise_of_an_example_survives_calls_with_other_shapes() -> None:
    noise = FisherNoise(2, chunk=4)
    first = noise.uniforms(np.array([5, 1]), (3,))
    noise.uniforms(np.array([5, 9]), (2, 2))  # another output shape, chunks 1 and 2
    assert torch.equal(noise.uniforms(np.array([1, 5]), (3,)), first[[1, 0]])


def test_fisher_noise_is_uniform_float64_and_depends_on_the_seed() -> None:
    u = FisherNoise(3).uniforms(np.arange(600), (4,))
    assert u.dtype == torch.float64 and u.shape == (600, 4)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    other = FisherNoise(4).uniforms(np.arange(600), (4,))
    assert not torch.equal(u, other)
    # Mean of 2400 U(0, 1) draws: standard error (1/12/2400)^½ ≈ 0.0059; 6 of them.
    assert abs(float(u.mean()) - 0.5) < 6 * (1 / 12 / 2400) ** 0.5


@pytest.mark.parametrize(("name", "loss"), [("mlp", cross_entropy), ("sequence", cross_entropy)])
def test_true_fisher_output_gradients_do_not_depend_on_the_batch_size(
    name: str, loss: Callable
) -> None:
    model, x, y = model_data(name, n=9)
    blocks = find_blocks(model)
    data = Examples(x, y)
    indices = np.array([8, 3, 0, 5, 1, 7, 2, 6, 4])
    results = []
    for batch_size in (1, 3, 7, 1000):
        batches = _batches(
            model,
            blocks,
            data,
            indices,
            loss,
            fisher="true",
            want_loss=False,
            noise=FisherNoise(5),
            batch_size=batch_size,
        )
        results.append(_fisher_by_example(batches, blocks))
    for other in results[1:]:
        for i in indices.tolist():
            for b in blocks:
                # Same sampled targets, so the same gradients up to the summation order of
                # batched matrix products (~width·eps); a different label would move them by O(1).
                torch.testing.assert_close(
                    other[i][b.name], results[0][i][b.name], rtol=1e-13, atol=1e-13
                )


def test_true_fisher_regression_targets_do_not_depend_on_the_batch_size() -> None:
    g = torch.Generator().manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    data = Examples(torch.randn(9, 3, generator=g, dtype=torch.float64), torch.zeros(9, 2))
    blocks = find_blocks(model)
    indices = np.arange(9)[::-1].copy()
    results = []
    for batch_size in (1, 4, 1000):
        batches = _batches(
            model,
            blocks,
            data,
            indices,
            squared_error,
            fisher="true",
            want_loss=False,
            noise=FisherNoise(5),
            batch_size=batch_size,
        )
        results.append(_fisher_by_example(batches, blocks))
    for other in results[1:]:
        for i in indices.tolist():
            for b in blocks:
                torch.testing.assert_close(
                    other[i][b.name], results[0][i][b.name], rtol=1e-13, atol=1e-13
                )


# --- the samplers of the built-in losses --------------------------------------------------------
def test_categorical_sampler_draws_from_the_softmax() -> None:
    logits = torch.tensor(
        [[1.0, -0.5, 2.0, 0.0, -3.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    n = 100_000
    g = torch.Generator().manual_seed(0)
    shape = cross_entropy.noise_shape(tuple(logits.shape))
    assert shape == (2,)  # one uniform per position, not one per class
    u = torch.rand(n, *shape, generator=g, dtype=torch.float64)
    draws = cross_entropy.sample_targets(logits.expand(n, *logits.shape), u)
    assert draws.shape == (n, 2)
    probs = torch.softmax(logits, dim=-1)
    # Pearson's statistic of a correct sampler is asymptotically χ² with C − 1 = 4 degrees
    # of freedom; the seeded draw exceeds its 1 − 1e-9 quantile with probability 1e-9.
    threshold = stats.chi2.ppf(1 - 1e-9, df=4)
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=5).double()
        expected = n * probs[row]
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < threshold, (row, counts, expected)


def test_categorical_sampler_never_draws_a_class_of_zero_probability() -> None:
    # exp(-1000) underflows to 0: classes 0, 2 and 4 have probability exactly zero, also
    # at the extremes of the noise (0 and the largest double below 1).
    logits = torch.tensor([-1000.0, 0.0, -1000.0, 0.0, -1000.0], dtype=torch.float64)
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 2**-53], dtype=torch.float64)
    draws = cross_entropy.sample_targets(logits.expand(5, 5), u)
    assert draws.tolist() == [1, 1, 3, 3, 3]


def test_categorical_sampler_on_sequences_draws_per_position() -> None:
    logits = torch.randn(4, 6, 3, dtype=torch.float64)
    u = torch.rand(4, 6, dtype=torch.float64)
    draws = cross_entropy.sample_targets(logits, u)
    assert draws.shape == (4, 6)
    flat = cross_entropy.sample_targets(logits.reshape(24, 3), u.reshape(24))
    assert torch.equal(draws.reshape(24), flat)


def test_a_loss_without_noise_shape_gets_noise_shaped_like_its_outputs() -> None:
    seen = []

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(outputs, targets)

    def sample(outputs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(uniforms.shape))
        return uniforms.argmax(dim=-1)

    loss.sample_targets = sample  # type: ignore[attr-defined]
    model = nn.Sequential(nn.Linear(4, 3)).double()
    blocks = find_blocks(model)
    data = Examples(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    batches = _batches(
        model,
        blocks,
        data,
        np.arange(10),
        loss,
        fisher="true",
        want_loss=False,
        noise=FisherNoise(0),
        batch_size=4,
    )
    assert [len(b.fisher) for b in batches] == [1, 1, 1]
    assert seen == [(4, 3), (4, 3), (2, 3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gaussian_sampler_has_mean_f_and_unit_variance(dtype: torch.dtype) -> None:
    n = 100_000
    means = torch.tensor([-2.0, 0.5, 10.0], dtype=dtype)
    g = torch.Generator().manual_seed(1)
    u = torch.rand(n, 3, generator=g, dtype=torch.float64)
    draws = squared_error.sample_targets(means.expand(n, 3), u)
    assert draws.dtype == dtype and draws.shape == (n, 3)
    noise = draws.double() - means.double()
    # Standard errors: of the mean 1/√n, of the variance √(2/n) for a normal; six of each.
    # (float32 rounds the draws of mean 10 by ≤ 5e-7, far below both.)
    assert (noise.mean(0).abs() < 6 / n**0.5).all()
    assert ((noise.var(0) - 1).abs() < 6 * (2 / n) ** 0.5).all()


# --- output-Hessian factors ----------------------------------------------------------------
def test_softmax_hessian_factor_reproduces_the_cross_entropy_hessian() -> None:
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,), generator=g)
    root = cross_entropy.output_hessian_sqrt(logits)
    assert root.shape == (6, 5, 5)
    for i in range(6):
        h = hessian(lambda z, i=i: cross_entropy(z[None], labels[i : i + 1]).sum())(logits[i])
        # Entries ≤ 1/4 built from C = 5 products each: within a few ulps on both sides.
        torch.testing.assert_close(root[i] @ root[i].T, h, rtol=0, atol=8 * 5 * EPS64)


def test_squared_error_hessian_factor_is_the_identity() -> None:
    outputs = torch.randn(4, 3, dtype=torch.float64)
    targets = torch.randn(4, 3, dtype=torch.float64)
    root = squared_error.output_hessian_sqrt(outputs)
    assert root.shape == (4, 3, 3)
    for i in range(4):
        h = hessian(lambda z, i=i: squared_error(z[None], targets[i : i + 1]).sum())(outputs[i])
        assert torch.equal(root[i] @ root[i].T, h)  # ½‖z − y‖² has Hessian I exactly


# --- errors ----------------------------------------------------------------------------
def _plain_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy(outputs, targets)


@pytest.mark.parametrize(
    ("fisher", "words"),
    [("true", "sample_targets"), ("expected", "output_hessian_sqrt")],
)
def test_fisher_targets_need_the_losses_helpers(fisher: str, words: str) -> None:
    model, x, y = model_data("mlp")
    with pytest.raises(ValueError, match=words):
        _batches(
            model, find_blocks(model), Examples(x, y), np.arange(7), _plain_loss, fisher=fisher
        )


def test_expected_fisher_with_positions_needs_the_losses_position_weights() -> None:
    model, x, y = model_data("sequence")
    with pytest.raises(ValueError, match="per_position"):
        _batches(
            model,
            find_blocks(model),
            Examples(x, y),
            np.arange(7),
            _sequence_loss_without_positions,
            fisher="expected",
        )


def _sequence_loss_without_positions(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy(outputs, targets)


_sequence_loss_without_positions.output_hessian_sqrt = cross_entropy.output_hessian_sqrt  # type: ignore[attr-defined]


def test_non_finite_losses_and_measurements_name_the_checkpoint_step() -> None:
    model, x, y = model_data("mlp")
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    blocks = find_blocks(model)
    with pytest.raises(NonFiniteError, match="training losses at checkpoint step 5"):
        _batches(model, blocks, Examples(x, y), np.arange(7), cross_entropy, step=5)
    with pytest.raises(NonFiniteError, match="measurement gradients at checkpoint step 8"):
        measurement_gradients(
            model,
            blocks,
            Examples(x, y),
            margin,
            batch_size=3,
            device=CPU,
            dtype=torch.float64,
            step=8,
        )


class _SharedPositions(nn.Module):
    """A position embedding looked up once for the whole batch and broadcast over it."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1])[None]  # (1, T): one row for every example
        return self.head((x + self.pos(positions)).mean(dim=1))


def test_a_layer_whose_input_is_shared_by_the_batch_is_refused() -> None:
    model = _SharedPositions().double()
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    data = Examples(x, torch.randint(0, 3, (5,)))
    with pytest.raises(UnsupportedModuleError, match=r"'pos' received inputs for 1 example"):
        _batches(model, find_blocks(model), data, np.arange(5), cross_entropy)
    with pytest.raises(UnsupportedModuleError, match="modules="):
        measurement_gradients(
            model,
            find_blocks(model),
            data,
            margin,
            batch_size=5,
            device=CPU,
            dtype=torch.float64,
            step=0,
        )
    blocks = find_blocks(model, modules=["head"])  # excluded: the other layers work
    assert len(_batches(model, blocks, data, np.arange(5), cross_entropy)) == 2
