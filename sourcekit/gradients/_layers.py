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

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..exceptions import UnsupportedLayersWarning, UnsupportedModuleError
from ..trajectory._inputs import ModelInputs, call_model, map_inputs, n_rows
from ._layer_types import LAYER_TYPES, layer_type, match_layer_type
from ._patches import ConvPatches, Inputs, dense

__all__ = [
    "Capture",
    "FactoredGradients",
    "LayerBlock",
    "block_gradient",
    "block_gradient_of",
    "block_gradients",
    "collect",
    "find_blocks",
    "from_block_layout",
    "squared_gradient_sum",
    "to_block_layout",
]


@dataclass(frozen=True)
class LayerBlock:
    """A supported layer: its module name, layer type, parameter names and gradient shape.

    ``transposed``: the weight is stored as (d_in, d_out) (GPT-2's ``Conv1D``, embedding
    tables); ``one_hot``: the inputs are indices of one-hot rows (embedding tables, whose
    curvature is diagonal).

    ``uses``: for a *tied* parameter, one weight used by several layers (an embedding
    table reused as the output layer), the blocks of each layer that uses it, each in
    its own layout; the tied block itself is the parameter (named by it, in the layout
    of its first use with a bias, or else of its first use), its gradient the sum of
    every use's gradient (:func:`block_gradient_of`), and its curvature the diagonal.
    Layer inputs and output gradients are captured per use, under the uses' names.
    """

    name: str
    kind: str  # a key of the layer registry: "linear", "conv2d", "conv1d", "embedding", ...
    weight: str
    bias: str | None
    d_out: int
    d_in: int  # including the bias column when there is a bias
    transposed: bool = False
    one_hot: bool = False
    uses: tuple[LayerBlock, ...] = field(default=(), repr=False)

    @property
    def n_params(self) -> int:
        return self.d_out * self.d_in

    @property
    def diagonal(self) -> bool:
        """Whether the block's curvature is always the diagonal (one-hot inputs, or a tied
        parameter, whose gradient is a sum of differently laid out uses)."""
        return self.one_hot or bool(self.uses)

    @property
    def layers(self) -> tuple[LayerBlock, ...]:
        """The layers whose inputs and output gradients the block is read from: its uses
        for a tied parameter, else itself."""
        return self.uses or (self,)

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


def _block(name: str, module: nn.Module, canonical: dict[int, str]) -> LayerBlock | None:
    """The block of one layer, its parameters named as ``model.named_parameters()`` names
    them (a tied parameter by the name it is listed under)."""
    entry = match_layer_type(module)
    if entry is None:
        return None
    if entry.check is not None:
        entry.check(name, module)
    prefix = f"{name}." if name else ""
    weight = getattr(module, entry.weight)
    bias = None if entry.one_hot else getattr(module, entry.bias, None)
    has_bias = bias is not None
    d_out, d_in = entry.shape(module)
    return LayerBlock(
        name,
        entry.kind,
        canonical.get(id(weight), f"{prefix}{entry.weight}"),
        canonical.get(id(bias), f"{prefix}{entry.bias}") if has_bias else None,
        int(d_out),
        int(d_in) + has_bias,
        entry.transposed,
        entry.one_hot,
    )


def _tied(uses: list[LayerBlock]) -> LayerBlock:
    """One block for a weight that several layers use (tied weights).

    Its layout is that of its first use with a bias (else its first use); every other
    use must hold the same matrix or its transpose, and no other bias.
    """
    names = [u.name for u in uses]
    with_bias = [u for u in uses if u.bias is not None]
    if len({u.bias for u in with_bias}) > 1:
        raise UnsupportedModuleError(
            f"The layers {names} share the weight {uses[0].weight!r} but have biases of their "
            "own; sourcekit attributes through a tied weight with at most one bias. Leave these "
            "layers out with modules=[...] naming the others."
        )
    primary = with_bias[0] if with_bias else uses[0]
    d_weight = primary.d_in - (primary.bias is not None)
    for use in uses:
        use_weight = use.d_in - (use.bias is not None)
        same = (use.d_out, use_weight) == (primary.d_out, d_weight)
        same = same and use.transposed == primary.transposed
        swapped = (use.d_out, use_weight) == (d_weight, primary.d_out)
        swapped = swapped and use.transposed != primary.transposed
        if not (same or (swapped and use.bias is None)):
            raise UnsupportedModuleError(
                f"The layers {names} share the weight {use.weight!r}, but {use.name!r} reads it "
                f"as a ({use.d_out}, {use_weight}) matrix and {primary.name!r} as "
                f"({primary.d_out}, {d_weight}); sourcekit combines uses of one matrix or of its "
                "transpose. Leave these layers out with modules=[...] naming the others."
            )
    return LayerBlock(
        primary.weight,
        "tied",
        primary.weight,
        primary.bias,
        primary.d_out,
        primary.d_in,
        primary.transposed,
        False,
        tuple(uses),
    )


def find_blocks(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    trained: Sequence[str] | None = None,
    probe: ModelInputs | None = None,
) -> list[LayerBlock]:
    """The attribution blocks of ``model``.

    Without ``modules``, every layer of a registered type (``nn.Linear``,
    ``nn.Conv2d``, GPT-2's ``Conv1D``, ``nn.Embedding``, or one added with
    :func:`~sourcekit.gradients.register_layer_type`) is attributed through; layers
    with parameters that sourcekit cannot read (normalisation layers, unsupported
    configurations, and, when ``probe`` is given, layers whose input is shared by the
    examples of a batch, such as position embeddings, or that the forward pass does
    not call) are left out, their parameters treated as fixed, with one
    :class:`~sourcekit.exceptions.UnsupportedLayersWarning` that lists them. With
    ``modules`` (a list of module names as in ``model.named_modules()``), exactly those
    are used, the other parameters are treated as fixed, no warning is given, and a
    named layer that cannot be read raises :class:`UnsupportedModuleError`.

    ``trained`` names the parameters the run trained (a trajectory's
    ``trained_parameters``; None: all). Modules whose parameters were all frozen are
    left out, whatever their type: attribution goes through the trained parameters
    only. A module with both trained and frozen parameters is refused, since a block
    holds a layer's weight and bias together.

    A weight used by several layers (tied weights: an embedding table reused as the
    output layer) is one block whose gradient sums every use (``LayerBlock.uses``);
    naming one of its layers in ``modules`` attributes through the parameter, all of
    its uses. ``probe`` (inputs of two or more training examples) runs one forward
    pass to find the layers without per-example inputs.
    """
    named = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    canonical = {id(p): n for n, p in parameters.items()}
    trained_set = None if trained is None else set(trained)
    kinds = ", ".join(LAYER_TYPES)

    def own(module: nn.Module) -> list[str]:
        return [canonical[id(p)] for p in module.parameters(recurse=False)]

    if modules is not None:
        missing = [m for m in modules if m not in named]
        if missing:
            available = [n for n, m in named.items() if own(m)]
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
        selected = [n for n, m in named.items() if own(m)]
    skipped: dict[str, str] = {}
    candidates: list[LayerBlock] = []
    for name in selected:
        module = named[name]
        params = own(module)
        if not params:
            raise ValueError(
                f"The 'modules' parameter names {name!r}, a {type(module).__name__} without "
                f"parameters of its own. Name the layers to attribute through (types: {kinds})."
            )
        frozen = [p for p in params if trained_set is not None and p not in trained_set]
        if len(frozen) == len(params):
            if modules is not None:
                raise ValueError(
                    f"The 'modules' parameter names {name!r}, whose parameters the run never "
                    "trained (they were frozen in every stage). Name trained layers only."
                )
            continue
        if frozen:
            raise UnsupportedModuleError(
                f"The layer {name!r} has trained parameters "
                f"{[p for p in params if p not in frozen]} and frozen ones {frozen}; sourcekit "
                "attributes through whole layers. Train or freeze all of its parameters, or "
                "leave it out with modules=[...]."
            )
        try:
            block = _block(name, module, canonical)
        except UnsupportedModuleError as err:
            if modules is not None:
                raise
            skipped[name] = f"{type(module).__name__}, {str(err).split('; ')[0]}"
            continue
        if block is None:
            if modules is not None:
                raise UnsupportedModuleError(
                    f"The layer {name or '<root>'!r} ({type(module).__name__}) has parameters but "
                    "is not of a layer type sourcekit reads (nn.Linear, nn.Conv2d, GPT-2's Conv1D, "
                    f"nn.Embedding; registered kinds: {kinds}). Name only supported layers in "
                    f"modules=[...] (e.g. modules={_supported_names(named)[:4]}), or describe the "
                    "layer with sourcekit.gradients.register_layer_type."
                )
            skipped[name] = f"{type(module).__name__}, not a layer type sourcekit reads"
            continue
        candidates.append(block)
    blocks = _group_tied(candidates, named, canonical, parameters)
    if probe is not None and n_rows(probe) >= 2:
        for block, reason in _probe(model, blocks, probe).items():
            if modules is not None:
                raise UnsupportedModuleError(
                    f"The layer {block.name!r} named in 'modules' {reason}. Leave it out of "
                    "modules=[...]."
                )
            blocks = [b for b in blocks if b is not block]
            skipped[block.name] = f"{type(named[block.layers[0].name]).__name__}, {reason}"
    covered = {n for b in blocks for n in (b.weight, b.bias) if n is not None}
    skipped = {n: r for n, r in skipped.items() if not set(own(named[n])) <= covered}
    if not blocks:
        raise UnsupportedModuleError(
            "The model has no layer of a type sourcekit reads (registered kinds: "
            f"{kinds}) to attribute through"
            + (f"; left out: {_listing(skipped)}" if skipped else "")
            + ". sourcekit's curvature and gradients work on those layers; describe others with "
            "sourcekit.gradients.register_layer_type."
        )
    if skipped and modules is None:
        warnings.warn(
            f"Attributing through {len(blocks)} layer(s); {len(skipped)} layer(s) with "
            f"parameters are left out and their parameters treated as fixed: "
            f"{_listing(skipped)}. Pass modules=[...] to choose the layers yourself (no warning "
            "then), or describe a layer with sourcekit.gradients.register_layer_type.",
            UnsupportedLayersWarning,
            stacklevel=2,
        )
    return blocks


def _listing(skipped: dict[str, str]) -> str:
    items = [f"{n or '<root>'!r} ({r})" for n, r in skipped.items()]
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def _group_tied(
    candidates: list[LayerBlock],
    named: dict[str, nn.Module],
    canonical: dict[int, str],
    parameters: dict[str, nn.Parameter],
) -> list[LayerBlock]:
    """One block per weight: the candidates that share one become a tied block, with
    the uses of the layers not among the candidates added (a tied parameter is
    attributed through all of its uses)."""
    by_weight: dict[str, list[LayerBlock]] = {}
    for block in candidates:
        by_weight.setdefault(block.weight, []).append(block)
    order = {name: i for i, name in enumerate(named)}
    blocks = []
    for weight, uses in by_weight.items():
        tensor = parameters.get(weight)
        owners = [] if tensor is None else _owners(named, tensor)
        have = {u.name for u in uses}
        for other in owners:
            if other in have:
                continue
            use = _block(other, named[other], canonical)
            if use is None or use.weight != weight:
                raise UnsupportedModuleError(
                    f"The weight {weight!r} of the layer(s) {sorted(have)} is also a parameter of "
                    f"{other!r} ({type(named[other]).__name__}), which sourcekit cannot read as a "
                    "use of it; a tied parameter is attributed through all of its uses. Leave "
                    "these layers out with modules=[...] naming the others."
                )
            uses.append(use)
        uses.sort(key=lambda u: order[u.name])
        blocks.append(uses[0] if len(uses) == 1 else _tied(uses))
    biases = [b.bias for b in blocks if b.bias is not None]
    if len(set(biases)) != len(biases):
        twice = sorted({n for n in biases if biases.count(n) > 1})
        raise UnsupportedModuleError(
            f"The bias {twice[0]!r} is shared by layers with different weights; sourcekit "
            "attributes through a weight and its bias together. Leave all but one of these "
            "layers out with modules=[...]."
        )
    return blocks


def _owners(named: dict[str, nn.Module], tensor: torch.Tensor) -> list[str]:
    return [n for n, m in named.items() if any(p is tensor for p in m.parameters(recurse=False))]


def _probe(
    model: nn.Module, blocks: list[LayerBlock], probe: ModelInputs
) -> dict[LayerBlock, str]:
    """The blocks a forward pass on ``probe`` shows unfit: a layer not called, or called
    with inputs shared by the examples (fewer rows than the batch)."""
    n = n_rows(probe)
    rows: dict[str, list[int]] = {}
    named = dict(model.named_modules())
    handles = []

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor):
                rows.setdefault(name, []).append(int(inputs[0].shape[0]) if inputs[0].ndim else 0)

        return hook

    training = model.training
    try:
        for block in blocks:
            for layer in block.layers:
                handles.append(named[layer.name].register_forward_hook(make_hook(layer.name)))
        model.eval()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        inputs = map_inputs(
            lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t, probe
        )
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    unfit: dict[LayerBlock, str] = {}
    for block in blocks:
        for layer in block.layers:
            seen = rows.get(layer.name)
            if not seen:
                unfit[block] = "is not called by the model's forward pass"
            elif any(r != n for r in seen):
                unfit[block] = (
                    "receives an input shared by the examples of a batch (for instance "
                    "position indices broadcast over the batch), so it has no per-example "
                    "gradient"
                )
    return unfit


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
    layers = [layer for block in blocks for layer in block.layers]
    capture = Capture(layers)
    named = dict(model.named_modules())
    handles = []

    def make_hook(block: LayerBlock):  # type: ignore[no-untyped-def]
        def forward_hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            a = _inputs_matrix(mod, block, inputs[0].detach())
            capture.add_call(block.name, a, output if output.requires_grad else None)

        return named[block.name].register_forward_hook(forward_hook)

    try:
        for layer in layers:
            handles.append(make_hook(layer))
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


def to_block_layout(block: LayerBlock, use: LayerBlock, g: torch.Tensor) -> torch.Tensor:
    """A use's gradients (n, use.d_out, use.d_in) in its tied block's layout.

    The weight part is transposed where the use reads the matrix transposed; a use
    without the block's bias contributes a zero bias column.
    """
    if use.bias is not None:  # the block's own layout (see _tied)
        return g
    weight = g.transpose(-1, -2) if use.transposed != block.transposed else g
    if block.bias is None:
        return weight
    return torch.cat([weight, weight.new_zeros(*weight.shape[:-1], 1)], dim=-1)


def from_block_layout(block: LayerBlock, use: LayerBlock, u: torch.Tensor) -> torch.Tensor:
    """Matrices (..., d_out, d_in) of a tied block in one use's layout: the adjoint of
    :func:`to_block_layout`, so that ⟨u, to_block_layout(g)⟩ = ⟨from_block_layout(u), g⟩."""
    if use.bias is not None:
        return u
    weight = u if block.bias is None else u[..., :-1]
    return weight.transpose(-1, -2) if use.transposed != block.transposed else weight


def block_gradient_of(
    block: LayerBlock, a: Mapping[str, Inputs], s: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Per-example gradients of one block from the captured inputs and output gradients
    of its layers, shape (n, d_out, d_in): G = Σ_t s_t a_tᵀ, or for a tied parameter the
    sum of every use's, in the block's layout."""
    if not block.uses:
        return block_gradient(block, a[block.name], s[block.name])
    total: torch.Tensor | None = None
    for use in block.uses:
        g = to_block_layout(block, use, block_gradient(use, a[use.name], s[use.name]))
        total = g if total is None else total + g
    assert total is not None
    return total


def block_gradients(
    a: Mapping[str, Inputs], s: Mapping[str, torch.Tensor], blocks: Sequence[LayerBlock]
) -> dict[str, torch.Tensor]:
    """Per-example gradients G = Σ_t s_t a_tᵀ of each block, shape (n, d_out, d_in)."""
    return {b.name: block_gradient_of(b, a, s) for b in blocks}


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
        return block_gradient_of(self.blocks[name], self.a, self.s)

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return (
            f"FactoredGradients(blocks={list(self.blocks)}, "
            f"n={next(iter(self.a.values())).shape[0]})"
        )
