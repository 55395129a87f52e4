"""Every gradient-based attributor through the layer registry and the contraction: a model
with an embedding table, GPT-2's transposed Conv1D and a Linear head gives finite scores,
the same on the formed and the contracted path, and low-rank query matrices stay within
their bound (``query_rank``).

Path tolerance: each score is a weighted sum of block products ⟨U_q, G_m⟩ that the two
paths add up in different orders; each is within (d_in + d_out + T + 2)·eps·M of the
exact value, with M = Σ_t |s_t|ᵀ|U||a_t| (tests/scoring/test_contraction.py). Here
d_in + d_out + T + 2 ≤ 20, and on these tiny random models M stays within 100 × the
largest score, so 2·20·100·eps ≈ 1e-12 of the largest score bounds the difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit import Examples, OptimizerSpec, TrainingStage
from sourcekit.curvature._spectral import Inverse
from sourcekit.estimators._gradient import QueryGradients
from sourcekit.gradients._training import TrainingGradients
from sourcekit.scoring._contraction import contraction_path

from .. import _cases
from ..gradients.test_layers import TokenModel, token_data

EPS64 = float(np.finfo(np.float64).eps)
PATH_RTOL = 2 * 20 * 100 * EPS64


def make_token_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TokenModel().double()


@pytest.fixture(scope="module")
def token_run() -> sourcekit.Trajectory:
    g = torch.Generator().manual_seed(2)
    data = Examples(token_data(16, g), torch.randint(0, 3, (16,), generator=g))
    stage = TrainingStage(OptimizerSpec("sgd", lr=0.3), epochs=3, batch_size=4, n_checkpoints=3)
    return sourcekit.train(make_token_model, data, [stage], progress=False)


@pytest.fixture(scope="module")
def token_queries() -> Examples:
    g = torch.Generator().manual_seed(3)
    return Examples(token_data(5, g), torch.randint(0, 3, (5,), generator=g))


ATTRIBUTORS = {
    "source-ekfac": lambda: sourcekit.SourceAttributor(n_segments=3, damping=1e-3),
    "source-kfac": lambda: sourcekit.SourceAttributor(curvature="kfac", damping=1e-3),
    "source-diagonal": lambda: sourcekit.SourceAttributor(curvature="diagonal", damping=1e-3),
    "source-identity": lambda: sourcekit.SourceAttributor(curvature="identity"),
    "source-exact": lambda: sourcekit.SourceAttributor(curvature="exact", damping=1e-3),
    "source-rank2": lambda: sourcekit.SourceAttributor(damping=1e-3, query_rank=2),
    "influence": lambda: sourcekit.InfluenceAttributor(),
    "influence-rank1": lambda: sourcekit.InfluenceAttributor(query_rank=1),
    "tracin": lambda: sourcekit.TracInAttributor(),
    "trak": lambda: sourcekit.TRAKAttributor(projection_dim=24, checkpoints="all"),
    "similarity": lambda: sourcekit.GradientSimilarityAttributor(similarity="cosine"),
}


@pytest.mark.parametrize("name", list(ATTRIBUTORS))
def test_every_attributor_scores_through_embeddings_and_conv1d_on_both_paths(
    name: str, token_run: sourcekit.Trajectory, token_queries: Examples
) -> None:
    attributor = ATTRIBUTORS[name]().set_params(device="cpu", dtype="float64").fit(token_run)
    assert [b.kind for b in attributor.state_.blocks] == ["embedding", "conv1d", "linear"]
    scores = {}
    for path in ("formed", "contracted"):
        with contraction_path(path):
            scores[path] = attributor.transform(token_queries)
    assert scores["formed"].shape == (5, 16) and np.all(np.isfinite(scores["formed"]))
    assert np.abs(scores["formed"]).max() > 0
    np.testing.assert_allclose(
        scores["contracted"],
        scores["formed"],
        rtol=0,
        atol=PATH_RTOL * np.abs(scores["formed"]).max(),
    )


# --- query_rank ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [sourcekit.SourceAttributor, sourcekit.InfluenceAttributor])
def test_full_rank_queries_give_the_exact_scores(cls: type) -> None:
    run = _cases.trajectory("mlp_momentum")  # blocks 5 × 4 and 3 × 6: rank ≤ 4
    queries = _cases.queries("mlp_momentum")
    attributor = cls(damping=1e-3, device="cpu", dtype="float64").fit(run)
    exact = attributor.transform(queries)
    full = attributor.set_params(query_rank=4).transform(queries)  # no refit needed
    # The SVD reproduces each U to a few ulps of its norm; the contraction adds its own
    # rounding (see the module docstring): 1e-12 of the largest score covers both.
    np.testing.assert_allclose(full, exact, rtol=0, atol=1e-12 * np.abs(exact).max())
    assert np.abs(attributor.set_params(query_rank=1).transform(queries) - exact).max() > 1e-9


def test_low_rank_influence_is_within_the_discarded_singular_values() -> None:
    # |Δτ[q, m]| ≤ (1/N) Σ_blocks Σ_{i>r} σ_i(u_q) ‖G_m‖₂, u_q = (H + λ)⁻¹ ∇f(z_q) per block.
    run = _cases.trajectory("mlp_sgd")
    queries = _cases.queries("mlp_sgd")
    influence = sourcekit.InfluenceAttributor(damping=1e-2, device="cpu", dtype="float64")
    influence.fit(run)
    exact = influence.transform(queries)
    blocks = influence.state_.blocks
    cpu = torch.device("cpu")
    v = QueryGradients(
        run,
        blocks,
        queries,
        batch_size=64,
        device=cpu,
        dtype=torch.float64,
        pass_dtype=torch.float64,
    ).final()
    u = influence.state_.curvature.apply(Inverse(), v, 1e-2)
    training = TrainingGradients(run, blocks, None, batch_size=64, device=cpu, dtype=torch.float64)
    ((indices, grads),) = list(training(run.n_steps, np.arange(run.n_train)))
    assert np.array_equal(indices, np.arange(run.n_train))
    sigma = {k: torch.linalg.svdvals(u_k) for k, u_k in u.items()}
    norms = {k: torch.linalg.matrix_norm(grads[k], ord=2) for k in u}
    for r in (1, 2, 3):
        approx = influence.set_params(query_rank=r).transform(queries)
        bound = sum(torch.outer(sigma[k][:, r:].sum(dim=1), norms[k]) for k in u) / run.n_train
        slack = 1e-12 * np.abs(exact).max()  # rounding, as above
        assert np.all(np.abs(approx - exact) <= bound.numpy() + slack)
