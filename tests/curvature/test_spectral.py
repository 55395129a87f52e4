"""Spectral functions of METHOD.md section 4 against high-precision references."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sourcekit.curvature._spectral import (
    Decay,
    DiscreteDecay,
    DiscreteResidual,
    Inverse,
    Residual,
)

EPS64 = float(np.finfo(np.float64).eps)
SWITCH = 1e-3  # |sσ| below which Residual uses its Taylor series

PRECISION = 80  # decimal digits of the references: exact far beyond float64


def _t(values: object) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def _exact_residual(s: float, sigma: float) -> float:
    """(1 − exp(−sσ))/σ of the float64 inputs, rounded once from 80-digit arithmetic."""
    with localcontext() as ctx:
        ctx.prec = PRECISION
        x = Decimal(s) * Decimal(sigma)
        if abs(x) < Decimal("0.5"):
            # s·Σ_k (−x)^k/(k+1)!: 40 terms leave < 0.5^40/41! ≈ 1e-62 (no cancellation).
            total, term = Decimal(0), Decimal(1)
            for k in range(40):
                total += term
                term *= -x / (k + 2)
            return float(Decimal(s) * total)
        return float((1 - (-x).exp()) / Decimal(sigma))


def _exact_exp(x_factors: tuple[float, float]) -> float:
    """exp(−s·σ) of the float64 inputs, from 80-digit arithmetic."""
    with localcontext() as ctx:
        ctx.prec = PRECISION
        return float((-Decimal(x_factors[0]) * Decimal(x_factors[1])).exp())


def _residual_error_bound(s: float, sigma: float) -> float:
    """What Residual may commit at (s, σ), in absolute terms.

    x = sσ is rounded (relative error eps/2); the relative sensitivity of 1 − e^{−x} to x
    is |x e^{−x}/(1 − e^{−x})| ≤ 1 + |x|; expm1 and the division add at most 1 ulp each.
    Below the switch the series drops x⁶/5040 relative.
    """
    x = s * sigma
    exact = abs(_exact_residual(s, sigma))
    truncation = x**6 / 5040 if abs(x) < SWITCH else 0.0
    return exact * (truncation + (4 + abs(x)) * EPS64)


# --- Residual -------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.05, 1.0, 7.5])
def test_residual_matches_numpy_expm1_away_from_zero(s: float) -> None:
    x = np.concatenate([-np.logspace(-2.9, 1.5, 40), np.logspace(-2.9, 2.5, 60)])
    sigma = x / s
    got = Residual(s)(_t(sigma)).numpy()
    want = -np.expm1(-s * sigma) / sigma
    # Both evaluate the same three operations; numpy's and torch's expm1 are each within
    # 1 ulp, so the results differ by at most ~3 ulps.
    np.testing.assert_allclose(got, want, rtol=4 * EPS64, atol=0)


@pytest.mark.parametrize("s", [0.05, 1.0, 7.5])
def test_residual_matches_its_series_for_tiny_arguments(s: float) -> None:
    x = np.concatenate([-np.logspace(-12, -3.0001, 30), [0.0], np.logspace(-12, -3.0001, 30)])
    sigma = x / s
    got = Residual(s)(_t(sigma)).numpy()
    # Seven terms of s·(1 − e^{−x})/x: the first omitted one is s·x⁷/40320 < 3e-26·s.
    want = s * (1 - x / 2 + x**2 / 6 - x**3 / 24 + x**4 / 120 - x**5 / 720 + x**6 / 5040)
    # Residual keeps six terms, so it is off by s·x⁶/5040 (< 2e-22·s), plus rounding.
    np.testing.assert_array_less(np.abs(got - want), s * (x**6 / 5040 + 4 * EPS64))


@pytest.mark.parametrize("s", [0.0, 0.05, 1.0, 7.5])
def test_residual_at_zero_is_s(s: float) -> None:
    got = Residual(s)(_t([0.0, -0.0]))
    assert got.tolist() == [s, s]


@pytest.mark.parametrize("s", [0.05, 1.0, 7.5])
def test_residual_matches_high_precision_everywhere(s: float) -> None:
    x = np.concatenate(
        [-np.logspace(-12, 1.5, 50), [0.0], np.logspace(-12, 3, 70), [SWITCH, -SWITCH]]
    )
    sigma = x / s
    got = Residual(s)(_t(sigma)).tolist()
    for value, sig in zip(got, sigma.tolist(), strict=True):
        assert abs(value - _exact_residual(s, sig)) <= _residual_error_bound(s, sig), sig


@pytest.mark.parametrize("s", [0.05, 1.0, 7.5])
@pytest.mark.parametrize("side", [1.0, -1.0])
def test_residual_is_continuous_across_the_series_switch(s: float, side: float) -> None:
    x_inside = side * np.nextafter(SWITCH, 0.0)  # series
    x_outside = side * np.nextafter(SWITCH, 1.0)  # expm1
    below, above = Residual(s)(_t([x_inside / s, x_outside / s])).tolist()
    # The function itself moves by |F_r'|·Δσ ≈ (s²/2)·2 ulp(σ), negligible; the jump is
    # the series' truncation s·x⁶/5040 (< 2e-22·s) plus a few ulps of rounding each side.
    assert abs(above - below) <= s * (SWITCH**6 / 5040 + 8 * EPS64)


def test_residual_is_accurate_to_a_few_ulps_near_the_switch() -> None:
    x = np.nextafter(SWITCH, 0.0)
    got = float(Residual(1.0)(_t([x]))[0])
    exact = _exact_residual(1.0, x)
    # The comment promises truncation far below float64 resolution: a few ulps at most.
    assert abs(got - exact) <= 4 * EPS64 * exact


@pytest.mark.parametrize("s", [0.5, 3.0])
def test_residual_has_no_overflow_or_nan_at_extreme_arguments(s: float) -> None:
    sigma = _t([1e-300, 1e3, 1e10, 1e300, 1.7e308, -1e-300, -1.0, -100.0, -700.0 / s])
    got = Residual(s)(sigma)
    assert torch.isfinite(got).all()
    # Large positive sσ: e^{−sσ} underflows and F_r(σ) is 1/σ to the last bit.
    np.testing.assert_array_equal(got[1:5].numpy(), 1.0 / sigma[1:5].numpy())
    # Negative σ (a Hessian's negative eigenvalue) follows (e^{s|σ|} − 1)/|σ|.
    for value, sig in zip(got[5:].tolist(), sigma[5:].tolist(), strict=True):
        assert abs(value - _exact_residual(s, sig)) <= _residual_error_bound(s, sig)
    # Beyond exp's range the true value itself exceeds float64: +inf, never NaN.
    assert Residual(s)(_t([-800.0 / s])).item() == math.inf


def test_residual_of_float32_eigenvalues_stays_float32() -> None:
    sigma = torch.tensor([0.0, 1e-5, 0.3, 40.0])
    got = Residual(2.0)(sigma)
    assert got.dtype == torch.float32
    want = Residual(2.0)(sigma.double())
    # float32 evaluation of the same formula: a few float32 ulps (eps32 = 1.2e-7).
    torch.testing.assert_close(got.double(), want, rtol=4 * 1.2e-7, atol=0)


# --- Decay -------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.0, 0.05, 1.0, 7.5])
def test_decay_is_the_exponential(s: float) -> None:
    sigma = np.concatenate([-np.logspace(-8, 1.5, 20), [0.0], np.logspace(-8, 2, 30)])
    got = Decay(s)(_t(sigma)).tolist()
    for value, sig in zip(got, sigma.tolist(), strict=True):
        exact = _exact_exp((s, sig))
        # exp is within 1 ulp; the rounding of x = sσ (eps/2 relative) moves e^{−x} by |x|·eps/2.
        assert abs(value - exact) <= exact * (2 + abs(s * sig)) * EPS64


def test_decay_limits() -> None:
    got = Decay(2.0)(_t([0.0, 1e3, 1e300]))
    assert got.tolist() == [1.0, 0.0, 0.0]
    assert Decay(0.0)(_t([5.0, -5.0])).tolist() == [1.0, 1.0]


# --- discrete forms -------------------------------------------------------------------------
def _explicit(etas: list[float], sigma: float) -> tuple[float, float, float]:
    """Π_k (1 − η_k σ), Σ_k η_k Π_{k'>k} (1 − η_{k'} σ) and Σ_k |term_k|, in 80 digits."""
    with localcontext() as ctx:
        ctx.prec = PRECISION
        e = [Decimal(x) for x in etas]
        factors = [1 - x * Decimal(sigma) for x in e]
        terms = []
        for k in range(len(e)):
            term = e[k]
            for f in factors[k + 1 :]:
                term *= f
            terms.append(term)
        decay = Decimal(1)
        for f in factors:
            decay *= f
        return float(decay), float(sum(terms)), float(sum(abs(t) for t in terms))


@pytest.mark.parametrize("n_steps", [1, 2, 7, 40])
def test_discrete_forms_equal_the_explicit_sum_and_product(n_steps: int) -> None:
    rng = np.random.default_rng(n_steps)
    etas = rng.uniform(0.0, 0.4, size=n_steps).tolist()
    sigmas = [-3.0, -0.1, 0.0, 1e-9, 0.5, 2.0, 4.0, 11.0]  # 1 − ησ of both signs
    decay = DiscreteDecay(etas)(_t(sigmas)).tolist()
    residual = DiscreteResidual(etas)(_t(sigmas)).tolist()
    u = EPS64 / 2
    for k, sig in enumerate(sigmas):
        want_decay, want_residual, scale = _explicit(etas, sig)
        # Each factor fl(1 − fl(ησ)) is within δ = (|ησ|/|1 − ησ| + 1)·u of 1 − ησ
        # (the rounding of ησ is amplified by the cancellation), and each product and sum
        # adds u; to first order (Higham, Accuracy and Stability, ch. 3) the product is
        # within (K·u + Σδ) relative, and the recurrence r ← r(1 − ησ) + η within
        # (2K·u + Σδ)·Σ_k|term_k| (every partial sum is bounded by its terms).
        delta = sum((abs(e * sig) / abs(1 - e * sig) + 1) * u for e in etas)
        assert abs(decay[k] - want_decay) <= 1.01 * (n_steps * u + delta) * abs(want_decay)
        assert abs(residual[k] - want_residual) <= 1.01 * (2 * n_steps * u + delta) * scale


def test_discrete_forms_at_zero_and_without_steps() -> None:
    etas = [0.1, 0.25, 0.05]
    assert DiscreteDecay(etas)(_t([0.0])).item() == 1.0
    # At σ = 0 the residual is Σ η: three additions, one rounding each.
    assert abs(DiscreteResidual(etas)(_t([0.0])).item() - 0.4) <= 3 * EPS64 * 0.4
    assert DiscreteDecay([])(_t([2.0])).item() == 1.0
    assert DiscreteResidual([])(_t([2.0])).item() == 0.0


@given(
    s=st.floats(1e-3, 20.0),
    ratio=st.floats(0.0, 0.5),
    n_steps=st.integers(1, 400),
)
def test_discrete_forms_converge_to_the_exponential_ones(
    s: float, ratio: float, n_steps: int
) -> None:
    sigma = ratio * n_steps / s  # so that sσ/K = ratio ≤ 1/2 (up to rounding)
    x = s * sigma
    etas = [s / n_steps] * n_steps
    sig = _t([sigma])
    decay_k = DiscreteDecay(etas)(sig).item()
    residual_k = DiscreteResidual(etas)(sig).item()
    decay, residual = math.exp(-x), Residual(s)(sig).item()
    # With y = x/K ≤ 1/2: 1 − y ≤ e^{−y} and −log(1 − y) = y + Σ_{j≥2} y^j/j ≤ y + y², so
    # e^{−x}(1 − x²/K) ≤ e^{−x − x²/K} ≤ (1 − x/K)^K ≤ e^{−x}: the discrete decay is below
    # the exponential by at most e^{−x}·x²/K, the O((sσ)²/K) term. The residuals are
    # (1 − decay)/σ, so the discrete one is above by (decay error)/σ ≤ s·x·e^{−x}/K.
    decay_gap = math.exp(-x) * x * x / n_steps
    residual_gap = s * x * math.exp(-x) / n_steps
    # Rounding: 2K·eps for the product, 3K·eps·s for the recurrence (terms ≤ η, sum ≤ s),
    # and a few ulps for exp and Residual.
    decay_round = (2 * n_steps + 4) * EPS64
    residual_round = (3 * n_steps + 4 + x) * EPS64 * s
    assert -decay_round <= decay - decay_k <= decay_gap + decay_round
    assert -residual_gap - residual_round <= residual - residual_k <= residual_round


# --- Inverse -------------------------------------------------------------------------------
def test_inverse_is_one_over_sigma() -> None:
    sigma = _t([1e-8, 0.5, 3.0, 1e6, -2.0])
    assert Inverse()(sigma).tolist() == (1.0 / sigma).tolist()
    damped = sigma[:4] + 0.1
    # Residual with s → ∞ tends to the inverse: e^{−sσ} underflows for sσ > 745.
    np.testing.assert_array_equal(Residual(1e12)(damped).numpy(), Inverse()(damped).numpy())


def test_reprs_name_the_function() -> None:
    assert repr(Decay(2.0)) == "Decay(s=2)"
    assert repr(Residual(0.5)) == "Residual(s=0.5)"
    assert repr(DiscreteDecay([0.1, 0.2])) == "DiscreteDecay(2 steps)"
    assert repr(DiscreteResidual([0.1])) == "DiscreteResidual(1 steps)"
    assert repr(Inverse()) == "Inverse()"
