"""Layer blocks and the collector of layer inputs and output gradients.

Attribution works on *blocks*: one per supported layer (``nn.Linear``, ``nn.Conv2d``),
whose weight and bias form a matrix of shape (d_out, d_in + 1) with the bias as an extra
input column of ones. For an example with layer inputs a_t and output gradients s_t at
positions t (sequence positions, or spatial positions of a convolution), its gradient is

    G = Σ_t s_t a_tᵀ.

The collector records a (inputs, bias column appended, convolution patches unfolded)
and s (gradients with respect to the layer's outputs) with hooks that exist only inside
a ``with`` block; it never modifies the model it observes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import UnsupportedModuleError

__all__ = ["Capture", "LayerBlock", "block_gradients", "collect", "find_blocks"]


@dataclass(frozen=True)
class LayerBlock:
    """A supported layer: its module name, kind, parameter names and gradient shape."""

    name: str
    kind: str  # "linear" or "conv2d"
    weight: str
    bias: str | None
    d_out: int
    d_in: int  # including the bias column when there is a bias

    @property
    def n_params(self) -> int:
        return self.d_out * self.d_in

    def matrix(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The block's parameters (or a gradient of them) as a (d_out, d_in) matrix."""
        w = params[self.weight].reshape(self.d_out, -1)
        if self.bias is None:
            return w
        return torch.cat([w, params[self.bias].reshape(self.d_out, 1)], dim=1)

    def split(
        self, matrix: torch.Tensor, shapes: dict[str, torch.Size]
    ) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`matrix` (leading batch dimensions are kept)."""
        lead = matrix.shape[:-2]
        out = {}
        if self.bias is None:
            out[self.weight] = matrix.reshape(*lead, *shapes[self.weight])
        else:
            out[self.weight] = matrix[..., :-1].reshape(*lead, *shapes[self.weight])
            out[self.bias] = matrix[..., -1].reshape(*lead, *shapes[self.bias])
        return out


def find_blocks(model: nn.Module, modules: Sequence[str] | None = None) -> list[LayerBlock]:
    """The attribution blocks of ``model``.

    Without ``modules`` every module that owns parameters must be supported (Linear or
    Conv2d); otherwise :class:`UnsupportedModuleError` names it. With ``modules`` (a list
    of module names as in ``model.named_modules()``), only those are used and the other
    parameters are treated as fixed.
    """
    named = dict(model.named_modules())
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
                "The 'modules' parameter is an empty list; name at least one nn.Linear or "
                "nn.Conv2d layer, or pass modules=None to attribute through all of them."
            )
    else:
        selected = [n for n, m in named.items() if list(m.parameters(recurse=False))]
    blocks = []
    for name in selected:
        module = named[name]
        prefix = f"{name}." if name else ""
        bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
        if type(module) is nn.Linear or isinstance(module, nn.Linear):
            blocks.append(
                LayerBlock(
                    name,
                    "linear",
                    f"{prefix}weight",
                    bias,
                    module.out_features,
                    module.in_features + (bias is not None),
                )
            )
        elif isinstance(module, nn.Conv2d):
            if (
                module.groups != 1
                or module.padding_mode != "zeros"
                or isinstance(module.padding, str)
            ):
                raise UnsupportedModuleError(
                    f"The Conv2d layer {name!r} uses groups={module.groups}, padding={module.padding!r}, "
                    f"padding_mode={module.padding_mode!r}; sourcekit supports groups=1 with numeric "
                    "zero padding. Exclude it with modules=[...] naming the layers to attribute."
                )
            d_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            blocks.append(
                LayerBlock(
                    name,
                    "conv2d",
                    f"{prefix}weight",
                    bias,
                    module.out_channels,
                    d_in + (bias is not None),
                )
            )
        elif not list(module.parameters(recurse=False)):
            raise ValueError(
                f"The 'modules' parameter names {name!r}, a {type(module).__name__} without "
                "parameters of its own. Name the nn.Linear or nn.Conv2d layers to attribute through."
            )
        else:
            raise UnsupportedModuleError(
                f"The layer {name or '<root>'!r} ({type(module).__name__}) has parameters but sourcekit "
                "supports nn.Linear and nn.Conv2d. Restrict attribution to supported layers with "
                "modules=[...] (e.g. modules="
                f"{[n for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv2d))][:4]})."
            )
    if not blocks:
        raise UnsupportedModuleError(
            "The model has no nn.Linear or nn.Conv2d layer to attribute with; sourcekit's curvature "
            "works on those layers."
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
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    s: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add_call(self, name: str, a: torch.Tensor, output: torch.Tensor | None) -> None:
        self.a[name] = a if name not in self.a else torch.cat([self.a[name], a], dim=1)
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


def _inputs_matrix(module: nn.Module, block: LayerBlock, x: torch.Tensor) -> torch.Tensor:
    if block.kind == "linear":
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        assert isinstance(module, nn.Conv2d)
        patches = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,  # type: ignore[arg-type]  # str padding is refused earlier
            stride=module.stride,
        )
        a = patches.transpose(1, 2)
    if block.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def _outputs_matrix(block: LayerBlock, g: torch.Tensor) -> torch.Tensor:
    if block.kind == "linear":
        return g.reshape(g.shape[0], -1, g.shape[-1])
    return g.flatten(2).transpose(1, 2)


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


def block_gradients(
    a: dict[str, torch.Tensor], s: dict[str, torch.Tensor], blocks: Sequence[LayerBlock]
) -> dict[str, torch.Tensor]:
    """Per-example gradients G = Σ_t s_t a_tᵀ of each block, shape (n, d_out, d_in)."""
    out = {}
    for block in blocks:
        a_b = a[block.name]
        s_b = s[block.name].to(a_b.dtype)
        if a_b.shape[1] == 1:
            out[block.name] = s_b[:, 0, :, None] * a_b[:, 0, None, :]
        else:
            out[block.name] = torch.einsum("ntd,nte->nde", s_b, a_b)
    return out
