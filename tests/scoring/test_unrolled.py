"""Exact unrolling against retraining (finite differences) and against METHOD.md's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from sourcekit import Examples, Trajectory, TrajectoryRecorder
from sourcekit.exceptions import TrajectoryError
from sourcekit.scoring import unrolled_scores
from sourcekit.trajectory._replay import replay

from .. import _cases

EPS64 = float(np.finfo(np.float64).eps)


def _retrained_measurements(
    trajectory: Trajectory, queries: Examples, weights: torch.Tensor
) -> torch.Tensor:
    """f(z_q, θ_T(w)): rerun the recorded recipe with example weights w, in float64."""
    params, buffers = replay(trajectory, weights=weights, dtype=torch.float64)
    model = trajectory.architecture.build().to(torch.float64).eval()
    q = queries.to(dtype=torch.float64)
    outputs = functional_call(model, {**params, **buffers}, (q.inputs,))
    return trajectory.measurement(outputs, q.targets).detach()


@pytest.mark.parametrize("name", _cases.CASE_NAMES)
def test_unrolled_scores_match_finite_differences_of_retraining(name: str) -> None:
    assert_finite_differences(_cases.trajectory(name), _cases.queries(name))


def _fine_tuning_run(feature: str) -> Trajectory:
    """A user loop (6 steps of 4 of 12 examples) with one fine-tuning feature, recorded."""
    data = _cases.classification_data(12, seed=0)
    torch.manual_seed(0)
    model = _cases.make_dropout_mlp() if feature == "dropout" else _cases.make_tanh_mlp()
    if feature == "groups and a frozen layer":
        model[0].bias.requires_grad_(False)  # frozen: the layer's weight trains, not its bias
        optimizer = torch.optim.SGD(
            [
                {"params": [model[0].weight], "lr": 0.2, "momentum": 0.5},
                {"params": model[2].parameters(), "lr": 0.4, "weight_decay": 0.1},
            ]
        )
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    recorder = TrajectoryRecorder(model, data, checkpoint_every=2)
    with recorder.stage(optimizer):
        for start in range(0, 24, 4):
            idx = torch.arange(start, start + 4) % 12
            optimizer.zero_grad()
            F.cross_entropy(model(data.inputs[idx]), data.targets[idx]).backward()
            if feature == "clipping":
                recorder.clip_grad_norm_(0.2)
            optimizer.step()
            recorder.step(idx)
    return recorder.finish()


@pytest.mark.parametrize("feature", ["dropout", "clipping", "groups and a frozen layer"])
def test_unrolled_scores_of_fine_tuning_runs_match_finite_differences(feature: str) -> None:
    # The replay draws the recorded dropout masks, differentiates through the clip, and
    # follows the groups and the frozen parameter: the derivative of what it computes.
    trajectory = _fine_tuning_run(feature)
    if feature == "clipping":
        assert np.all(trajectory.clipping.coefficient < 1)
    assert_finite_differences(trajectory, _cases.classification_data(4, seed=1))


def assert_finite_differences(trajectory: Trajectory, queries: Examples) -> None:
    scores = unrolled_scores(trajectory, queries)  # (n_queries, n_train), float64
    n = trajectory.n_train
    ones = torch.ones(n, dtype=torch.float64)
    f0 = _retrained_measurements(trajectory, queries, ones)
    h = 1e-3

    def central(m: int, step: float) -> torch.Tensor:
        e = torch.zeros(n, dtype=torch.float64)
        e[m] = step
        plus = _retrained_measurements(trajectory, queries, ones + e)
        minus = _retrained_measurements(trajectory, queries, ones - e)
        return (plus - minus) / (2 * step)

    for m in range(n):
        d_h, d_2h = central(m, h), central(m, 2 * h)
        # Tolerance, derived rather than tuned. The central difference of a smooth f is
        # D(h) = f'(1) + c h² + O(h⁴), so D(2h) − D(h) = 3 c h² + O(h⁴): the truncation
        # error of D(h) is |D(2h) − D(h)| / 3 up to O(h⁴), and twice that bounds it with
        # room for the O(h⁴) terms (Richardson). Rounding: each f is a float64 replay of T
        # steps whose reductions have at most n terms, so it carries an absolute error of at
        # most T·n·eps64·max(1, |f|); the difference quotient divides two of them by 2h.
        truncation = 2 * (d_2h - d_h).abs() / 3
        rounding = trajectory.n_steps * n * EPS64 * f0.abs().clamp(min=1.0) / h
        tolerance = truncation + rounding
        # The bound is informative: far below the scores' size, so a wrong score fails.
        assert float(tolerance.max()) < 1e-4 * float(scores.abs().max())
        error = (scores[:, m] - d_h).abs()
        assert torch.all(error <= tolerance), (m, error, tolerance)


def _closed_form(trajectory: Trajectory, queries: Examples) -> np.ndarray:
    """METHOD.md section 3 for a linear model, squared loss and full-batch GD, in float64:

        τ[q, m] = −∇f(z_q)ᵀ Σ_k Π_{k'=T−1..k+1} (I − η_{k'} H) (η_k/N) ∇L(z_m, θ_k)

    with features x̃ = (x, 1), θ = (weight, bias), H = X̃ᵀX̃/N, ∇L(z_m, θ) = x̃_m (x̃_mᵀθ − y_m)
    and ∇f(z_q) = x̃_q for the "output" measurement.
    """
    x = trajectory.train.inputs.double().numpy()
    y = trajectory.train.targets.double().numpy()[:, 0]
    n = x.shape[0]
    xt = np.hstack([x, np.ones((n, 1))])
    hessian = xt.T @ xt / n
    initial = trajectory.checkpoint(0).params
    theta = np.concatenate(
        [initial["weight"].double().numpy()[0], initial["bias"].double().numpy()]
    )
    eye = np.eye(xt.shape[1])
    total = np.zeros((xt.shape[1], n))  # dθ_T/dw_m, one column per training example
    for eta in trajectory.learning_rates:
        residual = xt @ theta - y
        per_example = xt.T * residual  # ∇L(z_m, θ_k), one column per example
        total = (eye - eta * hessian) @ total - (eta / n) * per_example
        theta = theta - eta * per_example.mean(axis=1)
    q = np.hstack([queries.inputs.double().numpy(), np.ones((len(queries), 1))])
    return q @ total


def test_unrolled_scores_equal_the_closed_form_for_linear_regression() -> None:
    trajectory = _cases.trajectory("linear_gd")
    assert all(b.size == trajectory.n_train for b in trajectory.batches)  # full batch
    assert len(set(trajectory.learning_rates)) > 1  # a schedule, not one learning rate
    queries = _cases.queries("linear_gd", 5)
    scores = unrolled_scores(trajectory, queries).numpy()
    expected = _closed_form(trajectory, queries)
    # Both sides evaluate the same finite sum of T = 6 terms in float64, in different
    # orders; with ‖I − ηH‖ ≤ 1 here the rounding stays within a few hundred eps64 of the
    # largest term, so 1e-12 relative to the scores' size leaves ample room.
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert np.abs(expected).max() > 1e-2  # the scores are not trivially zero


def test_closed_form_unrolled_by_hand_from_the_recorded_schedule() -> None:
    # The recursion above equals the product form of METHOD.md, written out directly.
    trajectory = _cases.trajectory("linear_gd")
    queries = _cases.queries("linear_gd", 2)
    x = np.hstack([trajectory.train.inputs.double().numpy(), np.ones((8, 1))])
    y = trajectory.train.targets.double().numpy()[:, 0]
    hessian = x.T @ x / 8
    initial = trajectory.checkpoint(0).params
    theta = np.concatenate(
        [initial["weight"].double().numpy()[0], initial["bias"].double().numpy()]
    )
    thetas = []
    for eta in trajectory.learning_rates:
        thetas.append(theta)
        theta = theta - eta * (x.T * (x @ theta - y)).mean(axis=1)
    lrs = trajectory.learning_rates
    T = len(lrs)
    q = np.hstack([queries.inputs.double().numpy(), np.ones((2, 1))])
    expected = np.zeros((2, 8))
    for k in range(T):
        product = np.eye(4)
        for k2 in range(T - 1, k, -1):
            product = product @ (np.eye(4) - lrs[k2] * hessian)
        grads = x.T * (x @ thetas[k] - y)
        expected -= q @ product @ grads * (lrs[k] / 8)
    np.testing.assert_allclose(_closed_form(trajectory, queries), expected, rtol=1e-12, atol=0)


def test_a_trajectory_without_batches_is_refused() -> None:
    trajectory = _cases.rebuild(_cases.trajectory("mlp_sgd"), batches=None)
    with pytest.raises(
        TrajectoryError,
        match=r"has no batch indices\. Record the run with TrajectoryRecorder \(recorder\.step\(indices\) after every optimizer step\) or with sourcekit\.train",
    ):
        unrolled_scores(trajectory, _cases.queries("mlp_sgd"))


@given(st.integers(1, 9), st.sampled_from(["mlp_adam", "mlp_two_stage", "linear_sgd"]))
def test_query_blocks_do_not_change_the_scores(block: int, name: str) -> None:
    trajectory = _cases.trajectory(name)
    queries = _cases.queries(name, 7)
    one = unrolled_scores(trajectory, queries, query_batch_size=1)
    blocked = unrolled_scores(trajectory, queries, query_batch_size=block)
    # The same float64 backward pass, vectorised over a different number of rows: only the
    # summation order of a few dozen terms differs, so 1e-13 relative is generous.
    torch.testing.assert_close(blocked, one, rtol=0, atol=1e-13 * float(one.abs().max()))


def test_float32_scores_are_float64_scores_rounded() -> None:
    trajectory = _cases.trajectory("mlp_momentum")
    queries = _cases.queries("mlp_momentum")
    exact = unrolled_scores(trajectory, queries)
    single = unrolled_scores(trajectory, queries, dtype=torch.float32)
    assert single.dtype == torch.float32
    # float32 replay of T = 9 steps: a few roundings of eps32 per step relative to the
    # parameters, carried linearly into the scores; 8·T·eps32 relative to the scale.
    tolerance = 8 * trajectory.n_steps * float(np.finfo(np.float32).eps) * float(exact.abs().max())
    torch.testing.assert_close(single.double(), exact, rtol=0, atol=tolerance)


def test_an_example_outside_every_batch_has_zero_score() -> None:
    trajectory = _cases.trajectory("mlp_two_stage")
    # Rebuild with example 11 never used: drop it from the fine-tuning batches.
    batches = [b[b != 11] if 11 in b else b for b in trajectory.batches]
    assert all(b.size for b in batches)
    changed = _cases.rebuild(trajectory, batches=batches)
    scores = unrolled_scores(changed, _cases.queries("mlp_two_stage"))
    assert torch.all(scores[:, 11] == 0)
    assert torch.all(scores[:, :11].abs().sum(dim=0) > 0)
