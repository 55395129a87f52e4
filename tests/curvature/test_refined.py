"""The refined curvature (``refine_steps``): a fitted curvature's functions replaced by
those of the exact Gauss-Newton matrix, applied by Krylov iterations on exact products.

- With as many steps as parameters the Krylov spaces are the whole space (started from
  every query, ``refine_rank=None``), so the estimators' scores equal those of
  ``curvature="exact"`` up to rounding. The Krylov bases are reorthogonalised, so P steps
  suffice in floating point; conjugate gradients
  (influence functions, Adam's inverse) are not, and in floating point lose their
  termination at P steps (the directions lose conjugacy and convergence is delayed), so
  the estimators get 2P steps, where conjugate gradients reach their attainable accuracy
  (Greenbaum 1997, ch. 4): about κ·eps relative, κ = (λ_max + shift)/shift the condition
  of the shifted matrix. The budget below is P·κ·eps, times 1e3 for the sums over
  examples and checkpoints that both sides form in different orders.
- Preconditioned by the fitted EK-FAC and run on the real products, conjugate gradients
  meet their bound ‖x_k − x‖_A ≤ 2((√κ' − 1)/(√κ' + 1))^k ‖x‖_A at every k, κ' the
  condition of the preconditioned operator (measured here from the dense matrices).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sourcekit import InfluenceAttributor, SourceAttributor
from sourcekit.curvature import (
    Carried,
    Decay,
    DenseCurvature,
    DiscreteDecay,
    DiscreteResidual,
    Inverse,
    Residual,
    fit_curvature,
)
from sourcekit.curvature._krylov import lanczos
from sourcekit.curvature._preconditioner import EigenbasisAdam, preconditioned_curvature
from sourcekit.curvature._products import GaussNewtonProducts, flatten_blocks, unflatten_blocks
from sourcekit.curvature._rates import BlockRates, SegmentRates
from sourcekit.curvature._refined import RefinedAdam, RefinedCurvature, _Identity
from sourcekit.estimators._curvature import refinement_pairs

from .. import _cases
from .test_fit import CPU, blocks_of, examples_of, settings
from .test_rates import _two_blocks

EPS64 = float(np.finfo(np.float64).eps)
CASES = ["linear_sgd", "mlp_momentum", "mlp_adam", "mlp_two_stage"]
SGD_CASES = ["linear_sgd", "mlp_momentum", "mlp_nesterov"]
KW = {"dtype": "float64", "device": "cpu"}


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _kappa(curvature: DenseCurvature, shift: float) -> float:
    lam = torch.linalg.eigvalsh(curvature.matrix)
    return float((lam.max() + shift) / (lam.min().clamp_min(0) + shift))


def _conditioning(attributor: SourceAttributor | InfluenceAttributor, shift: float) -> float:
    """The largest condition number of the matrices the functions take: H̄ (SOURCE under
    SGD, influence functions), K̄ (SOURCE under Adam, its dense form's)."""
    state = attributor.state_
    curvatures = (
        [m.curvature if m.adam is None else m.adam.curvature for m in state.segments]
        if hasattr(state, "segments")
        else [state.curvature]
    )
    return max(_kappa(c, shift) for c in curvatures)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [*SGD_CASES, "mlp_adam", "mlp_adamw", "mlp_two_stage"])
def test_source_with_twice_as_many_steps_as_parameters_is_source_with_exact_curvature(
    name: str,
) -> None:
    # With w = 1, every example, every query and 2P steps both projections are exact up
    # to rounding, and the scores are those of curvature="exact": its functions of H̄
    # under SGD, and under Adam its dense form's of K = p^½ (H̄ + c) p^½ + w, the matrix
    # the refinement's Krylov space is built on there (corrected by the EK-FAC form's own)
    run, queries = _cases.trajectory(name), _cases.queries(name)
    exact = SourceAttributor(n_segments=2, curvature="exact", damping=1e-3, **KW).fit(run)
    want = exact.transform(queries)
    n_params = sum(b.n_params for b in exact.state_.blocks)
    refined = SourceAttributor(
        n_segments=2,
        damping=1e-3,
        refine_steps=2 * n_params,
        refine_examples=None,
        refine_weight=1.0,
        refine_rank=None,
        fisher="expected",
        **KW,
    ).fit(run)
    got = refined.transform(queries)
    kappa = _conditioning(exact, 1e-3)
    assert _relative_error(got, want) <= 1e3 * n_params * EPS64 * kappa
    # and EK-FAC alone (with its default, sampled Fisher) is far from it: not vacuous
    plain = refined.set_params(refine_steps=0, fisher="true").fit(run).transform(queries)
    assert _relative_error(plain, want) > 1e-2


@pytest.mark.parametrize("name", CASES)
def test_influence_with_twice_as_many_steps_as_parameters_is_influence_with_exact_curvature(
    name: str,
) -> None:
    run, queries = _cases.trajectory(name), _cases.queries(name)
    exact = InfluenceAttributor(curvature="exact", damping=1e-2, **KW).fit(run)
    want = exact.transform(queries)
    n_params = sum(b.n_params for b in exact.state_.blocks)
    refined = InfluenceAttributor(
        damping=1e-2, refine_steps=2 * n_params, refine_examples=None, refine_weight=1.0, **KW
    ).fit(run)
    kappa = _conditioning(exact, 1e-2)
    assert _relative_error(refined.transform(queries), want) <= 1e3 * n_params * EPS64 * kappa
    assert _relative_error(refined.set_params(refine_steps=0).transform(queries), want) > 1e-2


def test_refine_steps_must_be_a_non_negative_integer() -> None:
    run = _cases.trajectory("mlp_sgd")
    for cls in (SourceAttributor, InfluenceAttributor):
        with pytest.raises(ValueError, match="'refine_steps' parameter"):
            cls(refine_steps=-1, **KW).fit(run)


def _dense_and_products(name: str) -> tuple[torch.Tensor, GaussNewtonProducts, object]:
    run = _cases.trajectory(name)
    blocks = blocks_of(run)
    steps = [run.n_steps]
    exact = fit_curvature("exact", run, blocks, steps, examples_of(run), settings())
    ekfac = fit_curvature("ekfac", run, blocks, steps, examples_of(run), settings("true"))
    products = GaussNewtonProducts(
        run,
        blocks,
        steps,
        examples_of(run),
        batch_size=5,
        device=CPU,
        dtype=torch.float64,
        memory_limit=2**26,
    )
    return exact.matrix, products, ekfac  # type: ignore[attr-defined]


def test_preconditioned_conjugate_gradients_on_the_real_products_meet_their_bound() -> None:
    matrix, products, ekfac = _dense_and_products("mlp_momentum")
    shift = 1e-2
    n = matrix.shape[0]
    a = matrix + shift * torch.eye(n, dtype=torch.float64)
    blocks = products.blocks
    # the preconditioner M = (EK-FAC + shift)⁻¹ as a matrix, from its action on unit vectors
    eye = torch.eye(n, dtype=torch.float64)
    m = flatten_blocks(blocks, ekfac.apply(Inverse(), unflatten_blocks(blocks, eye), shift))  # type: ignore[attr-defined]
    m = 0.5 * (m + m.T)
    lam_m, q_m = torch.linalg.eigh(m)
    root = (q_m * lam_m.sqrt()) @ q_m.T
    kappa = float(torch.linalg.cond(root @ a @ root))
    rate = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    b = torch.randn(3, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torch.linalg.solve(a, b.T).T
    start = ((exact @ a) * exact).sum(dim=1).sqrt()
    previous = start
    for k in (1, 2, 3, 5, 8, 13, 21, n, 2 * n):  # (the A-norm error never grows with k)
        refined = RefinedCurvature(ekfac, products, k)  # type: ignore[arg-type]
        x = flatten_blocks(blocks, refined.apply(Inverse(), unflatten_blocks(blocks, b), shift))
        error = (((x - exact) @ a) * (x - exact)).sum(dim=1).sqrt()
        slack = 1e3 * n * EPS64 * kappa * start
        assert bool((error <= 2 * rate**k * start + slack).all()), (k, error, rate)
        assert bool((error <= previous + slack).all()), k  # monotone in the A-norm
        previous = error
    assert bool((error <= slack).all())
    # one step: the EK-FAC answer M b, scaled to minimise the A-norm error
    x = flatten_blocks(
        blocks,
        RefinedCurvature(ekfac, products, 1).apply(Inverse(), unflatten_blocks(blocks, b), shift),  # type: ignore[arg-type]
    )
    mb = b @ m
    alpha = (b * mb).sum(dim=1) / ((mb @ a) * mb).sum(dim=1)
    torch.testing.assert_close(
        x, alpha[:, None] * mb, rtol=0, atol=1e3 * n * EPS64 * float(x.abs().max())
    )


def test_the_krylov_space_of_the_real_products_matches_the_dense_functions() -> None:
    matrix, products, ekfac = _dense_and_products("mlp_momentum")
    n, shift = matrix.shape[0], 1e-3
    blocks = products.blocks
    dense = DenseCurvature("exact", blocks, matrix)
    v = unflatten_blocks(
        blocks, torch.randn(2, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    rates = [0.3, 0.2, 0.2, 0.1]
    fns = [Decay(2.0), Residual(2.0), DiscreteDecay(rates), DiscreteResidual(rates)]
    refined = RefinedCurvature(ekfac, products, n)  # type: ignore[arg-type]
    before = products.n_products
    got = refined.apply_many(fns, v, shift)
    # one space serves the two vectors and the four functions: each product carries the
    # newest directions of both, and the products stop once the space is invariant
    assert products.n_products - before <= -(-n // 2)
    for g, w in zip(got, dense.apply_many(fns, v, shift), strict=True):
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=0, atol=1e3 * n * EPS64)


def _fitted_matrix(curvature: object, blocks: list, n: int) -> torch.Tensor:
    """A fitted curvature's matrix B, from its action on the unit vectors."""
    eye = unflatten_blocks(blocks, torch.eye(n, dtype=torch.float64))
    m = flatten_blocks(blocks, curvature.apply(_Identity(), eye))  # type: ignore[attr-defined]
    return 0.5 * (m + m.T)


@pytest.mark.parametrize("weight", [0.25, 0.7])
def test_the_blend_with_as_many_steps_as_parameters_is_the_dense_function_of_the_blend(
    weight: float,
) -> None:
    # A = (1 − w) B + w H̃: with n steps both projections are exact, so
    # F(B) v + W_A F(T_A) W_Aᵀ v − W_B F(T_B) W_Bᵀ v = F(A) v up to rounding; conjugate gradients on A
    # reach (A + shift)⁻¹ v within their attainable accuracy (2n steps, see the notes)
    matrix, products, ekfac = _dense_and_products("mlp_momentum")
    n, shift = matrix.shape[0], 1e-3
    blocks = products.blocks
    b = _fitted_matrix(ekfac, blocks, n)
    blend = DenseCurvature("exact", blocks, (1 - weight) * b + weight * matrix)
    v = unflatten_blocks(
        blocks, torch.randn(2, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    )
    rates = [0.3, 0.2, 0.2, 0.1]
    fns = [Decay(2.0), Residual(2.0), DiscreteDecay(rates), DiscreteResidual(rates)]
    refined = RefinedCurvature(ekfac, products, n, weight=weight)  # type: ignore[arg-type]
    for g, w in zip(
        refined.apply_many(fns, v, shift), blend.apply_many(fns, v, shift), strict=True
    ):
        for name in w:
            torch.testing.assert_close(g[name], w[name], rtol=0, atol=1e3 * n * EPS64)
    kappa = _kappa(blend, shift)
    inverse = RefinedCurvature(ekfac, products, 2 * n, weight=weight)  # type: ignore[arg-type]
    got = flatten_blocks(blocks, inverse.apply(Inverse(), v, shift))
    want = flatten_blocks(blocks, blend.apply(Inverse(), v, shift))
    assert float((got - want).abs().max() / want.abs().max()) <= 1e3 * n * EPS64 * kappa


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("form", ["eigenbasis", "dense"])
def test_where_the_products_agree_with_the_fitted_curvature_the_correction_vanishes(
    form: str, rank: int | None
) -> None:
    # H̃ = B: the blend is B, both Krylov spaces and projections are the same, and two
    # steps return B's own functions F(B) v (Lanczos alone, two steps, is far from them),
    # whether the spaces start from every vector or from one combination of them; the
    # guide runs in B's eigenbasis for an eigenbasis curvature, on its products otherwise
    _, products, ekfac = _dense_and_products("mlp_momentum")
    blocks = products.blocks
    n = sum(b.n_params for b in blocks)
    b = _fitted_matrix(ekfac, blocks, n)
    base = ekfac if form == "eigenbasis" else DenseCurvature("exact", blocks, b)
    v = unflatten_blocks(
        blocks, torch.randn(3, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    )
    fns = [Decay(20.0), Residual(20.0)]
    want = base.apply_many(fns, v, 1e-3)  # type: ignore[attr-defined]
    refined = RefinedCurvature(base, lambda x: x @ b, 2, weight=0.5, rank=rank)  # type: ignore[arg-type]
    for g, w in zip(refined.apply_many(fns, v, 1e-3), want, strict=True):
        for name in w:
            scale = float(w[name].abs().max())
            torch.testing.assert_close(g[name], w[name], rtol=0, atol=1e6 * EPS64 * scale)
    plain = RefinedCurvature(base, lambda x: x @ b, 2, weight=1.0)  # type: ignore[arg-type]
    lanczos_only = lanczos_alone(plain, fns, v, 1e-3)
    gap = max(float((lanczos_only[0][k] - want[0][k]).abs().max()) for k in want[0])
    assert gap > 1e-3 * max(float(t.abs().max()) for t in want[0].values())


def test_queries_within_the_span_of_the_combinations_lose_nothing_to_the_rank() -> None:
    # six query vectors in a space of two: the two leading combinations span them, so a
    # refinement from two combinations equals the one from all six vectors, while each
    # of its products carries two vectors instead of six; one combination does not span
    # them and differs
    matrix, products, ekfac = _dense_and_products("mlp_momentum")
    blocks, n = products.blocks, matrix.shape[0]
    g = torch.Generator().manual_seed(8)
    v = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, n, generator=g, dtype=torch.float64
    )
    carried: list[int] = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        carried.append(x.shape[0])
        return products(x)

    fns = [Decay(2.0), Residual(2.0)]
    every = RefinedCurvature(ekfac, products, 3, weight=0.5)  # type: ignore[arg-type]
    two = RefinedCurvature(ekfac, counted, 3, weight=0.5, rank=2)  # type: ignore[arg-type]
    one = RefinedCurvature(ekfac, products, 3, weight=0.5, rank=1)  # type: ignore[arg-type]
    queries = unflatten_blocks(blocks, v)
    want = [flatten_blocks(blocks, f) for f in every.apply_many(fns, queries, 1e-3)]
    got = [flatten_blocks(blocks, f) for f in two.apply_many(fns, queries, 1e-3)]
    alone = [flatten_blocks(blocks, f) for f in one.apply_many(fns, queries, 1e-3)]
    assert carried == [2, 2, 2]
    for g_, w_, a_ in zip(got, want, alone, strict=True):
        scale = float(w_.abs().max())
        torch.testing.assert_close(g_, w_, rtol=0, atol=1e3 * n * EPS64 * scale)
        assert float((a_ - w_).abs().max()) > 1e-4 * scale


def lanczos_alone(refined: RefinedCurvature, fns: list, v: dict, shift: float) -> list:
    """The plain Lanczos approximation of F(A) v that the correction improves on."""
    x = flatten_blocks(refined.blocks, v).to(torch.float64)
    op = refined._blend(shift, x)
    return [unflatten_blocks(refined.blocks, o) for o in lanczos(op, x, refined.steps).apply(fns)]


def test_refinement_pairs_deal_the_pairs_evenly_to_the_checkpoints() -> None:
    examples = np.arange(100, 200)
    pairs = refinement_pairs(examples, [3, 6, 9], 32, seed=0, stage=1)
    assert [len(pairs[s]) for s in (3, 6, 9)] == [11, 11, 10]
    for subset in pairs.values():
        assert len(np.unique(subset)) == len(subset) and set(subset) <= set(examples)
    again = refinement_pairs(examples, [3, 6, 9], 32, seed=0, stage=1)
    assert all(np.array_equal(pairs[s], again[s]) for s in pairs)
    assert not np.array_equal(pairs[3], pairs[6])  # each checkpoint draws its own
    every = refinement_pairs(examples, [3, 6], None, seed=0, stage=1)
    assert all(np.array_equal(every[s], examples) for s in (3, 6))
    assert np.array_equal(refinement_pairs(examples, [3], 500, 0, 1)[3], examples)


def test_products_over_a_subset_per_checkpoint_weigh_each_checkpoint_equally() -> None:
    run = _cases.trajectory("mlp_momentum")
    blocks = blocks_of(run)
    steps = [run.n_steps // 2, run.n_steps]
    subsets = {steps[0]: np.arange(0, 5), steps[1]: np.arange(3, 12)}
    kw = {"batch_size": 5, "device": CPU, "dtype": torch.float64, "memory_limit": 2**26}
    both = GaussNewtonProducts(run, blocks, steps, subsets, **kw)  # type: ignore[arg-type]
    one = [GaussNewtonProducts(run, blocks, [s], subsets[s], **kw) for s in steps]  # type: ignore[arg-type]
    n = sum(b.n_params for b in blocks)
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want = 0.5 * (one[0](x) + one[1](x))
    torch.testing.assert_close(both(x), want, rtol=1e3 * n * EPS64, atol=0)
    diag = both.diagonal()
    for name, t in diag.items():
        torch.testing.assert_close(
            t, 0.5 * (one[0].diagonal()[name] + one[1].diagonal()[name]), rtol=1e-12, atol=0
        )


@pytest.mark.parametrize(
    ("param", "value"), [("refine_weight", 0.0), ("refine_weight", 1.5), ("refine_examples", 0)]
)
def test_the_refinement_settings_are_checked(param: str, value: float) -> None:
    run = _cases.trajectory("mlp_sgd")
    for cls in (SourceAttributor, InfluenceAttributor):
        with pytest.raises(ValueError, match=f"'{param}' parameter"):
            cls(refine_steps=2, **{param: value}, **KW).fit(run)


def test_the_refinement_rank_is_checked() -> None:
    run = _cases.trajectory("mlp_sgd")
    with pytest.raises(ValueError, match="'refine_rank' parameter"):
        SourceAttributor(refine_steps=2, refine_rank=0, **KW).fit(run)
    with pytest.raises(ValueError, match="rank=0 must be a positive integer or None"):
        RefinedCurvature(
            fit_curvature(
                "identity", run, blocks_of(run), [run.n_steps], examples_of(run), settings()
            ),
            lambda x: x,
            2,
            rank=0,
        )


@pytest.mark.parametrize("matrix_function", ["exp", "discrete"])
def test_per_parameter_rates_match_the_dense_form_on_a_full_matrix(matrix_function: str) -> None:
    # a full (not block-diagonal) symmetric matrix over the two blocks, and a bias that
    # trains at its own rate without decay: the dense kinds' apply_rates is exact for it
    eigen, _ = _two_blocks()
    blocks = eigen.blocks
    n = sum(b.n_params for b in blocks)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    matrix = x @ x.T / n
    dense = DenseCurvature("exact", blocks, matrix)
    bias = torch.zeros(3, 3, dtype=torch.bool)
    bias[:, -1] = True
    rates = SegmentRates(
        {
            "0": BlockRates(
                [(~bias, np.array([0.1, 0.2, 0.05])), (bias, np.array([0.2, 0.4, 0.1]))],
                torch.where(bias, 0.0, 0.05).to(torch.float64),
                0.0,
            ),
            "2": BlockRates([(None, np.array([0.3, 0.6, 0.15]))], 0.0, 0.0),
        },
        matrix_function,
    )
    v = {b.name: torch.randn(2, b.d_out, b.d_in, generator=g, dtype=torch.float64) for b in blocks}
    refined = RefinedCurvature(eigen, lambda y: y @ matrix, n)
    got = refined.apply_rates(rates, Carried(v), 1e-3)
    want = dense.apply_rates(rates, Carried(v), 1e-3)
    for got_c, want_c in zip(got, want, strict=True):
        for name, w in want_c.in_parameters().items():
            torch.testing.assert_close(
                got_c.in_parameters()[name], w, rtol=0, atol=1e3 * n * EPS64
            )


def test_refining_the_hessian_is_refused() -> None:
    run, queries = _cases.trajectory("mlp_sgd"), _cases.queries("mlp_sgd")
    source = SourceAttributor(n_segments=2, curvature="hessian", refine_steps=2, **KW).fit(run)
    with pytest.raises(ValueError, match="refine_steps=2 refines with exact Gauss-Newton"):
        source.transform(queries)


@pytest.mark.parametrize("rank", [None, 1])
def test_under_adam_where_the_products_agree_with_the_fitted_form_the_correction_vanishes(
    rank: int | None,
) -> None:
    # H̃ = B and p, c, w constant on each block: K_A = p^½ (B + c) p^½ + w is the guide's
    # K̃ itself, the two Krylov spaces and projections are the same, and two steps give
    # the EK-FAC form's own u and v_next (two steps of Lanczos alone are far from them),
    # whether the spaces start from every vector or from one combination of them
    _, products, ekfac = _dense_and_products("mlp_momentum")
    blocks = products.blocks
    n = sum(b.n_params for b in blocks)
    b = _fitted_matrix(ekfac, blocks, n)
    levels = {blk.name: 10.0 ** (i + 1) for i, blk in enumerate(blocks)}
    pre = {
        blk.name: torch.full((blk.d_out, blk.d_in), levels[blk.name], dtype=torch.float64)
        for blk in blocks
    }
    guide = preconditioned_curvature(ekfac, pre, coupled=1e-3, decoupled=1e-2)
    assert isinstance(guide, EigenbasisAdam)
    refined = RefinedAdam(
        RefinedCurvature(ekfac, lambda x: x @ b, 2, weight=0.5, rank=rank),  # type: ignore[arg-type]
        guide,
    )
    v = unflatten_blocks(
        blocks, torch.randn(3, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    )
    fns = (Residual(0.5), Decay(0.5))
    got_u, got_next = refined.apply(fns, Carried(v), 1e-3, carry=True)
    want_u, want_next = guide.apply(fns, Carried(v), 1e-3, carry=True)
    assert got_next is not None and want_next is not None
    for got, want in ((got_u, want_u), (got_next.in_parameters(), want_next.in_parameters())):
        for name in want:
            scale = float(want[name].abs().max())
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e6 * EPS64 * scale)
    x = flatten_blocks(blocks, v)
    root = flatten_blocks(blocks, {k: t[None] for k, t in pre.items()})[0].sqrt()
    op = refined.refined._blend(0.0, x)
    (alone,) = lanczos(
        lambda y: root * (op(root * y) + 1e-3 * root * y) + (1e-2 + 1e-3) * y,
        root * x,
        2,
    ).apply([fns[0]])
    gap = float((root * alone - flatten_blocks(blocks, want_u)).abs().max())
    assert gap > 1e-3 * float(flatten_blocks(blocks, want_u).abs().max())


def test_refining_a_dense_adam_form_is_refused() -> None:
    run, queries = _cases.trajectory("mlp_adam"), _cases.queries("mlp_adam")
    source = SourceAttributor(n_segments=2, curvature="exact", refine_steps=2, **KW).fit(run)
    with pytest.raises(ValueError, match="forms K = P\\^1/2 H P\\^1/2 densely already"):
        source.transform(queries)
    source.set_params(refine_steps=0).transform(queries)  # the fitted curvature still serves
