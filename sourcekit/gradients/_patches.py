"""A convolution's inputs kept as images, standing for their unfolded patches.

The inputs of a Conv2d block are its patches, a_t = the c_in × kh × kw numbers under the
kernel at output position t: a (n, T, c_in kh kw) tensor that repeats every input number
up to kh kw times. Forming it writes kh kw times the image, often the largest item of a
pass, and the per-example gradient G = Σ_t s_t a_tᵀ formed from it is a batch of thin
matrix products. For a convolution with a kernel wider than 1 × 1 and many output
positions, :class:`ConvPatches` keeps the input images x (n, c_in, H, W) instead, and
forms G as the weight gradient of one grouped convolution: the n examples side by side
as groups, (1, n c_in, H, W), with output gradients (1, n d_out, H_out, W_out), give a
weight gradient of shape (n d_out, c_in, kh, kw), whose n blocks of d_out rows are the
examples' G. It is the convolution library's own kernel (``torch.nn.grad.conv2d_weight``),
which reads the images in place. On the benchmark conv net (one CPU thread) it formed G
up to 4 times faster than unfolding and contracting the patches for layers with 16 × 16
and 32 × 32 outputs, about as fast at 8 × 8, and 2 times slower at 4 × 4: layers with
fewer than ``MIN_POSITIONS`` output positions, and 1 × 1 kernels (whose patches are the
images), keep the patches (:func:`use_images`).

Everything else that needs the patches themselves (covariances, contraction with
low-rank queries, squared norms) unfolds them when it needs them (:func:`dense`), one
batch at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

__all__ = ["MIN_POSITIONS", "ConvPatches", "Inputs", "dense", "use_images"]

# Output positions from which a convolution keeps its images (measured on a CPU: the
# grouped weight gradient loses to the patches at 4 x 4 outputs, ties at 8 x 8 and wins
# from 16 x 16).
MIN_POSITIONS = 128


def use_images(kernel: tuple[int, int], positions: int) -> bool:
    """Whether a Conv2d with this kernel and number of output positions keeps its images."""
    return kernel[0] * kernel[1] > 1 and positions >= MIN_POSITIONS


class ConvPatches:
    """The patches (n, T, c_in kh kw [+ 1]) of a Conv2d, held as its input images.

    Parameters
    ----------
    images : tensor of shape (n, c_in, H, W)
        The convolution's input (before its zero padding).
    kernel, stride, padding, dilation : (int, int)
        The convolution's geometry (``groups=1``, numeric zero padding).
    bias : bool
        Whether the patches end with a constant 1 (the bias's column of G).

    It answers what sourcekit asks of layer inputs (``shape``, ``dtype``, ``device``,
    ``to``, slicing of examples, ``numel``/``element_size`` for memory accounting) and
    forms the per-example gradient with :meth:`gradient` or the patches with
    :meth:`unfold`.
    """

    __slots__ = ("bias", "dilation", "images", "kernel", "padding", "stride")

    def __init__(
        self,
        images: torch.Tensor,
        kernel: tuple[int, ...],
        stride: tuple[int, ...] = (1, 1),
        padding: tuple[int, ...] = (0, 0),
        dilation: tuple[int, ...] = (1, 1),
        bias: bool = False,
    ) -> None:
        self.images = images.contiguous()
        self.kernel = (int(kernel[0]), int(kernel[1]))
        self.stride = (int(stride[0]), int(stride[1]))
        self.padding = (int(padding[0]), int(padding[1]))
        self.dilation = (int(dilation[0]), int(dilation[1]))
        self.bias = bool(bias)

    # --- the tensor-like surface ----------------------------------------------------------
    @property
    def out_size(self) -> tuple[int, int]:
        h, w = self.images.shape[2:]
        sizes = []
        for size, k, s, p, d in zip(
            (h, w), self.kernel, self.stride, self.padding, self.dilation, strict=True
        ):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    @property
    def shape(self) -> torch.Size:
        n, c = self.images.shape[:2]
        ho, wo = self.out_size
        return torch.Size((n, ho * wo, c * self.kernel[0] * self.kernel[1] + int(self.bias)))

    @property
    def dtype(self) -> torch.dtype:
        return self.images.dtype

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: Any) -> ConvPatches:
        if isinstance(index, tuple):
            raise TypeError("ConvPatches can be indexed by examples (the first axis) only.")
        return self._like(self.images[index])

    def is_floating_point(self) -> bool:
        return self.images.is_floating_point()

    def numel(self) -> int:
        return self.images.numel()

    def element_size(self) -> int:
        return self.images.element_size()

    def to(self, *args: Any, **kwargs: Any) -> ConvPatches:
        moved = self.images.to(*args, **kwargs)
        return self if moved is self.images else self._like(moved)

    def with_bias(self) -> ConvPatches:
        """The same patches followed by a constant 1 (the bias column)."""
        return ConvPatches(
            self.images, self.kernel, self.stride, self.padding, self.dilation, bias=True
        )

    def _like(self, images: torch.Tensor) -> ConvPatches:
        return ConvPatches(
            images, self.kernel, self.stride, self.padding, self.dilation, self.bias
        )

    def __repr__(self) -> str:
        return (
            f"ConvPatches(shape={tuple(self.shape)}, kernel={self.kernel}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias}, dtype={self.dtype})"
        )

    # --- what is formed from it -----------------------------------------------------------
    def unfold(self) -> torch.Tensor:
        """The patches, (n, T, d_in): positions last in memory (a transposed view).

        The padded images viewed with strides as (n, c_in, kh, kw, H_out, W_out) and
        copied once into (n, c_in kh kw, T): ``F.unfold``'s numbers in its order (its
        CPU kernel is several times slower on images with few channels).
        """
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
        )
        x = F.pad(self.images, (pw, pw, ph, ph)) if ph or pw else self.images
        n, c = x.shape[:2]
        ho, wo = self.out_size
        s_n, s_c, s_h, s_w = x.stride()
        windows = x.as_strided(
            (n, c, kh, kw, ho, wo), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw)
        )
        if not self.bias:
            return windows.reshape(n, c * kh * kw, ho * wo).transpose(1, 2)
        out = x.new_empty(n, c * kh * kw + 1, ho * wo)
        out[:, :-1] = windows.reshape(n, c * kh * kw, ho * wo)
        out[:, -1] = 1.0
        return out.transpose(1, 2)

    def gradient(self, s: torch.Tensor) -> torch.Tensor:
        """G = Σ_t s_t a_tᵀ, (n, d_out, d_in), for output gradients ``s`` (n, T, d_out).

        The weight gradient of the examples side by side as the groups of one
        convolution (see the module notes); ``s`` may hold some of the output rows only.
        """
        x = self.images
        n, c, h, w = x.shape
        ho, wo = self.out_size
        d_out = s.shape[-1]
        s = s.to(x.dtype)
        if d_out == 0 or n == 0:
            return s.new_zeros(n, d_out, self.shape[2])
        per_group = conv2d_weight(
            x.reshape(1, n * c, h, w),
            (n * d_out, c, *self.kernel),
            s.transpose(1, 2).reshape(1, n * d_out, ho, wo),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=n,
        ).reshape(n, d_out, -1)
        if not self.bias:
            return per_group
        return torch.cat([per_group, s.sum(dim=1)[..., None]], dim=-1)


Inputs = torch.Tensor | ConvPatches
"""A block's captured layer inputs: a tensor (n, T, d_in), or a convolution's padded images."""


def dense(a: Inputs) -> torch.Tensor:
    """Layer inputs as a tensor (n, T, d_in): :class:`ConvPatches` unfolded, others as they are."""
    return a.unfold() if isinstance(a, ConvPatches) else a
