"""The similarity attributors as estimators: layers, the user's model, caching and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sourcekit
from sourcekit import (
    Examples,
    GradientSimilarityAttributor,
    OptimizerSpec,
    RepresentationSimilarityAttributor,
    TrainingStage,
)

from .. import _cases

CPU = {"device": "cpu"}
EPS64 = float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def run():
    return _cases.trajectory("mlp_momentum")


def _conv_run(model: nn.Module | None = None):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    data = Examples(torch.randn(10, 1, 5, 5, generator=g), torch.randint(0, 3, (10,), generator=g))

    def factory() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))

    stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5, n_checkpoints=2)
    return sourcekit.train(factory if model is None else model, data, [stage], progress=False)


def test_convolution_inputs_are_flattened_per_example():
    conv = _conv_run()
    queries = conv.train[:3]
    default = RepresentationSimilarityAttributor(**CPU).fit(conv)
    assert default.layer_ == "3"  # the last nn.Linear, whose input is the 18 flattened channels
    assert default.state_.features.shape == (10, 18)
    images = RepresentationSimilarityAttributor(
        layer="0", similarity="dot", dtype="float64", **CPU
    )
    flat = conv.train.inputs.reshape(10, -1).double()  # the Conv2d's input: the images
    expected = flat[:3] @ flat.T
    np.testing.assert_allclose(
        images.fit(conv).transform(queries), expected.numpy(), rtol=0, atol=64 * 25 * EPS64
    )


def test_the_users_model_is_never_used_or_modified():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = _conv_run(model)
    RepresentationSimilarityAttributor(**CPU).fit(conv).transform(conv.train[:2])
    GradientSimilarityAttributor(**CPU).fit(conv).transform(conv.train[:2])
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training  # not switched to eval mode


# memory_limit=1 streams the training data once per query, as the warning says
@pytest.mark.filterwarnings("ignore::sourcekit.exceptions.PerformanceWarning")
def test_gradient_similarity_caches_the_final_gradients(run):
    queries = _cases.queries("mlp_momentum")
    cached = GradientSimilarityAttributor("cosine", dtype="float64", **CPU).fit(run)
    assert list(cached.state_.cache) == [run.n_steps]
    streamed = GradientSimilarityAttributor("cosine", dtype="float64", memory_limit=1, **CPU)
    streamed.fit(run)
    assert streamed.state_.cache == {}
    # the same float64 gradients in other groupings: cosines of 38-term sums, O(1)
    np.testing.assert_allclose(
        streamed.transform(queries), cached.transform(queries), rtol=0, atol=64 * 38 * EPS64
    )


def test_an_unknown_layer_is_named_with_the_modules_available(run):
    with pytest.raises(
        ValueError,
        match=r"'layer' parameter of RepresentationSimilarityAttributor names 'fc', which the "
        r"model does not have\. Modules: \['0', '1', '2'\]\. Pass one of them, or layer=None",
    ):
        RepresentationSimilarityAttributor(layer="fc", **CPU).fit(run)


@pytest.mark.parametrize(
    ("cls", "params", "match"),
    [
        (
            GradientSimilarityAttributor,
            {"similarity": "euclidean"},
            r"'similarity' parameter of GradientSimilarityAttributor must be one of 'dot', "
            r"'cosine'; got 'euclidean'",
        ),
        (
            RepresentationSimilarityAttributor,
            {"similarity": "euclidean"},
            r"'similarity' parameter of RepresentationSimilarityAttributor must be one of "
            r"'cosine', 'dot'; got 'euclidean'",
        ),
        (RepresentationSimilarityAttributor, {"layer": 2}, r"'layer' .* None or a module name"),
        (GradientSimilarityAttributor, {"memory_limit": 0}, r"'memory_limit' .* \[1, inf\)"),
    ],
)
def test_bad_parameters_name_the_parameter_the_value_and_what_is_allowed(run, cls, params, match):
    with pytest.raises(ValueError, match=match):
        cls(**params, **CPU).fit(run)
