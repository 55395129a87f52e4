"""Layer blocks and the collector of layer inputs and output gradients.

Attribution works on *blocks*: one per supported layer (an entry of the layer registry,
:mod:`sourcekit.gradients._layer_types`: ``nn.Linear``, ``nn.Conv2d``, GPT-2's
``Conv1D``, ``nn.Embedding``), whose weight and bias form a matrix of shape
(d_out, d_in + 1) with the bias as an extra input column of ones. For an example with
layer inputs a_t and output gradients s_t at positions t (sequence positions, or
spatial positions of a convolution), its gradient is

    G = Σ_t s_t a_tᵀ.

Embedding tables read as layers with one-hot inputs: a holds the indices i_t and
G = Σ_t s_t e_{i_t}ᵀ scatters the output gradients to the columns of the rows used.

The collector records a (inputs, bias column appended, convolution patches unfolded)
and s (gradients with respect to the layer's outputs) with hooks that exist only inside
a ``with`` block; it never modifies the model it observes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..exceptions import UnsupportedModuleError
from ._layer_types import LAYER_TYPES, layer_type, match_layer_type
from ._patches import ConvPatches, Inputs, dense

__all__ = [
    "Capture",
    "FactoredGradients",
    "LayerBlock",
    "block_gradient",
    "block_gradients",
    "collect",
    "find_blocks",
    "squared_gradient_sum",
]


@dataclass(frozen=True)
class LayerBlock:
    """A supported layer: its module name, layer type, parameter names and gradient shape.

    ``transposed``: the weight is stored as (d_in, d_out) (GPT-2's ``Conv1D``, embedding
    tables); ``one_hot``: the inputs are indices of one-hot rows (embedding tables, whose
    curvature is diagonal).
    """

    name: str
    kind: str  # a key of the layer registry: "linear", "conv2d", "conv1d", "embedding", ...
    weight: str
    bias: str | None
    d_out: int
    d_in: int  # including the bias column when there is a bias
    transposed: bool = False
    one_hot: bool = False

    @property
    def n_params(self) -> int:
        return self.d_out * self.d_in

    @property
    def diagonal(self) -> bool:
        """Whether the block's curvature is always the diagonal (one-hot inputs)."""
        return self.one_hot

    def matrix(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The block's parameters (or a gradient of them) as a (d_out, d_in) matrix."""
        d_weight = self.d_in - (self.bias is not None)
        if self.transposed:
            w = params[self.weight].reshape(d_weight, self.d_out).T
        else:
            w = params[self.weight].reshape(self.d_out, d_weight)
        if self.bias is None:
            return w
        return torch.cat([w, params[self.bias].reshape(self.d_out, 1)], dim=1)

    def split(
        self, matrix: torch.Tensor, shapes: dict[str, torch.Size]
    ) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`matrix` (leading batch dimensions are kept)."""
        lead = matrix.shape[:-2]
        weight = matrix if self.bias is None else matrix[..., :-1]
        if self.transposed:
            weight = weight.transpose(-1, -2)
        out = {self.weight: weight.reshape(*lead, *shapes[self.weight])}
        if self.bias is not None:
            out[self.bias] = matrix[..., -1].reshape(*lead, *shapes[self.bias])
        return out


def _supported_names(named: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in named.items() if match_layer_type(m) is not None]


def _block(name: str, module: nn.Module) -> LayerBlock | None:
    entry = match_layer_type(module)
    if entry is None:
        return None
    if entry.check is not None:
        entry.check(name, module)
    prefix = f"{name}." if name else ""
    has_bias = getattr(module, entry.bias, None) is not None and not entry.one_hot
    d_out, d_in = entry.shape(module)
    return LayerBlock(
        name,
        entry.kind,
        f"{prefix}{entry.weight}",
        f"{prefix}{entry.bias}" if has_bias else None,
        int(d_out),
        int(d_in) + has_bias,
        entry.transposed,
        entry.one_hot,
    )


def _without_frozen(
    named: dict[str, nn.Module], trained: set[str], modules: Sequence[str] | None
) -> dict[str, nn.Module]:
    """The modules without those whose own parameters were all frozen."""
    kept = {}
    for name, module in named.items():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        frozen = [p for p in own if p not in trained]
        if own and len(frozen) == len(own):
            if modules is not None and name in modules:
                raise ValueError(
                    f"The 'modules' parameter names {name!r}, whose parameters the run never "
                    "trained (they were frozen in every stage). Name trained layers only."
                )
            continue
        if frozen:
            raise UnsupportedModuleError(
                f"The layer {name!r} has trained parameters "
                f"{[p for p in own if p in trained]} and frozen ones {frozen}; sourcekit "
                "attributes through whole layers. Train or freeze all of its parameters, or "
                "leave it out with modules=[...]."
            )
        kept[name] = module
    if not any(list(m.parameters(recurse=False)) for m in kept.values()):
        raise UnsupportedModuleError(
            "No parameter of the model was trained (every one was frozen in every stage), so "
            "there is nothing to attribute through."
        )
    return kept


def _check_not_tied(name: str, module: nn.Module, owners: dict[int, list[str]]) -> None:
    for p in module.parameters(recurse=False):
        others = [o for o in owners[id(p)] if o != name]
        if others:
            raise UnsupportedModuleError(
                f"The layer {name!r} shares a parameter with {others} (tied weights, e.g. an "
                "embedding table reused as the output layer). The per-example gradient of a "
                "shared parameter sums all its uses, which sourcekit's layer blocks do not "
                "combine. Exclude these layers with modules=[...], or untie the weights (for "
                "Hugging Face models, tie_word_embeddings=False)."
            )


def find_blocks(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    trained: Sequence[str] | None = None,
) -> list[LayerBlock]:
    """The attribution blocks of ``model``.

    Without ``modules`` every module that owns parameters must be of a registered layer
    type (``nn.Linear``, ``nn.Conv2d``, GPT-2's ``Conv1D``, ``nn.Embedding``, or one
    added with :func:`~sourcekit.gradients.register_layer_type`); otherwise
    :class:`UnsupportedModuleError` names it. With ``modules`` (a list of module names
    as in ``model.named_modules()``), only those are used and the other parameters are
    treated as fixed.

    ``trained`` names the parameters the run trained (a trajectory's
    ``trained_parameters``; None: all). Modules whose parameters were all frozen are
    left out, whatever their type: attribution goes through the trained parameters
    only. A module with both trained and frozen parameters is refused, since a block
    holds a layer's weight and bias together.
    """
    named = dict(model.named_modules())
    if trained is not None:
        named = _without_frozen(named, set(trained), modules)
    kinds = ", ".join(LAYER_TYPES)
    if modules is not None:
        missing = [m for m in modules if m not in named]
        if missing:
            available = [n for n, m in named.items() if list(m.parameters(recurse=False))]
            raise ValueError(
                f"The 'modules' parameter names {missing}, which the model does not have. "
                f"Modules with parameters: {available[:12]}."
            )
        selected = list(dict.fromkeys(modules))
        if not selected:
            raise ValueError(
                "The 'modules' parameter is an empty list; name at least one layer of a supported "
                f"type ({kinds}), or pass modules=None to attribute through all of them."
            )
    else:
        selected = [n for n, m in named.items() if list(m.parameters(recurse=False))]
    owners: dict[int, list[str]] = {}
    for module_name, module in named.items():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module_name)
    blocks = []
    for name in selected:
        module = named[name]
        block = _block(name, module)
        if block is not None:
            _check_not_tied(name, module, owners)
            blocks.append(block)
        elif not list(module.parameters(recurse=False)):
            raise ValueError(
                f"The 'modules' parameter names {name!r}, a {type(module).__name__} without "
                f"parameters of its own. Name the layers to attribute through (types: {kinds})."
            )
        else:
            raise UnsupportedModuleError(
                f"The layer {name or '<root>'!r} ({type(module).__name__}) has parameters but is "
                "not of a layer type sourcekit reads (nn.Linear, nn.Conv2d, GPT-2's Conv1D, "
                f"nn.Embedding; registered kinds: {kinds}). Restrict attribution to supported "
                f"layers with modules=[...] (e.g. modules={_supported_names(named)[:4]}), or "
                "describe the layer with sourcekit.gradients.register_layer_type."
            )
    if not blocks:
        raise UnsupportedModuleError(
            "The model has no nn.Linear or nn.Conv2d layer (nor another registered layer type: "
            f"{kinds}) to attribute with; sourcekit's curvature works on those layers."
        )
    return blocks


@dataclass
class Capture:
    """Layer inputs ``a[name]`` (n, T, d_in) and output gradients ``s[name]`` (n, T, d_out).

    A layer called several times in one forward pass (shared weights) contributes all
    its calls: their positions are concatenated, so that G = Σ over calls and positions
    of s aᵀ, the gradient of the shared parameters.
    """

    blocks: Sequence[LayerBlock]
    a: dict[str, Inputs] = field(default_factory=dict)
    s: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add_call(self, name: str, a: Inputs, output: torch.Tensor | None) -> None:
        if name in self.a:  # the positions of every call, side by side
            a = torch.cat([dense(self.a[name]), dense(a)], dim=1)
        self.a[name] = a
        if output is not None:
            self.outputs.setdefault(name, []).append(output)

    def clear(self) -> None:
        self.a.clear()
        self.s.clear()
        self.outputs.clear()

    def backward(self, total: torch.Tensor, retain_graph: bool = False) -> None:
        """Fill ``s`` with the gradients of the scalar ``total`` w.r.t. each block's outputs.

        Differentiating a *sum* of per-example values gives every example's own output
        gradients (no 1/n factor). Parameter gradients are never formed.
        """
        names = [b.name for b in self.blocks if b.name in self.outputs]
        flat = [out for n in names for out in self.outputs[n]]
        grads = iter(
            torch.autograd.grad(total, flat, allow_unused=True, retain_graph=retain_graph)
        )
        by_block = {b.name: b for b in self.blocks}
        for name in names:
            parts = []
            for out in self.outputs[name]:
                g = next(grads)
                g = torch.zeros_like(out) if g is None else g.detach()
                parts.append(_outputs_matrix(by_block[name], g))
            self.s[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if not retain_graph:
            self.outputs.clear()


def _inputs_matrix(module: nn.Module, block: LayerBlock, x: torch.Tensor) -> Inputs:
    a = layer_type(block.kind).inputs(module, x)
    if block.bias is not None:
        if isinstance(a, ConvPatches):
            return a.with_bias()
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def _outputs_matrix(block: LayerBlock, g: torch.Tensor) -> torch.Tensor:
    return layer_type(block.kind).outputs(g)


@contextmanager
def collect(model: nn.Module, blocks: Sequence[LayerBlock]) -> Iterator[Capture]:
    """Record the layer inputs and outputs of ``blocks`` during forward passes.

    Call ``capture.backward(total)`` after a forward pass to obtain output gradients.
    Hooks are registered on entry and removed on exit, even on error.
    """
    capture = Capture(blocks)
    named = dict(model.named_modules())
    handles = []

    def make_hook(block: LayerBlock):  # type: ignore[no-untyped-def]
        def forward_hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            a = _inputs_matrix(mod, block, inputs[0].detach())
            capture.add_call(block.name, a, output if output.requires_grad else None)

        return named[block.name].register_forward_hook(forward_hook)

    try:
        for block in blocks:
            handles.append(make_hook(block))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def block_gradient(block: LayerBlock, a: Inputs, s: torch.Tensor) -> torch.Tensor:
    """Per-example gradients G = Σ_t s_t a_tᵀ of one block, shape (n, d_out, d_in).

    ``a`` holds the layer inputs (n, T, d_in), or for a one-hot block the indices (n, T)
    (-1: no row), whose G scatters each s_t to column i_t. ``s`` (n, T, d_out) may be a
    slice of the block's output rows; G then has those rows only.
    """
    if block.one_hot:
        assert isinstance(a, torch.Tensor)  # indices (n, T)
        n, t = a.shape
        d_out = s.shape[-1]
        flat = a.reshape(-1)
        keep = flat >= 0
        rows = torch.arange(n, device=a.device).repeat_interleave(t)
        target = (rows * block.d_in + flat)[keep]
        g = s.new_zeros(n * block.d_in, d_out)
        g.index_add_(0, target, s.reshape(n * t, d_out)[keep])
        return g.reshape(n, block.d_in, d_out).transpose(1, 2)
    if isinstance(a, ConvPatches):
        return a.gradient(s)
    s = s.to(a.dtype)
    if a.shape[1] == 1:
        return s[:, 0, :, None] * a[:, 0, None, :]
    return torch.einsum("ntd,nte->nde", s, a)


def block_gradients(
    a: Mapping[str, Inputs], s: Mapping[str, torch.Tensor], blocks: Sequence[LayerBlock]
) -> dict[str, torch.Tensor]:
    """Per-example gradients G = Σ_t s_t a_tᵀ of each block, shape (n, d_out, d_in)."""
    return {b.name: block_gradient(b, a[b.name], s[b.name]) for b in blocks}


def squared_gradient_sum(block: LayerBlock, a: Inputs, s: torch.Tensor) -> torch.Tensor:
    """Σ over examples of G∘G (d_out, d_in), in the precision of ``s``.

    Without forming the n per-example gradients when each example has one position
    ((s∘s)ᵀ(a∘a)) or, for a one-hot block, by summing each example's output gradients
    per distinct row it uses (O(n T d_out), whatever the size of the table).
    """
    if block.one_hot:
        assert isinstance(a, torch.Tensor)  # indices (n, T)
        n, t = a.shape
        d_out = s.shape[-1]
        flat = a.reshape(-1)
        keep = flat >= 0
        rows = torch.arange(n, device=a.device).repeat_interleave(t)
        keys, inverse = torch.unique((rows * block.d_in + flat)[keep], return_inverse=True)
        per_row = s.new_zeros(len(keys), d_out)
        per_row.index_add_(0, inverse, s.reshape(n * t, d_out)[keep])
        total = s.new_zeros(block.d_in, d_out)
        total.index_add_(0, keys % block.d_in, per_row * per_row)
        return total.T
    a = a.to(s.dtype)
    if a.shape[1] == 1:
        a = dense(a)
        return (s[:, 0] ** 2).T @ (a[:, 0] ** 2)
    g = block_gradient(block, a, s)
    return (g * g).sum(dim=0)


class FactoredGradients(Mapping[str, torch.Tensor]):
    """The per-example gradients of a batch, kept as layer inputs and output gradients.

    ``grads[name]`` forms the block's gradients G = Σ_t s_t a_tᵀ, shape (n, d_out, d_in);
    the scoring kernels contract query matrices with ``a`` and ``s`` directly when that
    is cheaper (:func:`sourcekit.scoring._contraction.gradient_dot`).
    """

    def __init__(
        self,
        blocks: Sequence[LayerBlock],
        a: Mapping[str, Inputs],
        s: Mapping[str, torch.Tensor],
    ) -> None:
        self.blocks = {b.name: b for b in blocks}
        self.a = a
        self.s = s

    def __getitem__(self, name: str) -> torch.Tensor:
        return block_gradient(self.blocks[name], self.a[name], self.s[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return (
            f"FactoredGradients(blocks={list(self.blocks)}, n={len(next(iter(self.a.values())))})"
        )
