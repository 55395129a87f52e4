"""The built-in losses and measurements.

Losses as torch defines them (mse_loss, CrossEntropy with class weights and label
smoothing): each loss is checked against torch's own function, and its curvature
attributes against the Hessian of the loss with respect to the outputs (the Gauss-Newton
matrix is formed from it): the expected Fisher exactly, the true Fisher in expectation
over the sampled labels, computed exactly by enumerating the classes. Class targets
outside the outputs are refused by every built-in that reads class indices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from sourcekit import Examples
from sourcekit.curvature import fit_curvature
from sourcekit.gradients._layers import find_blocks
from sourcekit.gradients._per_example import _fisher_totals, position_weights
from sourcekit.objectives import (
    IGNORE_INDEX,
    LOSSES,
    CrossEntropy,
    cross_entropy,
    function_spec,
    margin,
    mse_loss,
    resolve_function,
)

from .curvature.test_fit import assert_dense_close, custom_trajectory, reference, settings

EPS64 = float(np.finfo(np.float64).eps)
WEIGHTS = [0.5, 2.0, 1.0]


def _logits(n: int = 5, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- class targets are indices of the outputs ---------------------------------------------
@pytest.mark.parametrize(
    "objective", [cross_entropy, margin, CrossEntropy(WEIGHTS, label_smoothing=0.1)]
)
def test_class_targets_outside_the_outputs_are_refused(objective) -> None:  # type: ignore[no-untyped-def]
    logits = torch.zeros(4, 3)
    for bad in (3, -1):
        with pytest.raises(
            ValueError,
            match=rf"class target is {bad}, outside \[0, 3\) for outputs with 3 classes \(example 2\)",
        ):
            objective(logits, torch.tensor([0, 2, bad, 1]))
    # sequences: the ignore index is not a class, but it is allowed
    sequence = torch.zeros(2, 4, 3)
    targets = torch.tensor([[0, 1, IGNORE_INDEX, 2], [2, IGNORE_INDEX, 1, 0]])
    assert objective(sequence, targets).shape == (2,)
    with pytest.raises(ValueError, match=r"class target is 5, .*\(example 0, position 1\)"):
        objective(sequence, targets.masked_fill(targets == 1, 5))


# --- the values are torch's -------------------------------------------------------------
def test_mse_loss_is_torchs_mean_of_squares() -> None:
    outputs, targets = _logits(6, 4), _logits(6, 4, seed=1)
    # The same sum in another order: equal up to the rounding of 24 terms.
    torch.testing.assert_close(
        mse_loss(outputs, targets).mean(), F.mse_loss(outputs, targets), rtol=32 * EPS64, atol=0
    )
    sequences, targets = _logits(6, 12).reshape(6, 3, 4), _logits(6, 12, seed=1).reshape(6, 3, 4)
    torch.testing.assert_close(
        mse_loss(sequences, targets).mean(),
        F.mse_loss(sequences, targets),
        rtol=32 * EPS64,
        atol=0,
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.2},
        {"weight": WEIGHTS},
        {"weight": WEIGHTS, "label_smoothing": 0.1},
    ],
)
def test_cross_entropy_is_torchs(options: dict[str, Any]) -> None:
    logits, labels = _logits(), torch.tensor([0, 1, 2, 1, 0])
    torch_options = {
        k: torch.tensor(v, dtype=torch.float64) if k == "weight" else v for k, v in options.items()
    }
    want = F.cross_entropy(logits, labels, reduction="none", **torch_options)
    torch.testing.assert_close(CrossEntropy(**options)(logits, labels), want, rtol=0, atol=0)
    # Sequences: the mean over each example's counted positions; ignored ones add nothing.
    sequence = _logits(8, 3).reshape(2, 4, 3)
    targets = torch.tensor([[0, 1, IGNORE_INDEX, 2], [1, 1, 0, IGNORE_INDEX]])
    per_position = F.cross_entropy(
        sequence.reshape(8, 3), targets.reshape(8), reduction="none", **torch_options
    ).reshape(2, 4)
    torch.testing.assert_close(CrossEntropy(**options)(sequence, targets), per_position.sum(1) / 3)


def test_the_default_cross_entropy_is_the_plain_one() -> None:
    logits, labels = _logits(), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(CrossEntropy()(logits, labels), cross_entropy(logits, labels))
    assert CrossEntropy().spec() == "cross_entropy"


# --- naming: saved manifests and torch's loss objects ------------------------------------------
def test_a_parameterised_cross_entropy_is_named_by_its_description() -> None:
    loss = CrossEntropy(weight=WEIGHTS, label_smoothing=0.1)
    spec = function_spec(loss, LOSSES)
    assert spec == {"name": "cross_entropy", "weight": WEIGHTS, "label_smoothing": 0.1}
    assert resolve_function(spec, LOSSES, "loss") == loss


def test_torch_loss_objects_are_read_as_the_built_ins() -> None:
    assert resolve_function(nn.MSELoss(), LOSSES, "loss") is mse_loss
    assert resolve_function(nn.CrossEntropyLoss(), LOSSES, "loss") == CrossEntropy()
    assert resolve_function(
        nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS), reduction="none"), LOSSES, "loss"
    ) == CrossEntropy(weight=WEIGHTS)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (nn.MSELoss(reduction="sum"), r"MSELoss\(reduction='sum'\).*batch size times"),
        (
            nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS)),
            r"class weights and reduction='mean', which divides each batch's loss by the batch's "
            r"total class weight.*reduction='none'\)\.mean\(\)",
        ),
        (nn.CrossEntropyLoss(ignore_index=0), r"ignore_index=0; sourcekit's losses .* -100"),
    ],
)
def test_torch_losses_of_another_objective_are_refused(module: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_function(module, LOSSES, "loss")


def test_bad_cross_entropy_settings() -> None:
    with pytest.raises(ValueError, match=r"'label_smoothing' parameter of CrossEntropy"):
        CrossEntropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"'weight' .* must be >= 0 for every class; got -1\.0"):
        CrossEntropy(weight=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"has 2 class weights but the model has 3 outputs"):
        CrossEntropy(weight=[1.0, 1.0])(_logits(), torch.zeros(5, dtype=torch.long))


# --- curvature: the Fisher is the loss's Gauss-Newton matrix ------------------------------------
CURVATURE_LOSSES = [
    CrossEntropy(label_smoothing=0.2),
    CrossEntropy(weight=WEIGHTS),
    CrossEntropy(weight=WEIGHTS, label_smoothing=0.1),
    "mse_loss",
]


def _hessian_of(loss: Any, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example, ∇²_z L(z, y) by torch.func: shape (n, C, C)."""
    fn = resolve_function(loss, LOSSES, "loss")
    return torch.stack(
        [
            hessian(lambda z, i=i: fn(z[None], targets[i : i + 1]).sum())(outputs[i])
            for i in range(len(outputs))
        ]
    )


@pytest.mark.parametrize("loss", CURVATURE_LOSSES, ids=repr)
def test_the_expected_fisher_is_the_gauss_newton_matrix(loss: Any) -> None:
    # curvature="exact" forms Σ_m J_mᵀ M_m M_mᵀ J_m from the loss's per-position weights and
    # output Hessian factor; reference() differentiates the loss itself with torch.func.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    if loss == "mse_loss":
        targets: torch.Tensor = torch.randn(7, 3, generator=g, dtype=torch.float64)
    else:
        targets = torch.randint(0, 3, (7,), generator=g)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    trajectory = custom_trajectory(model, Examples(x, targets), loss)
    blocks = find_blocks(trajectory.architecture.build())
    examples = np.arange(trajectory.n_train)
    exact = fit_curvature("exact", trajectory, blocks, (0, 1), examples, settings("expected"))
    assert_dense_close(exact.matrix, reference("gauss_newton", trajectory, blocks, (0, 1)))


@pytest.mark.parametrize("loss", CURVATURE_LOSSES[:3], ids=repr)
def test_the_true_fishers_expectation_is_the_output_hessian(loss: CrossEntropy) -> None:
    # With labels drawn from the model (inverse transform sampling of one uniform), the
    # true Fisher's output gradients s satisfy E[s sᵀ] = ∇²_z L: enumerate the classes
    # with their probabilities (a uniform in the middle of each class's interval).
    logits = _logits(4, 3).requires_grad_(True)
    labels = torch.tensor([0, 2, 1, 1])
    weights = position_weights(loss, logits, labels)
    p = torch.softmax(logits.detach(), dim=1)
    cumulative = p.cumsum(dim=1)
    expected = torch.zeros(4, 3, 3, dtype=torch.float64)
    for c in range(3):
        middle = cumulative[:, c] - p[:, c] / 2
        (total,) = _fisher_totals(
            loss, "true", logits, labels, weights, lambda shape, middle=middle: middle
        )
        (s,) = torch.autograd.grad(total, logits)
        expected += p[:, c, None, None] * s[:, :, None] * s[:, None, :]
    want = _hessian_of(loss, logits.detach(), labels)
    torch.testing.assert_close(expected, want, rtol=0, atol=64 * EPS64)


def test_smoothed_labels_would_bias_the_true_fisher() -> None:
    # The test above can fail: scoring the drawn labels with the smoothed loss itself
    # (no fisher_loss) gives (1 − ε)² of the Hessian plus a rank-one term.
    class NoPlainLoss(CrossEntropy):
        fisher_loss = None  # type: ignore[assignment]

    loss = NoPlainLoss(label_smoothing=0.2)
    loss.fisher_loss = loss  # type: ignore[misc]
    logits = _logits(4, 3).requires_grad_(True)
    labels = torch.tensor([0, 2, 1, 1])
    p = torch.softmax(logits.detach(), dim=1)
    expected = torch.zeros(4, 3, 3, dtype=torch.float64)
    for c in range(3):
        middle = p.cumsum(dim=1)[:, c] - p[:, c] / 2
        (total,) = _fisher_totals(
            loss, "true", logits, labels, None, lambda shape, middle=middle: middle
        )
        (s,) = torch.autograd.grad(total, logits)
        expected += p[:, c, None, None] * s[:, :, None] * s[:, None, :]
    want = _hessian_of(CrossEntropy(label_smoothing=0.2), logits.detach(), labels)
    assert float((expected - want).abs().max()) > 0.01
