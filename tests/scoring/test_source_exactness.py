"""SOURCE against exact unrolling where it must be exact, or where the gap is known exactly.

The runs start at a stationary point of every stage's update rule
(:func:`tests._cases.stationary_run`): a float64 linear model under full-batch training,
with targets chosen so that no stage moves the weights. Curvature, every example's
gradient and Adam's moments are then constant along the run, so SOURCE's assumptions
hold with several steps and several checkpoints per segment, any learning-rate schedule
and any number of segments, and the discrete form must equal exact unrolling to
rounding:

- SGD with coupled weight decay: δθ ← (I − η(H + λ))δθ − ηg/N exactly;
- Adam with β1 = 0 and coupled decay: the total gradient is 0, so v̂ = 0, P = 1/ε and
  m̂ = 0 (v's response is multiplied by m̂): preconditioned descent with a constant P;
- AdamW with β1 = β2 = 0: the gradient is a constant g ≠ 0, m̂ = g and v̂ = g², so the
  update g/(|g| + ε) responds to a gradient perturbation by ε/(|g| + ε)² =
  P (1 − m̂²/(v̂ + ε√v̂)): preconditioned descent with Adam's own response, a P that
  differs from one parameter to the next (``adam_response=True``);
- two stages with different optimisers, on overlapping examples;
- heavy-ball momentum (with dampening, or Nesterov) is not first-order descent: SOURCE
  models it by the effective rate η(1 − d)/(1 − β), and the difference from unrolling is
  the momentum transient, which the test computes per eigenvalue of the curvature by
  the scalar recursions of both updates and checks to rounding.

Tolerances: each score is a sum over P = k(d + 1) eigen-directions of products of T
scalar factors, and of n-term sums of gradients, all in float64: a forward error of a
small multiple of (P + n) T ε₆₄ of the scores' scale, times the ratio √(P̄_max/P̄_min)
that Adam's rescaling and its inverse can amplify a rounding by.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sourcekit import OptimizerSpec, SourceAttributor, UnrolledAttributor

from .. import _cases

EPS64 = float(np.finfo(np.float64).eps)


def source(**kwargs) -> SourceAttributor:  # type: ignore[no-untyped-def]
    defaults = {
        "damping": 0.0,
        "curvature": "exact",
        "matrix_function": "discrete",
        "dtype": "float64",
        "device": "cpu",
    }
    return SourceAttributor(**{**defaults, **kwargs})


def tolerance(exact: np.ndarray, run, steps: int, amplification: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    n, d = run.train.inputs.shape
    k = run.train.targets.shape[1]
    return 64 * (k * (d + 1) + n) * steps * amplification * EPS64 * np.abs(exact).max()


def preconditioner_range(attributor: SourceAttributor) -> float:
    """√(P̄_max / P̄_min) over the segments: how much the rescaling can amplify a rounding."""
    ratio = 1.0
    for model in attributor.state_.segments:
        if model.preconditioner is not None:
            p = torch.cat([t.reshape(-1) for t in model.preconditioner.values()])
            ratio = max(ratio, float((p.max() / p.min()).sqrt()))
    return ratio


OPTIMIZERS = {
    # name: (spec for a base learning rate η0 and the curvature's scale, adam_response)
    "sgd": (lambda lr: OptimizerSpec("sgd", lr=lr, weight_decay=0.1), False),
    "adam, beta2=0": (
        lambda lr: OptimizerSpec("adam", lr=lr, weight_decay=0.1, betas=(0.0, 0.0), eps=0.1),
        False,
    ),
    "adam, beta2=0.999": (
        lambda lr: OptimizerSpec("adam", lr=lr, weight_decay=0.05, betas=(0.0, 0.999), eps=0.1),
        False,
    ),
    "adamw, response": (
        lambda lr: OptimizerSpec("adamw", lr=lr, weight_decay=0.5, betas=(0.0, 0.0), eps=0.2),
        True,
    ),
}


def learning_rate(name: str, fraction: float, lam_max: float) -> float:
    """η with η P λ_max = fraction (P ≤ 1/ε under Adam), so that every factor 1 − ηPσ ∈ [0, 1)."""
    if name == "sgd":
        return fraction / (lam_max + 0.1)
    eps = 0.1 if name.startswith("adam,") else 0.2
    return fraction * eps / (lam_max + 0.5)


@given(
    optimizer=st.sampled_from(sorted(OPTIMIZERS)),
    n=st.integers(4, 9),
    d=st.integers(1, 3),
    k=st.integers(1, 2),
    steps=st.integers(2, 8),
    n_checkpoints=st.integers(1, 4),
    n_segments=st.integers(1, 4),
    schedule=st.sampled_from(["constant", "linear", "cosine"]),
    fraction=st.floats(0.05, 0.9),
    seed=st.integers(0, 10_000),
)
def test_discrete_source_equals_unrolling_at_a_stationary_point(
    optimizer, n, d, k, steps, n_checkpoints, n_segments, schedule, fraction, seed
):
    make, response = OPTIMIZERS[optimizer]
    # Under Adam a segment needs a checkpoint after the stage's first step (the first
    # checkpoint sits at step ⌊T / 2C⌋).
    n_checkpoints = max(1, min(n_checkpoints, steps if optimizer == "sgd" else steps // 2))

    def spec(lam_max: float) -> OptimizerSpec:
        return make(learning_rate(optimizer, fraction, lam_max))

    run, queries = _cases.stationary_run(
        n, d, k, [(spec, None, steps, schedule)], seed=seed, n_checkpoints=n_checkpoints
    )
    exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
    attributor = source(
        n_segments=min(n_segments, len(run.checkpoint_steps)), adam_response=response
    ).fit(run)
    approx = attributor.transform(queries)
    tol = tolerance(exact, run, steps, preconditioner_range(attributor))
    np.testing.assert_allclose(approx, exact, rtol=0, atol=tol)
    assert np.abs(exact).max() > 1e-3  # the scores are not trivially 0


def test_two_stages_with_different_optimisers_equal_unrolling():
    # SGD with coupled decay on examples 0..6, then AdamW (β1 = β2 = 0) on examples 3..9,
    # both stationary at the same weights for their own examples.
    sgd = OptimizerSpec("sgd", lr=0.2, weight_decay=0.1)
    adamw = OptimizerSpec("adamw", lr=0.04, weight_decay=0.5, betas=(0.0, 0.0), eps=0.2)
    run, queries = _cases.stationary_run(
        10,
        2,
        2,
        [(sgd, np.arange(0, 7), 5, "linear"), (adamw, np.arange(3, 10), 6, "cosine")],
        seed=3,
    )
    exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
    attributor = source(n_segments=4, adam_response=True).fit(run)
    approx = attributor.transform(queries)
    assert [run.stages[m.segment.stage].optimizer.kind for m in attributor.state_.segments] == [
        "sgd",
        "sgd",
        "adamw",
        "adamw",
    ]
    tol = tolerance(exact, run, run.n_steps, preconditioner_range(attributor))
    np.testing.assert_allclose(approx, exact, rtol=0, atol=tol)
    # examples of one stage only score through that stage alone, and differ from 0
    assert np.all(np.abs(exact[:, [0, 1, 2, 7, 8, 9]]) > 1e-6)


def test_adamw_without_adams_response_is_off_by_the_response():
    # In the same regime, holding v̂ fixed (the default) treats the update as m̂ P: it
    # ignores that the update g/(|g| + ε) saturates, and overstates every effect. With a
    # single parameter the whole run is a scalar recursion, so the two forms differ by a
    # known amount: SOURCE with P = 1/(|g| + ε) against unrolling with ε/(|g| + ε)².
    adamw = OptimizerSpec("adamw", lr=0.05, weight_decay=0.5, betas=(0.0, 0.0), eps=0.2)
    run, queries = _cases.stationary_run(6, 2, 1, [(adamw, None, 6, "constant")], seed=4)
    exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
    with_response = source(n_segments=2, adam_response=True).fit(run).transform(queries)
    without = source(n_segments=2, adam_response=False).fit(run).transform(queries)
    np.testing.assert_allclose(with_response, exact, rtol=0, atol=1e-12 * np.abs(exact).max())
    assert np.abs(without - exact).max() > 0.1 * np.abs(exact).max()


def heavy_ball_response(sigma: np.ndarray, lrs: np.ndarray, spec: OptimizerSpec) -> np.ndarray:
    """R(σ): δθ_T = −R(σ) φ for torch's SGD with momentum on the scalar problem
    δg = σ δθ + φ (δθ_0 = 0, unit forcing φ = 1), one value per σ."""
    beta, dampening = spec.momentum, spec.dampening
    theta = np.zeros_like(sigma)
    buffer = None
    for k, eta in enumerate(lrs):
        g = sigma * theta + 1.0
        buffer = g if k == 0 else beta * buffer + (1 - dampening) * g
        step = g + beta * buffer if spec.nesterov else buffer
        theta = theta - eta * step
    return -theta


def descent_response(sigma: np.ndarray, lrs: np.ndarray) -> np.ndarray:
    """The same for plain gradient descent: Σ_k η_k Π_{k'>k}(1 − η_{k'} σ)."""
    out = np.zeros_like(sigma)
    for eta in lrs:
        out = out * (1 - eta * sigma) + eta
    return out


@pytest.mark.parametrize(
    "spec",
    [
        OptimizerSpec("sgd", lr=0.05, momentum=0.7, dampening=0.3, weight_decay=0.1),
        OptimizerSpec("sgd", lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.1),
        OptimizerSpec("sgd", lr=0.05, momentum=0.9, weight_decay=0.1),
    ],
    ids=["dampening", "nesterov", "heavy-ball"],
)
def test_momentum_differs_from_unrolling_by_the_momentum_transient(spec):
    # At a stationary point the curvature H̃ = I_k ⊗ X̃ᵀX̃/N + λ and the forcing g_m/N are
    # constant, so unrolling gives −∇fᵀ R_HB(H̃) g_m / N, and SOURCE (discrete, any
    # segmentation) gives −∇fᵀ R_GD(H̃) g_m / N with the effective rates η(1 − d)/(1 − β).
    # Per eigenpair (σ_i, e_i) of H̃ the difference is −(∇fᵀe_i)(e_iᵀg_m)(R_GD − R_HB)(σ_i)/N.
    steps = 12
    run, queries = _cases.stationary_run(
        7, 2, 2, [(spec, None, steps, "cosine")], seed=5, n_checkpoints=4
    )
    exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
    approx = source(n_segments=3).fit(run).transform(queries)
    x = torch.cat([run.train.inputs, torch.ones(7, 1, dtype=torch.float64)], dim=1)
    q = torch.cat([queries.inputs, torch.ones(3, 1, dtype=torch.float64)], dim=1)
    sigma, vectors = torch.linalg.eigh(x.T @ x / 7)  # the curvature of every output row
    sigma = sigma.numpy() + spec.weight_decay
    params = run.checkpoint(0).params
    weights = torch.cat([params["weight"], params["bias"][:, None]], dim=1)
    residuals = x @ weights.T - run.train.targets  # (n, k): g_m = r_m x̃_mᵀ
    lrs = run.learning_rates
    # heavy ball accumulates (1 − d)/(1 − β) times the gradient in the long run
    effective = lrs * (1 - spec.dampening) / (1 - spec.momentum)
    gap = descent_response(sigma, effective) - heavy_ball_response(sigma, lrs, spec)
    # ∇f for output j of query q is e_j x̃_qᵀ: only row j of g_m meets it, so the score is
    # summed over the output rows j of (x̃_qᵀ e_i)(e_iᵀ x̃_m) r_mj.
    projected = (q @ vectors).numpy()[:, None, :] * (x @ vectors).numpy()[None, :, :]
    rows = residuals.sum(dim=1).numpy()  # Σ_j r_mj (the measurement sums the k outputs)
    predicted = -(projected * gap).sum(axis=2) * rows[None, :] / 7
    tol = tolerance(exact, run, steps)
    np.testing.assert_allclose(approx - exact, predicted, rtol=0, atol=tol)
    assert np.abs(predicted).max() > 100 * tol  # the transient is not negligible here
