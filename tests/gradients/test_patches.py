"""A convolution's padded images stand for its patches: same gradients, same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from torch import nn

import sourcekit
from sourcekit.gradients import _patches
from sourcekit.gradients._layer_types import layer_type
from sourcekit.gradients._layers import LayerBlock, block_gradient, collect, find_blocks
from sourcekit.gradients._patches import ConvPatches, dense
from tests.gradients.test_layers import (
    assert_gradients_match,
    cross_entropy,
    reference_gradients,
    split_all,
)

# float64 products summed in another order: a few units of the last place per term.
RTOL = 1e-12


@pytest.fixture
def every_conv_keeps_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_patches, "MIN_POSITIONS", 1)


@given(
    kernel=st.sampled_from([1, 2, 3, (3, 1), (2, 3)]),
    stride=st.sampled_from([1, 2, (2, 1)]),
    dilation=st.sampled_from([1, 2, (1, 2)]),
    padding=st.sampled_from([0, 1, (2, 0)]),
    channels=st.integers(1, 3),
    out_channels=st.integers(1, 4),
    height=st.integers(5, 9),
    width=st.integers(5, 9),
    bias=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_gradients_from_the_images_equal_those_from_the_patches(
    kernel, stride, dilation, padding, channels, out_channels, height, width, bias
):
    conv = nn.Conv2d(
        channels,
        out_channels,
        kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        bias=bias,
    ).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, channels, height, width, generator=g, dtype=torch.float64)
    images = ConvPatches(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    if bias:
        images = images.with_bias()
    patches = torch.nn.functional.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    ).transpose(1, 2)
    if bias:
        patches = torch.cat([patches, patches.new_ones(*patches.shape[:2], 1)], dim=-1)
    assert images.shape == patches.shape
    assert torch.equal(images.unfold(), patches)
    s = torch.randn(3, patches.shape[1], out_channels, generator=g, dtype=torch.float64)
    block = LayerBlock(
        "c",
        "conv2d",
        "c.weight",
        "c.bias" if bias else None,
        out_channels,
        patches.shape[2] - bias,
    )
    want = torch.einsum("ntd,nte->nde", s, patches)
    got = block_gradient(block, images, s)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))
    # a slice of the output rows (as TRAK's projection pieces ask for)
    rows = block_gradient(block, images, s[..., 1:])
    torch.testing.assert_close(rows, want[:, 1:], rtol=RTOL, atol=RTOL * float(want.abs().max()))


def test_the_images_behave_like_layer_inputs():
    x = torch.randn(4, 2, 6, 5)
    images = ConvPatches(x, (3, 3), bias=True)
    assert images.shape == (4, 4 * 3, 2 * 9 + 1)
    assert len(images) == 4 and images.ndim == 3 and images.is_floating_point()
    assert images.numel() * images.element_size() == x.numel() * 4  # the images, not patches
    assert torch.equal(images[1:3].unfold(), images.unfold()[1:3])
    assert images.to(torch.float64).dtype == torch.float64
    assert images.to(torch.float32) is images
    assert torch.equal(dense(images), images.unfold())
    with pytest.raises(TypeError, match="examples"):
        images[:, 1]


def test_only_convolutions_with_wide_kernels_and_many_positions_keep_images():
    small, large = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    strided = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    pointwise = nn.Conv2d(3, 4, 1)
    conv_inputs = layer_type("conv2d").inputs
    assert isinstance(conv_inputs(conv, small), torch.Tensor)  # 64 positions
    assert isinstance(conv_inputs(conv, large), ConvPatches)  # 256 positions
    assert isinstance(conv_inputs(strided, torch.randn(2, 3, 32, 32)), ConvPatches)
    assert isinstance(conv_inputs(pointwise, large), torch.Tensor)  # the patches are x


def _conv_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, (2, 3), stride=(1, 2), dilation=(2, 1), padding=(0, 2), bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()


def test_hook_gradients_from_images_equal_autograd(every_conv_keeps_images):
    torch.manual_seed(0)
    model = _conv_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    blocks = find_blocks(model)
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(x), y).sum())
        assert isinstance(capture.a["0"], ConvPatches)
        got = {b.name: block_gradient(b, capture.a[b.name], capture.s[b.name]) for b in blocks}
    want = reference_gradients(
        model, cross_entropy, x, y, [n for n, _ in model.named_parameters()]
    )
    assert_gradients_match(split_all(blocks, got, model), want)


def make_conv_model() -> nn.Module:
    """Factory importable by a trajectory (tests.gradients.test_patches:make_conv_model)."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 5 * 5, 3),
    )


@pytest.fixture(scope="module")
def conv_run() -> tuple[sourcekit.Trajectory, sourcekit.Examples]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 5, 5, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    data = sourcekit.Examples(x[:18], y[:18])
    queries = sourcekit.Examples(x[18:], y[18:])
    stage = sourcekit.TrainingStage(
        name="train",
        optimizer=sourcekit.OptimizerSpec("sgd", lr=0.2, momentum=0.9),
        epochs=3,
        batch_size=6,
        n_checkpoints=2,
    )
    trajectory = sourcekit.train(
        "tests.gradients.test_patches:make_conv_model", data, [stage], progress=False
    )
    return trajectory, queries


@pytest.mark.parametrize(
    "attributor",
    [
        sourcekit.SourceAttributor(n_segments=2, fisher="expected", dtype="float64"),
        sourcekit.InfluenceAttributor(fisher="expected", dtype="float64"),
        sourcekit.TracInAttributor(dtype="float64"),
        sourcekit.TRAKAttributor(dtype="float64"),
        sourcekit.GradientSimilarityAttributor(dtype="float64"),
    ],
    ids=lambda a: type(a).__name__,
)
def test_scores_do_not_depend_on_how_the_inputs_are_kept(attributor, conv_run, monkeypatch):
    trajectory, queries = conv_run
    attributor.set_params(device="cpu", progress=False)
    with monkeypatch.context() as m:
        m.setattr(_patches, "MIN_POSITIONS", 10**9)  # patches everywhere
        patches = clone(attributor).fit(trajectory).transform(queries)
    sourcekit.base.clear_state_cache()
    with monkeypatch.context() as m:
        m.setattr(_patches, "MIN_POSITIONS", 1)  # padded images everywhere
        images = clone(attributor).fit(trajectory).transform(queries)
    # Both ways compute the same float64 numbers in another order: differences of a few
    # eps64 per term, amplified at most by the inverse curvature's 1 / damping (1e3).
    scale = np.abs(patches).max()
    assert scale > 0
    np.testing.assert_allclose(images, patches, rtol=0, atol=1e-9 * scale)
