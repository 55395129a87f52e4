"""Gradient and representation similarity against hand-written references.

``reference_gradients`` computes per-example gradients one example at a time with plain
autograd in float64, independently of sourcekit's hooks; the TracIn and TRAK tests use
it too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sourcekit import (
    Examples,
    GradientSimilarityAttributor,
    InfluenceAttributor,
    RepresentationSimilarityAttributor,
    Trajectory,
)
from sourcekit.gradients._layers import find_blocks
from sourcekit.scoring._similarity import (
    gradient_similarity_scores,
    layer_features,
    representation_similarity,
)

from .. import _cases

EPS64 = float(np.finfo(np.float64).eps)
CPU64 = {"device": "cpu", "dtype": "float64"}


def reference_gradients(
    trajectory: Trajectory, step: int, examples: Examples, what: str
) -> torch.Tensor:
    """∇_θ of the per-example ``what`` ("loss" or "measurement") at θ_step, shape (n, P).

    Parameters are ordered block by block as ``find_blocks`` lists them, each block's
    [weight | bias] matrix row-major (the layout of sourcekit's projections).
    """
    model = trajectory.build_model(step).double().eval()
    blocks = find_blocks(model)
    fn = trajectory.loss if what == "loss" else trajectory.measurement
    params = dict(model.named_parameters())
    data = examples.to(dtype=torch.float64)
    rows = []
    for i in range(len(examples)):
        value = fn(model(data.inputs[i : i + 1]), data.targets[i : i + 1]).sum()
        grads = dict(zip(params, torch.autograd.grad(value, list(params.values())), strict=True))
        rows.append(torch.cat([b.matrix(grads).reshape(-1) for b in blocks]))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def run() -> Trajectory:
    return _cases.trajectory("mlp_sgd")  # no weight decay, no momentum


def test_dot_similarity_is_the_one_step_counterfactual(run):
    queries = _cases.queries("mlp_sgd")
    scores = GradientSimilarityAttributor("dot", **CPU64).fit(run).transform(queries)
    g_q = reference_gradients(run, run.n_steps, queries, "measurement")
    g_m = reference_gradients(run, run.n_steps, run.train, "loss")
    expected = -(g_q @ g_m.T) / run.n_train
    # 38-term float64 dot products of gradients computed by two routes (hooks and plain
    # autograd, each a few float64 operations deep): a few times 38 eps of Σ|g_q g_m|/N.
    scale = (g_q.abs() @ g_m.abs().T).max().item() / run.n_train
    np.testing.assert_allclose(scores, expected.numpy(), rtol=0, atol=8 * 38 * EPS64 * scale)


def test_dot_similarity_is_an_influence_function_with_identity_curvature(run):
    # With H = I and no damping or weight decay, (H + λI)⁻¹ = I: the two formulas coincide.
    queries = _cases.queries("mlp_sgd")
    dot = GradientSimilarityAttributor("dot", **CPU64).fit(run).transform(queries)
    influence = (
        InfluenceAttributor(damping=0.0, curvature="identity", **CPU64).fit(run).transform(queries)
    )
    np.testing.assert_allclose(dot, influence, rtol=0, atol=64 * EPS64 * np.abs(dot).max())


def test_cosine_similarity_drops_the_norms_and_the_scale(run):
    queries = _cases.queries("mlp_sgd")
    scores = GradientSimilarityAttributor("cosine", **CPU64).fit(run).transform(queries)
    g_q = reference_gradients(run, run.n_steps, queries, "measurement")
    g_m = reference_gradients(run, run.n_steps, run.train, "loss")
    expected = -(g_q @ g_m.T) / torch.outer(g_q.norm(dim=1), g_m.norm(dim=1))
    # a cosine is O(1); the same 38-term float64 sums as above, relative to 1.
    np.testing.assert_allclose(scores, expected.numpy(), rtol=0, atol=8 * 38 * EPS64)
    assert np.abs(scores).max() <= 1.0


def test_gradient_similarity_kernel_scores_only_the_given_examples():
    query = {"a": torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)}
    train = {"a": torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]], dtype=torch.float64)}

    def training(step, examples):  # type: ignore[no-untyped-def]
        yield np.asarray([1, 3]), train

    dot = gradient_similarity_scores(
        query, training, 0, np.asarray([1, 3]), n_train=4, n_examples=2, dtype=torch.float64
    )
    np.testing.assert_array_equal(dot.numpy(), [[0, -1, 0, 0], [0, 0, 0, 0]])
    cosine = gradient_similarity_scores(
        query, training, 0, np.asarray([1, 3]), n_train=4, n_examples=2, similarity="cosine"
    )
    # a zero query gradient has cosine 0 with everything (not NaN)
    np.testing.assert_array_equal(cosine.numpy(), [[0, -1, 0, 0], [0, 0, 0, 0]])


def _hidden(run: Trajectory, examples: Examples, pre_activation: bool) -> torch.Tensor:
    """The tanh MLP's hidden layer by hand: W₀x + b₀, or tanh of it."""
    params = run.checkpoint(run.n_steps).params
    z = examples.inputs.double() @ params["0.weight"].double().T + params["0.bias"].double()
    return z if pre_activation else torch.tanh(z)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_representation_similarity_uses_the_penultimate_features(run, similarity):
    queries = _cases.queries("mlp_sgd")
    attributor = RepresentationSimilarityAttributor(similarity=similarity, **CPU64).fit(run)
    assert attributor.layer_ == "2"  # the input of the last nn.Linear: tanh(W₀x + b₀)
    h_q, h_m = _hidden(run, queries, False), _hidden(run, run.train, False)
    expected = h_q @ h_m.T
    if similarity == "cosine":
        expected = expected / torch.outer(h_q.norm(dim=1), h_m.norm(dim=1))
    # 5-dimensional features (a 3-term affine map and tanh): 5-term float64 sums.
    atol = 16 * 5 * EPS64 * max(1.0, float(expected.abs().max()))
    np.testing.assert_allclose(attributor.transform(queries), expected.numpy(), rtol=0, atol=atol)


def test_a_named_layer_gives_its_input(run):
    queries = _cases.queries("mlp_sgd")
    scores = (
        RepresentationSimilarityAttributor(layer="1", similarity="dot", **CPU64)
        .fit(run)
        .transform(queries)
    )
    expected = _hidden(run, queries, True) @ _hidden(run, run.train, True).T
    atol = 16 * 5 * EPS64 * float(expected.abs().max())
    np.testing.assert_allclose(scores, expected.numpy(), rtol=0, atol=atol)


def test_layer_features_leave_no_hook_behind(run):
    model = run.build_model()
    features = layer_features(
        model, "2", run.train, batch_size=5, device=torch.device("cpu"), dtype=torch.float32
    )
    assert features.shape == (run.n_train, 5)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_representation_similarity_of_zero_features_is_zero():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    cosine = representation_similarity(features, features, "cosine")
    np.testing.assert_allclose(cosine.numpy(), [[0.0, 0.0], [0.0, 1.0]], atol=1e-7)
    np.testing.assert_array_equal(
        representation_similarity(features, features, "dot").numpy(), [[0, 0], [0, 25]]
    )
