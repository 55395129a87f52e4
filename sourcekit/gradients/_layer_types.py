"""The registry of layer types: how sourcekit reads each kind of layer.

A *layer type* tells sourcekit four things about a layer whose weight acts linearly on
its inputs at every position t (a sequence position, or a spatial position of a
convolution):

- whether a module is one (``matches``);
- the shape (d_out, d_in) of its weight as a matrix, bias excluded (``shape``);
- how to turn the tensor the module receives into inputs a of shape (n, T, d_in), and
  the gradient with respect to its output into output gradients s of shape
  (n, T, d_out) (``inputs``, ``outputs``);
- how the weight is stored: (d_out, d_in) like ``nn.Linear``, or transposed
  (d_in, d_out) like the ``Conv1D`` of GPT-2-style models (``transposed``).

With these, a training example's gradient of the block [weight | bias] is
G = Σ_t s_t a_tᵀ, which sourcekit either forms or contracts without forming it.

Layers whose inputs are *indices* (``one_hot=True``: embedding tables) read as one-hot
rows: a_t = e_{i_t}, so G = Σ_t s_t e_{i_t}ᵀ scatters the output gradients to the rows
of the table that the example uses. Their curvature is always the diagonal E[G∘G] in
parameter coordinates (see the Curvature page of the documentation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..exceptions import UnsupportedModuleError
from ._patches import ConvPatches, Inputs, use_images

__all__ = [
    "LAYER_TYPES",
    "LayerType",
    "layer_type",
    "match_layer_type",
    "positions_last",
    "register_layer_type",
]


def positions_last(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, ..., d) -> (n, T, d): every leading axis after the first is a position."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _outputs_last(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], -1, g.shape[-1])


@dataclass(frozen=True)
class LayerType:
    """How sourcekit reads one kind of layer: one small entry of the layer registry.

    A layer whose weight W acts linearly on its input at every position t (sequence or
    spatial positions), y_t = W a_t + b, has per-example gradient G = Σ_t s_t a_tᵀ for
    the matrix [W | b] of shape (d_out, d_in + 1), with a_t the inputs (and a 1 for the
    bias) and s_t the gradients with respect to y_t. A layer type says how to find a_t
    and s_t for one kind of module; everything else (curvature, per-example gradients,
    contraction scoring) follows.

    Parameters
    ----------
    kind : str
        A short name, unique in the registry ("linear", "conv2d", ...).
    matches : callable
        ``matches(module) -> bool``: whether a module is of this type.
    shape : callable
        ``shape(module) -> (d_out, d_in)``: the weight as a matrix, bias excluded.
    inputs : callable, optional
        ``inputs(module, x) -> a`` of shape (n, T, d_in), from the first positional
        argument x of the module's forward call (for ``one_hot`` types: the indices, of
        shape (n, T), with -1 for positions that select nothing). The default takes
        every axis between the first and the last as positions.
    outputs : callable, optional
        ``outputs(g) -> s`` of shape (n, T, d_out), from the gradient g with respect to
        the module's output. The default is the same reshape as ``inputs``'s.
    transposed : bool, default=False
        The weight is stored as (d_in, d_out) (y = x W + b), not (d_out, d_in).
    one_hot : bool, default=False
        The inputs are indices of one-hot rows (an embedding table): no bias, and the
        curvature of the block is diagonal.
    check : callable, optional
        ``check(name, module)`` raises :class:`~sourcekit.exceptions.UnsupportedModuleError`
        for configurations the entry cannot read (e.g. grouped convolutions).
    weight, bias : str, default="weight", "bias"
        The attribute names of the weight and the (optional) bias.

    Examples
    --------
    A layer that stores its weight transposed, y = x W + b (the layout of GPT-2's
    ``Conv1D``), is one entry; registering it makes every attributor accept it:

    >>> import torch
    >>> from torch import nn
    >>> from sourcekit.gradients import LayerType, register_layer_type
    >>> class XW(nn.Module):
    ...     def __init__(self, d_in, d_out):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.randn(d_in, d_out))
    ...         self.bias = nn.Parameter(torch.zeros(d_out))
    ...     def forward(self, x):
    ...         return x @ self.weight + self.bias
    >>> entry = LayerType(
    ...     "xw", matches=lambda m: isinstance(m, XW), shape=lambda m: tuple(m.weight.shape[::-1]),
    ...     transposed=True,
    ... )
    >>> register_layer_type(entry)
    >>> from sourcekit.gradients._layers import find_blocks
    >>> find_blocks(nn.Sequential(XW(3, 4), nn.Tanh(), nn.Linear(4, 2)))[0]
    LayerBlock(name='0', kind='xw', weight='0.weight', bias='0.bias', d_out=4, d_in=4, transposed=True, one_hot=False)
    >>> register_layer_type(entry, remove=True)  # the registry is global: clean up
    """

    kind: str
    matches: Callable[[nn.Module], bool]
    shape: Callable[[nn.Module], tuple[int, int]]
    inputs: Callable[[nn.Module, torch.Tensor], Inputs] = positions_last
    outputs: Callable[[torch.Tensor], torch.Tensor] = _outputs_last
    transposed: bool = False
    one_hot: bool = False
    check: Callable[[str, nn.Module], None] | None = None
    weight: str = "weight"
    bias: str = "bias"


# --- the built-in entries ---------------------------------------------------------------------
def _conv2d_check(name: str, module: nn.Module) -> None:
    assert isinstance(module, nn.Conv2d)
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise UnsupportedModuleError(
            f"The Conv2d layer {name!r} uses groups={module.groups}, padding={module.padding!r}, "
            f"padding_mode={module.padding_mode!r}; sourcekit supports groups=1 with numeric "
            "zero padding. Exclude it with modules=[...] naming the layers to attribute."
        )


def _conv2d_inputs(module: nn.Module, x: torch.Tensor) -> Inputs:
    """The patches a Conv2d multiplies, (n, T, c_in kh kw), in ``F.unfold``'s order.

    Kept as the input images (:class:`~sourcekit.gradients._patches.ConvPatches`, which
    forms the per-example gradients without the patches) when the kernel is wider than
    1 × 1 and the output has many positions; otherwise unfolded here, positions first.
    """
    assert isinstance(module, nn.Conv2d)
    assert not isinstance(module.padding, str)  # refused by the check
    patches = ConvPatches(
        x,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
    )
    if use_images(patches.kernel, patches.shape[1]):
        return patches
    return patches.unfold()


def _conv2d_shape(module: nn.Module) -> tuple[int, int]:
    assert isinstance(module, nn.Conv2d)
    kh, kw = module.kernel_size
    return module.out_channels, module.in_channels * kh * kw


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    assert isinstance(module, nn.Linear)
    return module.out_features, module.in_features


def _transposed_shape(module: nn.Module) -> tuple[int, int]:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[1]), int(weight.shape[0])


def _embedding_shape(module: nn.Module) -> tuple[int, int]:
    assert isinstance(module, nn.Embedding)
    return module.embedding_dim, module.num_embeddings


def _is_hf_conv1d(module: nn.Module) -> bool:
    # GPT-2-style Hugging Face models: weight (in, out), y = x @ W + b. Recognised by
    # name and layout so that sourcekit never imports transformers.
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and hasattr(module, "bias")
        and isinstance(getattr(module, "nf", None), int)
        and weight.shape[1] == module.nf  # type: ignore[union-attr]
    )


def _embedding_check(name: str, module: nn.Module) -> None:
    assert isinstance(module, nn.Embedding)
    if module.max_norm is not None or module.scale_grad_by_freq:
        raise UnsupportedModuleError(
            f"The Embedding layer {name!r} uses max_norm={module.max_norm!r}, "
            f"scale_grad_by_freq={module.scale_grad_by_freq!r}; sourcekit supports embeddings "
            "without them (max_norm rewrites the table during the forward pass, "
            "scale_grad_by_freq couples the examples of a batch). Exclude it with modules=[...]."
        )


def _embedding_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert isinstance(module, nn.Embedding)
    indices = x.reshape(x.shape[0], -1).long()
    if module.padding_idx is not None:  # the padding row receives no gradient
        indices = torch.where(indices == module.padding_idx, -1, indices)
    return indices


LAYER_TYPES: dict[str, LayerType] = {}
"""The registered layer types by kind, in the order they were registered."""


def register_layer_type(layer_type: LayerType, *, remove: bool = False) -> None:
    """Add a layer type to the registry (or remove it), so every attributor accepts it.

    Later registrations are tried first, so an entry can take over modules that a
    built-in one would also match. The registry is process-wide: a fitted attributor
    that is unpickled in another process needs its custom layer types registered there
    too.

    Parameters
    ----------
    layer_type : LayerType
        The entry; its ``kind`` must not be registered yet.
    remove : bool, default=False
        Remove the entry of that kind instead.

    Examples
    --------
    >>> from sourcekit.gradients import LAYER_TYPES, register_layer_type
    >>> list(LAYER_TYPES)
    ['linear', 'conv2d', 'conv1d', 'embedding']
    >>> register_layer_type(LAYER_TYPES["linear"])
    Traceback (most recent call last):
    ...
    ValueError: The layer type 'linear' is registered already. Choose another kind, or remove the old entry first with register_layer_type(entry, remove=True).
    """
    if remove:
        LAYER_TYPES.pop(layer_type.kind, None)
        return
    if layer_type.kind in LAYER_TYPES:
        raise ValueError(
            f"The layer type {layer_type.kind!r} is registered already. Choose another kind, or "
            "remove the old entry first with register_layer_type(entry, remove=True)."
        )
    LAYER_TYPES[layer_type.kind] = layer_type


for _entry in (
    LayerType(
        "linear",
        matches=lambda m: isinstance(m, nn.Linear),
        shape=_linear_shape,
    ),
    LayerType(
        "conv2d",
        matches=lambda m: isinstance(m, nn.Conv2d),
        shape=_conv2d_shape,
        inputs=_conv2d_inputs,
        outputs=lambda g: g.flatten(2).transpose(1, 2),
        check=_conv2d_check,
    ),
    LayerType(
        "conv1d",
        matches=_is_hf_conv1d,
        shape=_transposed_shape,
        transposed=True,
    ),
    LayerType(
        "embedding",
        matches=lambda m: isinstance(m, nn.Embedding),
        shape=_embedding_shape,
        inputs=_embedding_inputs,
        transposed=True,
        one_hot=True,
        check=_embedding_check,
    ),
):
    register_layer_type(_entry)


def match_layer_type(module: nn.Module) -> LayerType | None:
    """The most recently registered layer type that matches ``module``, or None."""
    for entry in reversed(list(LAYER_TYPES.values())):
        if entry.matches(module):
            return entry
    return None


def layer_type(kind: str) -> LayerType:
    """The registered entry of ``kind``."""
    try:
        return LAYER_TYPES[kind]
    except KeyError:
        raise UnsupportedModuleError(
            f"No layer type {kind!r} is registered (registered: {list(LAYER_TYPES)}). A block of "
            "a custom layer type needs its entry registered in this process too: call "
            "sourcekit.gradients.register_layer_type(...) before using it."
        ) from None
