"""Contraction scoring against formed per-example gradients, and low-rank query matrices.

For a block with layer inputs a (n, T, d_in), output gradients s (n, T, d_out) and query
matrices U_q, both paths compute Σ_t Σ_{o,i} s_{t,o} U_{q,o,i} a_{t,i}, only in other
orders. Every term is a product of three numbers (2 roundings) and is added through at
most d_in + d_out + T nested sums, so each path is within
(d_in + d_out + T + 2)·eps·M of the exact value, M = Σ_t |s_t|ᵀ |U_q| |a_t| (the same
sum with absolute values); the two paths differ by at most twice that.

Low rank: with U = Σ_i σ_i l_i r_iᵀ and U_r its truncation to the r largest singular
values, ⟨U − U_r, G⟩ = Σ_{i>r} σ_i l_iᵀ G r_i, and |l_iᵀ G r_i| ≤ ‖G‖₂ for unit l_i, r_i,
so |⟨U_r, G⟩ − ⟨U, G⟩| ≤ Σ_{i>r} σ_i(U) ‖G‖₂.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourcekit.gradients import cross_entropy
from sourcekit.gradients._layers import FactoredGradients, LayerBlock, collect, find_blocks
from sourcekit.scoring import _contraction
from sourcekit.scoring._contraction import (
    LowRank,
    choose_path,
    contraction_path,
    gradient_dot,
    low_rank,
    query_matrices,
    squared_norms,
)
from sourcekit.scoring._trak import RandomProjection

from ..gradients.test_layers import MODELS, _TiedTable, model_data

EPS64 = float(np.finfo(np.float64).eps)
N_QUERIES = 3


def factored(name: str, n: int = 7) -> FactoredGradients:
    """The training-loss gradients of a tiny float64 model, as inputs and output gradients."""
    model, x, y = model_data(name, n=n)
    blocks = find_blocks(model)
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(x), y).sum())
    return FactoredGradients(blocks, dict(capture.a), dict(capture.s))


def random_queries(grads: FactoredGradients, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        b.name: torch.randn(N_QUERIES, b.d_out, b.d_in, generator=g, dtype=torch.float64)
        for b in grads.blocks.values()
    }


def magnitude(queries: dict[str, torch.Tensor], grads: FactoredGradients) -> torch.Tensor:
    """M[q, m] = Σ_blocks Σ_t |s_t|ᵀ |U_q| |a_t|: the scale of the rounding errors."""
    n_queries = next(iter(queries.values())).shape[0]
    total = torch.zeros(n_queries, len(next(iter(grads.a.values()))), dtype=torch.float64)
    for name, u in queries.items():
        block = grads.blocks[name]
        s = grads.s[name].abs()
        a = grads.a[name]
        if block.one_hot:  # |U_q| a_t is the column i_t (none for padding)
            cols = u.abs()[:, :, a.clamp_min(0)] * (a >= 0)  # (q, d_out, n, T)
            total += torch.einsum("qont,nto->qn", cols, s)
        else:
            total += torch.einsum("nto,qoi,nti->qn", s, u.abs(), a.abs())
    return total


def terms(grads: FactoredGradients) -> int:
    """The largest d_in + d_out + T + 2 over the blocks (nested sums and products)."""
    return max(b.d_in + b.d_out + grads.a[b.name].shape[1] + 2 for b in grads.blocks.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_contraction_equals_the_formed_gradients(name: str) -> None:
    # mlp: Linear with T = 1; sequence / pooled_sequence: Linear over 6 positions; conv:
    # Conv2d with stride, padding and dilation; conv1d: GPT-2's transposed Conv1D;
    # tokens: Embedding (padding row, repeated tokens) + Conv1D + Linear.
    grads = factored(name)
    queries = random_queries(grads)
    with contraction_path("formed"):
        formed = gradient_dot(queries, grads, torch.float64)
    with contraction_path("contracted"):
        contracted = gradient_dot(queries, grads, torch.float64)
    explicit = sum(
        u.reshape(N_QUERIES, -1) @ grads[k].reshape(grads[k].shape[0], -1).T
        for k, u in queries.items()
    )
    tol = 2 * terms(grads) * EPS64 * magnitude(queries, grads)
    assert torch.all((contracted - formed).abs() <= tol)
    assert torch.all((contracted - explicit).abs() <= tol)
    auto = gradient_dot(queries, grads, torch.float64)
    assert torch.all((auto - formed).abs() <= tol)


@pytest.mark.parametrize("name", ["sequence", "conv", "tokens"])
def test_chunks_of_examples_do_not_change_the_scores(name: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    grads = factored(name, n=9)
    queries = random_queries(grads)
    tol = 2 * terms(grads) * EPS64 * magnitude(queries, grads)
    for path in ("formed", "contracted"):
        with contraction_path(path):
            whole = gradient_dot(queries, grads, torch.float64)
            # a few examples at a time, on either path
            monkeypatch.setattr(_contraction, "_CHUNK_NUMBERS", 50)
            monkeypatch.setattr(_contraction, "_FORMED_CHUNK_NUMBERS", 50)
            chunked = gradient_dot(queries, grads, torch.float64)
            monkeypatch.undo()
        assert torch.all((chunked - whole).abs() <= tol)


def test_formed_gradients_given_as_a_dict_take_the_formed_path() -> None:
    grads = factored("conv")
    queries = random_queries(grads)
    plain = {k: grads[k] for k in grads}
    tol = 2 * terms(grads) * EPS64 * magnitude(queries, grads)
    diff = gradient_dot(queries, plain, torch.float64) - gradient_dot(
        queries, grads, torch.float64
    )
    assert torch.all(diff.abs() <= tol)


def test_float32_contraction_is_float64_rounded() -> None:
    grads = factored("sequence")
    queries = random_queries(grads)
    exact = gradient_dot(queries, grads, torch.float64)
    with contraction_path("contracted"):
        single = gradient_dot(queries, grads, torch.float32)
    assert single.dtype == torch.float32
    eps32 = float(np.finfo(np.float32).eps)
    # Rounding the inputs to float32 adds 3 relative errors per term on top of the sums.
    tol = (terms(grads) + 3) * eps32 * magnitude(queries, grads)
    assert torch.all((single.double() - exact).abs() <= tol)


# --- which path ---------------------------------------------------------------------------
def test_the_cost_model_picks_the_cheaper_path() -> None:
    full = torch.zeros(100, 64, 65)
    # One position, full rank: the same multiply-adds either way; forming G writes n P
    # numbers, contracting n q min(d_out, d_in): the contraction wins when q < max(d).
    assert choose_path(256, 1, full)[0] == "formed"
    assert choose_path(256, 1, torch.zeros(10, 64, 65))[0] == "contracted"
    # Many positions and many queries: forming G once is cheaper than q T products.
    path, costs = choose_path(256, 32, full)
    assert path == "formed" and costs["formed"] < costs["contracted"]
    # Low rank: q n T r (d_out + d_in) against (T + q) n d_out d_in.
    rank4 = LowRank(torch.zeros(100, 64, 4), torch.zeros(100, 65, 4))
    assert choose_path(256, 1, rank4)[0] == "contracted"
    rank1 = LowRank(torch.zeros(100, 512, 1), torch.zeros(100, 513, 1))
    assert choose_path(256, 32, rank1)[0] == "contracted"
    assert choose_path(256, 32, rank4)[0] == "formed"  # narrow layers, many positions
    # One-hot inputs: a column lookup per position against a dense (d_out × vocabulary)
    # gradient per example; the lookup wins for large tables.
    assert choose_path(256, 32, torch.zeros(100, 16, 50_000), one_hot=True)[0] == "contracted"
    assert choose_path(256, 32, torch.zeros(100, 16, 64), one_hot=True)[0] == "formed"


def test_a_forced_path_is_used_and_an_unknown_one_refused() -> None:
    full = torch.zeros(100, 64, 65)
    with contraction_path("formed"):
        assert choose_path(256, 1, full[:10])[0] == "formed"
    with contraction_path("contracted"):
        assert choose_path(256, 32, full)[0] == "contracted"
    assert choose_path(256, 1, full[:10])[0] == "contracted"  # restored on exit
    with pytest.raises(ValueError, match=r"one of \('auto', 'formed', 'contracted'\); got 'fast'"):
        with contraction_path("fast"):
            pass


# --- low-rank query matrices ----------------------------------------------------------------
def test_low_rank_is_the_truncated_svd() -> None:
    u = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.linalg.svdvals(u)
    for r in range(1, 6):
        approx = low_rank(u, r)
        assert approx.rank == r and approx.shape == (4, 5, 7)
        error = torch.linalg.matrix_norm(u - approx.dense(), ord=2)
        want = sigma[:, r] if r < 5 else torch.zeros(4, dtype=torch.float64)
        # Eckart-Young: the spectral error is the first discarded singular value.
        torch.testing.assert_close(error, want, rtol=0, atol=64 * EPS64 * float(sigma.max()))
    assert low_rank(u, 50).rank == 5  # capped at min(d_out, d_in)


@pytest.mark.parametrize("name", ["mlp", "sequence", "conv", "conv1d", "tokens"])
def test_full_rank_queries_give_the_exact_scores(name: str) -> None:
    grads = factored(name)
    queries = random_queries(grads)
    exact = gradient_dot(queries, grads, torch.float64)
    full = query_matrices(queries, list(grads.blocks.values()), 10**6, torch.float64)
    assert all(isinstance(full[b.name], LowRank) is (not b.one_hot) for b in grads.blocks.values())
    # The SVD reproduces U to a few ulps of its norm: add that to the rounding of the sums.
    tol = (2 * terms(grads) + 64) * EPS64 * magnitude(queries, grads)
    for path in ("formed", "contracted"):
        with contraction_path(path):
            assert torch.all((gradient_dot(full, grads, torch.float64) - exact).abs() <= tol)


@pytest.mark.parametrize("name", ["mlp", "sequence", "conv", "conv1d"])
def test_low_rank_error_is_bounded_by_the_discarded_singular_values(name: str) -> None:
    grads = factored(name)
    queries = random_queries(grads)
    blocks = list(grads.blocks.values())
    exact = gradient_dot(queries, grads, torch.float64)
    sigma = {k: torch.linalg.svdvals(u) for k, u in queries.items()}  # (q, min(d))
    norms = {k: torch.linalg.matrix_norm(grads[k], ord=2) for k in queries}  # ‖G_m‖₂ (n,)
    for r in (1, 2, 3):
        approx = gradient_dot(
            query_matrices(queries, blocks, r, torch.float64), grads, torch.float64
        )
        bound = sum(torch.outer(sigma[k][:, r:].sum(dim=1), norms[k]) for k in queries)
        rounding = (2 * terms(grads) + 64) * EPS64 * magnitude(queries, grads)
        assert torch.all((approx - exact).abs() <= bound + rounding)
        if r == 1:  # every block here has rank ≥ 2: the truncation does change the scores
            assert torch.any((approx - exact).abs() > 1e-6)


# --- TRAK's projection is a contraction too ---------------------------------------------------
@pytest.mark.parametrize("name", ["sequence", "conv", "tokens"])
@pytest.mark.parametrize("piece_rows", [None, 7])
def test_projecting_factored_gradients_equals_projecting_formed_ones(
    name: str, piece_rows: int | None
) -> None:
    grads = factored(name)
    blocks: list[LayerBlock] = list(grads.blocks.values())
    projection = RandomProjection.for_blocks(blocks, 5, "gaussian", 0, piece_rows=piece_rows)
    projector = projection.projector(torch.device("cpu"), torch.float64, 10**6)
    formed = projector({k: grads[k] for k in grads})
    for path in ("formed", "contracted"):
        with contraction_path(path):
            got = projector(grads)
        r = projection.matrix()
        columns = [r[:, j].reshape(-1) for j in range(5)]
        # The projection's k columns are query matrices: the same bound, per column.
        split, start = [], 0
        for b in blocks:
            split.append((b.name, slice(start, start + b.n_params)))
            start += b.n_params
        queries = {
            name_: torch.stack([c[rows].reshape(b.d_out, b.d_in) for c in columns])
            for (name_, rows), b in zip(split, blocks, strict=True)
        }
        tol = 2 * terms(grads) * EPS64 * magnitude(queries, grads)
        assert torch.all((got - formed).abs() <= tol.T)


@pytest.mark.parametrize("name", list(MODELS))
def test_squared_norms_of_factored_gradients_equal_the_formed_ones(name: str) -> None:
    grads = factored(name)
    formed = {k: grads[k] for k in grads}
    want = squared_norms(formed, torch.float64)
    got = squared_norms(grads, torch.float64)
    # Σ_{t,t'} (s_tᵀ s_t')(a_tᵀ a_t') against Σ G²: the same products regrouped; each
    # path is within a few hundred eps of Σ_{t,t'} |s_t||s_t'||a_t||a_t'|, which is at most
    # T Σ_t ‖s_t‖²‖a_t‖² by Cauchy-Schwarz (‖a_t‖ = 1 for a one-hot row).
    scale = torch.zeros(len(want), dtype=torch.float64)
    for k in grads:
        a, s_k = grads.a[k], grads.s[k]
        a_norms = (a**2).sum(dim=2) if a.is_floating_point() else (a >= 0).double()
        scale += a.shape[1] * ((s_k**2).sum(dim=2) * a_norms).sum(dim=1)
    assert torch.all((got - want).abs() <= 256 * EPS64 * scale)


@pytest.mark.parametrize("one_hot", [False, True])
def test_squared_norms_from_position_grams_equal_the_formed_ones(one_hot: bool) -> None:
    # Wide blocks, so that the Gram form is the one used: T (d_in + d_out) < d_out d_in
    # for dense inputs, T² < vocabulary for one-hot rows.
    g = torch.Generator().manual_seed(4)
    if one_hot:
        block = LayerBlock("e", "embedding", "e.weight", None, 3, 50, True, True)
        a = torch.randint(-1, 50, (6, 5), generator=g)
        a[:, 1] = a[:, 0]  # repeated rows add up
    else:
        block = LayerBlock("l", "linear", "l.weight", None, 8, 9)
        a = torch.randn(6, 3, 9, generator=g, dtype=torch.float64)
    s = torch.randn(6, a.shape[1], block.d_out, generator=g, dtype=torch.float64)
    grads = FactoredGradients([block], {block.name: a}, {block.name: s})
    want = (grads[block.name] ** 2).sum(dim=(1, 2))
    got = squared_norms(grads, torch.float64)
    # As above: a few hundred eps of T Σ_t ‖s_t‖²‖a_t‖² (one-hot rows have norm 1 or 0).
    a_norms = (a >= 0).double() if one_hot else (a**2).sum(dim=2)
    scale = a.shape[1] * ((s**2).sum(dim=2) * a_norms).sum(dim=1)
    assert torch.all((got - want).abs() <= 256 * EPS64 * scale)


# --- a tied parameter: one block, the sum of its uses -----------------------------------------
def test_a_tied_block_contracts_like_its_formed_gradient() -> None:
    # An embedding table reused, transposed, as the output layer: the block's gradient is
    # the sum of the lookup's scatter and the output layer's outer products. Every kernel
    # must see that sum: the contraction use by use, the squared norms, TRAK's projection.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _TiedTable().double()
    tokens = torch.randint(0, 7, (6, 4), generator=torch.Generator().manual_seed(3))
    blocks = find_blocks(model)
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(tokens), tokens).sum())
    grads = FactoredGradients(blocks, dict(capture.a), dict(capture.s))
    assert any(b.uses for b in blocks)
    formed = {k: grads[k] for k in grads}
    queries = random_queries(grads)
    explicit = sum(
        u.reshape(N_QUERIES, -1) @ formed[k].reshape(len(tokens), -1).T for k, u in queries.items()
    )
    # every path sums the same products (of three factors) in other orders: within a few
    # hundred eps of Σ |U||G| (the widest sum has d_in + d_out + T terms, 15 here)
    scale = sum(
        u.abs().reshape(N_QUERIES, -1) @ formed[k].abs().reshape(len(tokens), -1).T
        for k, u in queries.items()
    )
    for path in ("formed", "contracted"):
        with contraction_path(path):
            got = gradient_dot(queries, grads, torch.float64)
            low = gradient_dot(
                query_matrices(queries, blocks, 10**6, torch.float64), grads, torch.float64
            )
        assert torch.all((got - explicit).abs() <= 64 * EPS64 * scale)
        assert torch.all((low - explicit).abs() <= 256 * EPS64 * scale)
    norms = squared_norms(grads, torch.float64)
    want = squared_norms(formed, torch.float64)
    torch.testing.assert_close(norms, want, rtol=1e-13, atol=0)
    projection = RandomProjection.for_blocks(blocks, 5, "gaussian", 0)
    projector = projection.projector(torch.device("cpu"), torch.float64, 10**6)
    torch.testing.assert_close(projector(grads), projector(formed), rtol=1e-12, atol=1e-12)
