"""Layer blocks and the collector: supported layers, hooks that leave no trace, and
per-example gradients that equal autograd's."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from sourcekit.exceptions import UnsupportedModuleError
from sourcekit.gradients import cross_entropy, margin
from sourcekit.gradients._layers import LayerBlock, block_gradients, collect, find_blocks

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
    elif name in ("sequence", "pooled_sequence"):
        x = torch.randn(n, 6, 4, generator=g, dtype=torch.float64)
        shape = (n, 6) if name == "sequence" else (n,)
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
    with pytest.raises(UnsupportedModuleError, match=rf"'1' \({kind}\)") as info:
        find_blocks(model)
    assert "modules=" in str(info.value)  # says how to exclude it
    assert isinstance(info.value, TypeError)


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
        find_blocks(model)


def test_find_blocks_rejects_a_model_without_supported_layers() -> None:
    with pytest.raises(UnsupportedModuleError, match=r"no nn\.Linear or nn\.Conv2d"):
        find_blocks(nn.Tanh())


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
@pytest.mark.parametrize("name", ["mlp", "conv"])
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
