"""Layer blocks and the collector: supported layers, hooks that leave no trace, and
per-example gradients that equal autograd's."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sourcekit.exceptions import UnsupportedLayersWarning, UnsupportedModuleError
from sourcekit.gradients import LAYER_TYPES, LayerType, cross_entropy, margin, register_layer_type
from sourcekit.gradients._layer_types import layer_type
from sourcekit.gradients._layers import (
    FactoredGradients,
    LayerBlock,
    block_gradient,
    block_gradients,
    collect,
    find_blocks,
    squared_gradient_sum,
)

EPS64 = float(np.finfo(np.float64).eps)
# Hook-based and autograd per-example gradients are float64 sums of the same products in
# different orders. Each entry sums at most a few hundred products (positions × width),
# so both are within ~1e3·eps ≈ 2e-13 of exact arithmetic relative to the gradients' scale;
# 1e-12 bounds their difference with room to spare.
GRADIENT_RTOL = 1e-12


# --- tiny float64 models of every supported shape ---------------------------------------------
class MeanOverPositions(nn.Module):
    """(n, T, d) -> (n, d): pools a sequence so the head sees one vector per example."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def mlp() -> nn.Module:
    """Linear layers with and without bias, applied to (n, d) inputs."""
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)
    )


def sequence_mlp() -> nn.Module:
    """Linear layers applied to (n, T, d) inputs: outputs (n, T, C), one class per position."""
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def pooled_sequence_mlp() -> nn.Module:
    """A Linear layer on every position, pooled, then a Linear head: outputs (n, C)."""
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), MeanOverPositions(), nn.Linear(5, 3))


def conv_net() -> nn.Module:
    """Conv2d with a rectangular kernel, stride, padding, dilation and bias, then one without bias."""
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 7, 3),
    )


class Conv1D(nn.Module):
    """The layout of the ``Conv1D`` of Hugging Face's GPT-2: weight (in, out), y = x W + b.

    Defined here (same class name, attributes and forward) so that the tests never need
    ``transformers``; sourcekit recognises it by name and layout.
    """

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.5 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def conv1d_sequence() -> nn.Module:
    """Transposed Conv1D layers applied to (n, T, d) inputs: outputs (n, T, C)."""
    return nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5))


class TokenModel(nn.Module):
    """Tokens (n, T) -> Embedding (row 0 is padding) -> Conv1D -> tanh -> mean -> Linear: (n, C)."""

    def __init__(self, vocabulary: int = 9, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 4, padding_idx=padding_idx)
        self.proj = Conv1D(5, 4)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.embed(tokens))).mean(dim=1))


def token_data(n: int, generator: torch.Generator, vocabulary: int = 9) -> torch.Tensor:
    """(n, 6) tokens; the first two positions repeat a token and the last is often padding."""
    tokens = torch.randint(0, vocabulary, (n, 6), generator=generator)
    tokens[:, 1] = tokens[:, 0]  # a row used twice by one example: its gradients add up
    tokens[::2, -1] = 0  # the padding row receives no gradient
    return tokens


def model_data(
    name: str, n: int = 7, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded float64 model of kind ``name`` with inputs and integer class targets."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[name]().double()
    if name == "mlp":
        x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
    elif name == "tokens":
        x = token_data(n, g)
        y = torch.randint(0, 3, (n,), generator=g)
    elif name in ("sequence", "pooled_sequence", "conv1d"):
        x = torch.randn(n, 6, 4, generator=g, dtype=torch.float64)
        shape = (n,) if name == "pooled_sequence" else (n, 6)
        y = torch.randint(0, 3, shape, generator=g)
    else:
        x = torch.randn(n, 2, 9, 9, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "sequence": sequence_mlp,
    "pooled_sequence": pooled_sequence_mlp,
    "conv": conv_net,
    "conv1d": conv1d_sequence,
    "tokens": TokenModel,
}


def reference_gradients(
    model: nn.Module, fn: Callable, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """∇_θ fn(model(x_i), y_i) for every example i, by one autograd backward pass each."""
    params = dict(model.named_parameters())
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for i in range(len(x)):
        value = fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(value, [params[name] for name in names])
        for name, g in zip(names, grads, strict=True):
            rows[name].append(g)
    return {name: torch.stack(r) for name, r in rows.items()}


def parameter_names(blocks: list[LayerBlock]) -> list[str]:
    return [name for b in blocks for name in (b.weight, b.bias) if name is not None]


def assert_gradients_match(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = GRADIENT_RTOL
) -> None:
    """Per-parameter comparison, the absolute tolerance scaled by the gradients' size."""
    assert set(got) == set(want)
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale)


def split_all(
    blocks: list[LayerBlock], grads: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    shapes = {k: v.shape for k, v in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for b in blocks:
        out.update(b.split(grads[b.name], shapes))
    return out


# --- find_blocks ----------------------------------------------------------------------------
def test_find_blocks_describes_linear_layers_with_and_without_bias() -> None:
    blocks = find_blocks(mlp())
    assert blocks == [
        LayerBlock("0", "linear", "0.weight", "0.bias", 6, 5),
        LayerBlock("2", "linear", "2.weight", None, 5, 6),
        LayerBlock("4", "linear", "4.weight", "4.bias", 3, 6),
    ]
    assert [b.n_params for b in blocks] == [30, 30, 18]


def test_find_blocks_of_a_bare_layer_uses_the_root_name() -> None:
    assert find_blocks(nn.Linear(3, 2, bias=False)) == [
        LayerBlock("", "linear", "weight", None, 2, 3)
    ]


def test_find_blocks_describes_conv2d_layers() -> None:
    blocks = find_blocks(conv_net())
    # Unfolded patches: in_channels × kernel height × kernel width, plus the bias column.
    assert blocks[0] == LayerBlock("0", "conv2d", "0.weight", "0.bias", 3, 2 * 3 * 2 + 1)
    assert blocks[1] == LayerBlock("2", "conv2d", "2.weight", None, 2, 3 * 2 * 2)
    assert blocks[2].kind == "linear"


def test_find_blocks_describes_transposed_conv1d_and_embedding_layers() -> None:
    blocks = find_blocks(TokenModel())
    # The embedding reads as a layer with one-hot inputs: d_in = the vocabulary, no bias,
    # its table (vocabulary, dim) stored transposed like Conv1D's (in, out) weight.
    assert blocks == [
        LayerBlock("embed", "embedding", "embed.weight", None, 4, 9, True, True),
        LayerBlock("proj", "conv1d", "proj.weight", "proj.bias", 5, 4 + 1, True, False),
        LayerBlock("head", "linear", "head.weight", "head.bias", 3, 5 + 1),
    ]
    assert [b.diagonal for b in blocks] == [True, False, False]


def test_a_class_named_conv1d_needs_the_transposed_layout() -> None:
    class Conv1D(nn.Module):  # same name, but no ``nf``: not GPT-2's layer
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 2))

    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Conv1D\)"):
        find_blocks(nn.Sequential(Conv1D(), nn.Linear(2, 2)), modules=["0", "1"])


@pytest.mark.parametrize(
    ("options", "what"),
    [
        ({"max_norm": 1.0}, "max_norm=1.0"),
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq=True"),
    ],
)
def test_embeddings_that_rewrite_or_rescale_are_refused(options: dict, what: str) -> None:
    model = nn.Sequential(nn.Embedding(5, 3, **options), nn.Linear(3, 2))
    with pytest.raises(UnsupportedModuleError, match=rf"Embedding layer '0' uses .*{what}"):
        find_blocks(model, modules=["0", "1"])
    with pytest.warns(UnsupportedLayersWarning, match=rf"'0' \(Embedding, .*{what}"):
        assert [b.name for b in find_blocks(model)] == ["1"]  # left out by default
    assert [b.name for b in find_blocks(model, modules=["1"])] == ["1"]  # excluded: fine


def test_find_blocks_skips_layers_without_parameters() -> None:
    model = nn.Sequential(
        nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False), nn.ReLU(), nn.Linear(4, 2)
    )
    assert [b.name for b in find_blocks(model)] == ["0", "3"]


@pytest.mark.parametrize(
    ("layer", "kind"),
    [
        (nn.LayerNorm(4), "LayerNorm"),
        (nn.BatchNorm1d(4), "BatchNorm1d"),
        (nn.PReLU(), "PReLU"),
    ],
)
def test_find_blocks_names_an_unsupported_layer_with_parameters(
    layer: nn.Module, kind: str
) -> None:
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2))
    # left out with one warning that names it ...
    with pytest.warns(UnsupportedLayersWarning, match=rf"'1' \({kind}, not a layer type"):
        assert [b.name for b in find_blocks(model)] == ["0", "2"]
    # ... and refused when named
    with pytest.raises(UnsupportedModuleError, match=rf"'1' \({kind}\)") as info:
        find_blocks(model, modules=["0", "1"])
    assert "modules=" in str(info.value)  # says how to exclude it
    assert isinstance(info.value, TypeError)


def test_one_warning_lists_every_layer_left_out() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.warns(UnsupportedLayersWarning) as seen:
        find_blocks(model)
    assert len(seen) == 1
    assert "'1' (LayerNorm" in str(seen[0].message) and "'3' (BatchNorm1d" in str(seen[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_blocks(model, modules=["0", "2"])  # chosen layers: no warning


class _PositionEmbedding(nn.Module):
    """Token and position embeddings; the position indices are shared by the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(9, 4)
        self.positions = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        where = torch.arange(tokens.shape[1])[None]  # (1, T): broadcast over the examples
        return self.head(self.tokens(tokens) + self.positions(where))


def test_a_probe_finds_layers_whose_input_is_shared_by_the_batch() -> None:
    model = _PositionEmbedding()
    tokens = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(0))
    assert [b.name for b in find_blocks(model)] == ["tokens", "positions", "head"]  # no probe
    with pytest.warns(UnsupportedLayersWarning, match=r"'positions' \(Embedding, receives an"):
        blocks = find_blocks(model, probe=tokens)
    assert [b.name for b in blocks] == ["tokens", "head"]
    with pytest.raises(UnsupportedModuleError, match=r"'positions' named in 'modules'"):
        find_blocks(model, modules=["positions"], probe=tokens)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 4, 3, groups=2),
        nn.Conv2d(2, 4, 3, padding="same"),
        nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
    ],
)
def test_find_blocks_rejects_unsupported_convolutions(conv: nn.Conv2d) -> None:
    model = nn.Sequential(nn.Linear(2, 2), conv)
    with pytest.raises(UnsupportedModuleError, match=r"Conv2d layer '1'"):
        find_blocks(model, modules=["0", "1"])
    with pytest.warns(UnsupportedLayersWarning, match=r"'1' \(Conv2d, "):
        assert [b.name for b in find_blocks(model)] == ["0"]


def test_find_blocks_rejects_a_model_without_supported_layers() -> None:
    with pytest.raises(UnsupportedModuleError, match=r"no layer of a type sourcekit reads"):
        find_blocks(nn.Tanh())
    with pytest.raises(UnsupportedModuleError, match=r"left out: '<root>' \(LayerNorm"):
        find_blocks(nn.LayerNorm(3))


def test_modules_restricts_the_blocks_in_the_given_order() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 5), nn.Linear(5, 2))
    blocks = find_blocks(model, modules=["3", "0", "3"])
    assert [b.name for b in blocks] == ["3", "0"]  # duplicates dropped, order kept


def test_modules_naming_unknown_layers_lists_the_available_ones() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"\['fc'\]") as info:
        find_blocks(model, modules=["0", "fc"])
    assert "['0', '2']" in str(info.value)


# --- LayerBlock.matrix / split -----------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "conv", "conv1d", "tokens"])
def test_matrix_and_split_are_inverse(name: str) -> None:
    model, _, _ = model_data(name)
    shapes = {k: v.shape for k, v in model.named_parameters()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    for block in find_blocks(model):
        matrix = block.matrix(params)
        assert matrix.shape == (block.d_out, block.d_in)
        back = block.split(matrix, shapes)
        assert set(back) == {block.weight} | ({block.bias} if block.bias else set())
        for key, value in back.items():
            assert torch.equal(value, params[key])
        assert torch.equal(block.matrix(back), matrix)


def test_split_keeps_leading_batch_dimensions() -> None:
    model, _, _ = model_data("conv")
    shapes = {k: v.shape for k, v in model.named_parameters()}
    block = find_blocks(model)[0]
    stacked = torch.randn(5, 2, block.d_out, block.d_in, dtype=torch.float64)
    parts = block.split(stacked, shapes)
    assert parts["0.weight"].shape == (5, 2, *shapes["0.weight"])
    assert parts["0.bias"].shape == (5, 2, *shapes["0.bias"])
    single = block.split(stacked[3, 1], shapes)
    assert torch.equal(parts["0.weight"][3, 1], single["0.weight"])
    assert torch.equal(parts["0.bias"][3, 1], single["0.bias"])


# --- collect never modifies the model ------------------------------------------------------
def _batchnorm_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    model(torch.randn(8, 3, dtype=torch.float64))  # non-trivial running statistics
    return model


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_collect_leaves_no_hooks_and_no_changes() -> None:
    model = _batchnorm_model().eval()
    model[1].requires_grad_(False)
    blocks = find_blocks(model, modules=["0", "3"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    x = torch.randn(8, 3, dtype=torch.float64)
    with collect(model, blocks) as capture:
        assert model[0]._forward_hooks and model[3]._forward_hooks
        out = model(x)
        capture.backward(out.sum())
    assert _no_hooks_left(model)
    assert not model.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # Output gradients come from autograd.grad: no parameter's .grad is ever formed.
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("train_mode", [False, True])
def test_collect_does_not_switch_the_training_mode(train_mode: bool) -> None:
    model = _batchnorm_model().train(train_mode)
    with collect(model, find_blocks(model, modules=["0", "3"])):
        assert all(m.training is train_mode for m in model.modules())
    assert all(m.training is train_mode for m in model.modules())


def test_collect_removes_its_hooks_when_the_block_raises() -> None:
    model = _batchnorm_model().eval()
    blocks = find_blocks(model, modules=["0", "3"])
    with pytest.raises(RuntimeError, match="inside"), collect(model, blocks):
        model(torch.randn(2, 3, dtype=torch.float64))
        raise RuntimeError("inside")
    assert _no_hooks_left(model)


def test_collect_keeps_the_users_own_hooks() -> None:
    model = mlp().double()
    calls = []
    handle = model[0].register_forward_hook(lambda *args: calls.append(1))
    with collect(model, find_blocks(model)):
        model(torch.randn(2, 4, dtype=torch.float64))
    assert list(model[0]._forward_hooks) == [handle.id]
    model(torch.randn(2, 4, dtype=torch.float64))
    assert len(calls) == 2
    handle.remove()


# --- per-example gradients from the hooks equal autograd's ---------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fn", [cross_entropy, margin], ids=["loss", "measurement"])
def test_hook_gradients_equal_autograd_per_example_gradients(name: str, fn: Callable) -> None:
    model, x, y = model_data(name)
    blocks = find_blocks(model)
    with collect(model, blocks) as capture:
        capture.backward(fn(model(x), y).sum())
        got = block_gradients(capture.a, capture.s, blocks)
    for block in blocks:
        assert got[block.name].shape == (len(x), block.d_out, block.d_in)
    want = reference_gradients(model, fn, x, y, parameter_names(blocks))
    assert_gradients_match(split_all(blocks, got, model), want)


def test_hook_gradients_of_a_restricted_set_of_blocks() -> None:
    model, x, y = model_data("conv")
    blocks = find_blocks(model, modules=["2"])
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(x), y).sum())
        assert set(capture.a) == {"2"}
        got = block_gradients(capture.a, capture.s, blocks)
    want = reference_gradients(model, cross_entropy, x, y, ["2.weight"])
    assert_gradients_match(split_all(blocks, got, model), want)


class _UnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.aux = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        self.aux(h)  # computed, but the output does not depend on it
        return h.sum(dim=-1, keepdim=True)


def test_a_block_that_does_not_affect_the_output_has_zero_gradients() -> None:
    model = _UnusedBranch().double()
    blocks = find_blocks(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    with collect(model, blocks) as capture:
        capture.backward(model(x).sum())
        got = block_gradients(capture.a, capture.s, blocks)
    assert torch.equal(got["aux"], torch.zeros(5, 2, 5, dtype=torch.float64))
    want = reference_gradients(
        model, lambda out, _: out.sum(dim=1), x, x, ["body.weight", "body.bias"]
    )
    assert_gradients_match(split_all(blocks[:1], got, model), want)


class _AppliedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


def test_a_layer_used_twice_gets_the_sum_of_both_uses_or_is_refused() -> None:
    model = _AppliedTwice().double()
    blocks = find_blocks(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    try:
        with collect(model, blocks) as capture:
            capture.backward(model(x).sum())
            got = block_gradients(capture.a, capture.s, blocks)
    except (UnsupportedModuleError, ValueError):
        return  # refusing such a model is a correct answer too
    want = reference_gradients(
        model, lambda out, _: out.sum(dim=1), x, x, ["layer.weight", "layer.bias"]
    )
    assert_gradients_match(split_all(blocks, got, model), want)


# --- layers of the registry beyond nn.Linear and nn.Conv2d ----------------------------------
def test_conv1d_blocks_read_the_weight_transposed() -> None:
    model, x, _ = model_data("conv1d")
    layer = model[0]
    block = find_blocks(model)[0]
    params = {k: v.detach() for k, v in model.named_parameters()}
    # y = x W + b with W (in, out): the block's matrix is [Wᵀ | b], and y = [Wᵀ | b] [x; 1].
    matrix = block.matrix(params)
    assert torch.equal(matrix[:, :-1], layer.weight.detach().T)
    x1 = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
    torch.testing.assert_close(x1 @ matrix.T, layer(x).detach(), rtol=0, atol=1e-14)


def test_embedding_gradients_scatter_the_output_gradients_to_the_rows_used() -> None:
    model, x, y = model_data("tokens")
    blocks = find_blocks(model)
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(x), y).sum())
    embed = blocks[0]
    a, s = capture.a["embed"], capture.s["embed"]
    assert a.dtype == torch.int64 and a.shape == x.shape
    assert torch.equal(a == -1, x == 0)  # padding positions select nothing
    g = block_gradient(embed, a, s)  # (n, dim, vocabulary)
    for i in range(len(x)):
        want = torch.zeros(4, 9, dtype=torch.float64)
        for t in range(x.shape[1]):
            if x[i, t] != 0:
                want[:, x[i, t]] += s[i, t]
        assert torch.equal(g[i], want)  # the same additions, in the same order
    assert torch.all(g[:, :, 0] == 0)


@pytest.mark.parametrize("name", list(MODELS))
def test_squared_gradient_sums_equal_the_formed_gradients_squared(name: str) -> None:
    model, x, y = model_data(name)
    blocks = find_blocks(model)
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(x), y).sum())
    for b in blocks:
        g = block_gradient(b, capture.a[b.name], capture.s[b.name])
        want = (g * g).sum(dim=0)
        got = squared_gradient_sum(b, capture.a[b.name], capture.s[b.name])
        # Both square the same per-example entries (sums of ≤ T products) and add n of
        # them: a few ulps of the result.
        torch.testing.assert_close(got, want, rtol=0, atol=64 * EPS64 * float(want.abs().max()))


def test_factored_gradients_form_each_block_on_demand() -> None:
    model, x, y = model_data("tokens")
    blocks = find_blocks(model)
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(x), y).sum())
        formed = block_gradients(capture.a, capture.s, blocks)
    grads = FactoredGradients(blocks, dict(capture.a), dict(capture.s))
    assert list(grads) == [b.name for b in blocks] and len(grads) == 3
    assert all(torch.equal(grads[k], formed[k]) for k in formed)
    assert "embed" in repr(grads)


class _XW(nn.Module):
    """A custom layer computing y = x W + b, unknown to sourcekit until registered."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


@pytest.fixture
def xw_type() -> Iterator[LayerType]:
    entry = LayerType(
        "xw",
        matches=lambda m: isinstance(m, _XW),
        shape=lambda m: (m.weight.shape[1], m.weight.shape[0]),
        transposed=True,
    )
    register_layer_type(entry)
    try:
        yield entry
    finally:
        register_layer_type(entry, remove=True)


def test_a_registered_layer_type_is_one_entry(xw_type: LayerType) -> None:
    model = nn.Sequential(_XW(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    blocks = find_blocks(model)
    assert blocks[0] == LayerBlock("0", "xw", "0.weight", "0.bias", 5, 5, True, False)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(x), y).sum())
        got = block_gradients(capture.a, capture.s, blocks)
    want = reference_gradients(model, cross_entropy, x, y, parameter_names(blocks))
    assert_gradients_match(split_all(blocks, got, model), want)


def test_an_unregistered_layer_type_is_refused_until_registered() -> None:
    model = nn.Sequential(_XW(4, 5), nn.Linear(5, 3))
    with pytest.raises(UnsupportedModuleError, match="register_layer_type"):
        find_blocks(model, modules=["0", "1"])
    with pytest.warns(UnsupportedLayersWarning, match=r"'0' \(_XW, not a layer type"):
        assert [b.name for b in find_blocks(model)] == ["1"]


def test_the_registry_refuses_duplicates_and_names_unknown_kinds() -> None:
    assert list(LAYER_TYPES)[:4] == ["linear", "conv2d", "conv1d", "embedding"]
    with pytest.raises(ValueError, match="'linear' is registered already"):
        register_layer_type(LAYER_TYPES["linear"])
    with pytest.raises(UnsupportedModuleError, match=r"'xw'.*register_layer_type"):
        layer_type("xw")


def test_hooks_on_new_layer_types_leave_the_model_untouched() -> None:
    model, x, y = model_data("tokens")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with collect(model, find_blocks(model)) as capture:
        capture.backward(cross_entropy(model(x), y).sum())
    assert _no_hooks_left(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_a_tiny_gpt2_from_transformers_gives_autograd_gradients() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=17,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,  # a tied table would be used by two layers, one outside the blocks
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gpt2 = transformers.GPT2LMHeadModel(config).double().eval()

    class LogitsOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt2 = gpt2

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.gpt2(tokens).logits

    model = LogitsOnly()
    conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    # The token embedding (the position embedding's input has batch size 1 and is broadcast:
    # it has no per-example gradient to read), and every Conv1D.
    blocks = find_blocks(model, modules=["gpt2.transformer.wte", *conv1d])
    assert {b.kind for b in blocks} == {"conv1d", "embedding"}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 17, (3, 6), generator=g)
    targets = torch.randint(0, 17, (3, 6), generator=g)
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(tokens), targets).sum())
        got = block_gradients(capture.a, capture.s, blocks)
    want = reference_gradients(model, cross_entropy, tokens, targets, parameter_names(blocks))
    assert_gradients_match(split_all(blocks, got, model), want)


class _TiedTable(nn.Module):
    """An embedding table reused, transposed, as the output layer (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


@pytest.mark.parametrize("modules", [None, ["embed", "mix"], ["out", "mix"]])
def test_a_tied_weight_is_one_block_whose_gradient_sums_both_uses(modules: list | None) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _TiedTable().double()
    blocks = find_blocks(model, modules)
    tied = next(b for b in blocks if b.uses)
    # named after the parameter, read from both layers, whichever of them modules names
    assert tied.name == tied.weight == "embed.weight"
    assert [u.name for u in tied.uses] == ["embed", "out"]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 7, (5, 4), generator=g)
    targets = torch.randint(0, 7, (5, 4), generator=g)
    with collect(model, blocks) as capture:
        capture.backward(cross_entropy(model(tokens), targets).sum())
        got = block_gradients(capture.a, capture.s, blocks)
    want = reference_gradients(model, cross_entropy, tokens, targets, parameter_names(blocks))
    assert_gradients_match(split_all(blocks, got, model), want)
    # either use alone gives a different gradient: the sum is what is checked above
    with collect(model, [tied.uses[0]]) as capture:
        capture.backward(cross_entropy(model(tokens), targets).sum())
        one = block_gradients(capture.a, capture.s, [tied.uses[0]])["embed"]
    assert one.shape == got["embed.weight"].shape  # the embedding's layout is the block's
    assert not torch.allclose(one, got["embed.weight"])


@given(
    kernel=st.sampled_from([1, 2, 3, (3, 1)]),
    stride=st.sampled_from([1, 2, (2, 1)]),
    dilation=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1, (2, 0)]),
    channels=st.integers(1, 3),
    height=st.integers(5, 9),
    width=st.integers(5, 9),
    channels_last=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_conv2d_patches_are_those_of_unfold(
    kernel, stride, dilation, padding, channels, height, width, channels_last
):
    # The strided view copies the same numbers in the same order: equal bit for bit.
    conv = nn.Conv2d(channels, 2, kernel, stride=stride, dilation=dilation, padding=padding)
    x = torch.randn(3, channels, height, width, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    expected = torch.nn.functional.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    ).transpose(1, 2)
    assert torch.equal(layer_type("conv2d").inputs(conv, x), expected)
