"""TracIn against the first-order "no propagation" sum and against exact unrolling of one step.

Under full-batch gradient descent with plain SGD and a checkpoint at every step, the
recorded run is θ_{k+1} = θ_k − (η_k/N) Σ_i ∇L(z_i, θ_k), and TracIn is by definition the
sum of each step's first-order effect measured where it was taken:

    τ[q, m] = −Σ_k (η_k/N) ∇f(z_q, θ_k)ᵀ ∇L(z_m, θ_k).

For one step, exact unrolling gives −(η/N) ∇f(z_q, θ_1)ᵀ ∇L(z_m, θ_0): the two agree
exactly when ∇f does not depend on θ (a linear model measured by its output), and
otherwise differ by exactly the change of the query gradient over the step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sourcekit
from sourcekit import (
    Examples,
    OptimizerSpec,
    TracInAttributor,
    TrainingStage,
    Trajectory,
    UnrolledAttributor,
)
from sourcekit.scoring._tracin import tracin_checkpoints

from .. import _cases
from .test_similarity import reference_gradients
from .test_source import make_linear64, make_tanh_mlp64, regression64

EPS64 = float(np.finfo(np.float64).eps)
CPU64 = {"device": "cpu", "dtype": "float64"}


def full_batch_gd(
    data: Examples, factory, lr: float, steps: int, *, schedule: str = "constant", **functions
) -> Trajectory:  # type: ignore[no-untyped-def]
    """Plain full-batch gradient descent with a checkpoint at every step."""
    stage = TrainingStage(
        OptimizerSpec("sgd", lr=lr),
        epochs=steps,
        batch_size=len(data),
        n_checkpoints=steps,
        schedule=schedule,
    )
    return sourcekit.train(factory, data, [stage], progress=False, **functions)


def reference_tracin(
    run: Trajectory, queries: Examples, terms: list[tuple[int, float, np.ndarray, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """−Σ_c (η_c/N_c) ∇f(θ_c)ᵀ∇L(θ_c) over (step, η_c, stage examples, N_c), and the sum of
    |products| that bounds the rounding of any evaluation order."""
    scores = torch.zeros(len(queries), run.n_train, dtype=torch.float64)
    magnitude = torch.zeros_like(scores)
    for step, lr, examples, n in terms:
        g_q = reference_gradients(run, step, queries, "measurement")
        g_m = reference_gradients(run, step, run.train[examples], "loss")
        scores[:, examples] -= lr / n * (g_q @ g_m.T)
        magnitude[:, examples] += lr / n * (g_q.abs() @ g_m.abs().T)
    return scores, magnitude


def test_tracin_is_the_no_propagation_sum_of_full_batch_gradient_descent():
    data = _cases.classification_data(10, 3)
    data = Examples(data.inputs.double(), data.targets)
    run = full_batch_gd(
        data,
        make_tanh_mlp64,
        0.5,
        4,
        schedule="linear",
        loss="cross_entropy",
        measurement="margin",
    )
    assert run.checkpoint_steps == (0, 1, 2, 3)
    assert len(set(run.learning_rates.tolist())) == 4  # each checkpoint needs its own η_k
    queries = _cases.classification_data(4, 4)
    scores = TracInAttributor(**CPU64).fit(run).transform(queries)
    all_examples = np.arange(run.n_train)
    expected, magnitude = reference_tracin(
        run, queries, [(k, float(run.learning_rates[k]), all_examples, 10) for k in range(4)]
    )
    # Both sides sum 31-parameter float64 dot products over 4 checkpoints, with gradients
    # from two routes (hooks; plain autograd), each a few operations deep: the difference
    # is a small multiple of (P + C) eps times the sum of |terms|.
    tolerance = 8 * (31 + 4) * EPS64 * magnitude
    assert np.all(np.abs(scores - expected.numpy()) <= tolerance.numpy())


@given(
    n=st.integers(2, 9),
    d=st.integers(1, 4),
    lr=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
)
def test_one_step_tracin_equals_exact_unrolling_for_a_linear_measurement(n, d, lr, seed):
    # f = θᵀx̃_q has the same gradient x̃_q at θ_0 and θ_1, so both are −(η/n) x̃_qᵀ∇L(z_m, θ_0).
    data = regression64(n, d, seed)
    run = full_batch_gd(
        data, lambda: make_linear64(d), lr, 1, loss="squared_error", measurement="output"
    )
    queries = regression64(3, d, seed + 1)
    exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
    tracin = TracInAttributor(**CPU64).fit(run).transform(queries)
    # One (d + 1)-term product, after an n-term sum inside the unrolled backward pass:
    # a small multiple of (d + 1 + n) eps per unit of scale.
    tol = 16 * (d + 1 + n) * EPS64 * max(1.0, np.abs(exact).max())
    np.testing.assert_allclose(tracin, exact, rtol=0, atol=tol)


def test_one_step_tracin_measures_the_query_before_the_step():
    # Unrolling one step gives −(η/N)∇f(θ_1)ᵀ∇L(θ_0); TracIn −(η/N)∇f(θ_0)ᵀ∇L(θ_0).
    data = _cases.classification_data(8, 5)
    data = Examples(data.inputs.double(), data.targets)
    run = full_batch_gd(data, make_tanh_mlp64, 0.7, 1, loss="cross_entropy", measurement="margin")
    queries = _cases.classification_data(3, 6)
    g_m = reference_gradients(run, 0, run.train, "loss")
    before = -0.7 / 8 * reference_gradients(run, 0, queries, "measurement") @ g_m.T
    after = -0.7 / 8 * reference_gradients(run, 1, queries, "measurement") @ g_m.T
    exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
    tracin = TracInAttributor(**CPU64).fit(run).transform(queries)
    # 31-term float64 dot products computed by two routes: a few hundred eps of scale.
    tol = 1e3 * EPS64 * float(after.abs().max())
    np.testing.assert_allclose(exact, after.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(tracin, before.numpy(), rtol=0, atol=tol)
    assert np.abs(exact - tracin).max() > 1e3 * tol  # the difference is real


def test_checkpoints_stand_for_their_steps_and_stages():
    # pretrain: steps 0..5 on examples 0..7, SGD momentum 0.5 (factor 2), lr 0.2, checkpoints
    # 1, 3, 5; finetune: steps 6..9 on examples 4..11, Adam (factor 1), lr 0.02, checkpoints
    # 6, 8, 9, which split the stage at ⌈(6 + 8)/2⌉ = 7 and ⌈(8 + 9)/2⌉ = 9.
    run = _cases.trajectory("mlp_two_stage")
    terms = tracin_checkpoints(run)
    assert [(t.step, t.stage, t.start, t.end, t.n_examples) for t in terms] == [
        (1, 0, 0, 2, 8),
        (3, 0, 2, 4, 8),
        (5, 0, 4, 6, 8),
        (6, 1, 6, 7, 8),
        (8, 1, 7, 9, 8),
        (9, 1, 9, 10, 8),
    ]
    expected_lr = [2 * 0.4, 2 * 0.4, 2 * 0.4, 0.02, 0.04, 0.02]
    np.testing.assert_allclose([t.learning_rate for t in terms], expected_lr, rtol=1e-12)
    uncorrected = tracin_checkpoints(run, momentum_correction=False)
    np.testing.assert_allclose(
        [t.learning_rate for t in uncorrected], [0.4, 0.4, 0.4, 0.02, 0.04, 0.02], rtol=1e-12
    )

    queries = _cases.queries("mlp_two_stage")
    scores = TracInAttributor(**CPU64).fit(run).transform(queries)
    stage_examples = [np.arange(0, 8), np.arange(4, 12)]
    expected, magnitude = reference_tracin(
        run,
        queries,
        [
            (t.step, lr, stage_examples[t.stage], 8)
            for t, lr in zip(terms, expected_lr, strict=True)
        ],
    )
    tolerance = 8 * (38 + 6) * EPS64 * magnitude  # as in the full-batch test
    assert np.all(np.abs(scores - expected.numpy()) <= tolerance.numpy())


@pytest.mark.parametrize("name", ["mlp_momentum", "mlp_adam"])
def test_momentum_correction_scales_by_the_heavy_ball_factor(name):
    run = _cases.trajectory(name)
    queries = _cases.queries(name)
    corrected = TracInAttributor(**CPU64).fit(run).transform(queries)
    plain = TracInAttributor(momentum_correction=False, **CPU64).fit(run).transform(queries)
    factor = run.stages[0].optimizer.effective_lr_factor  # 1/(1 − 0.9) = 10; Adam: 1
    # the factor multiplies each term's weight: a few float64 roundings per term.
    np.testing.assert_allclose(corrected, factor * plain, rtol=1e-13, atol=0)
