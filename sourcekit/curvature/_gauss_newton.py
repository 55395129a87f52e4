"""The dense Gauss-Newton sum of a batch, block pair by block pair, by the cheaper of two ways.

The expected Fisher's V passes (one per output and position: the columns of a square root
of the loss's output Hessian) give every example m output gradients s_{v,t} at each
position t of a block, and its gradient in pass v is G_{m,v} = Σ_t s_{v,t} a_tᵀ. The
batch's Gauss-Newton sum is Σ_m Σ_v vec G_{m,v} vec G_{m,v}ᵀ, and its block (l, l') for
the blocks' row-major layouts is

    B_{l l'} = Σ_m Σ_v vec G^l_{m,v} vec G^{l'}_{m,v}ᵀ
             = Σ_m Σ_{t,t'} (Σ_v s^l_{v,t} s^{l'}_{v,t'}ᵀ) ⊗ (a^l_t a^{l'}_{t'}ᵀ).

Two ways to form it (P_l = d_out d_in of block l, n examples):

- **jacobian**: the n V per-example gradients of each block as rows of J_l, then
  J_lᵀ J_{l'}: n V P_l P_{l'} multiply-adds;
- **kronecker**: contract the V passes first, X = Σ_v s^l_{v,t} s^{l'}_{v,t'}ᵀ and
  Y = a^l_t a^{l'}_{t'}ᵀ for every example and pair of positions, then Σ X ⊗ Y as one
  matrix product over (m, t, t'): n T_l T_{l'} P_l P_{l'} multiply-adds. With one
  position per example that is V times less arithmetic (10 times for ten classes).

:func:`choose_pair_path` takes the Kronecker form where it does less arithmetic,
T_l T_{l'} < V, for blocks whose inputs are dense vectors (Linear layers, GPT-2's
Conv1D); convolutions (whose unfolded patches have many positions) and embedding tables
(one-hot inputs) keep the Jacobian form, as does any pair that includes one of them. Both
forms compute the same sums, up to rounding. Only the pairs l ≤ l' are formed; the
others are their transposes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ..gradients._layers import LayerBlock, block_gradient_of
from ..gradients._patches import Inputs

__all__ = ["GAUSS_NEWTON_PATHS", "GaussNewtonSum", "choose_pair_path", "gauss_newton_path"]

GAUSS_NEWTON_PATHS = ("auto", "jacobian", "kronecker")
_PATH: ContextVar[str] = ContextVar("sourcekit_gauss_newton_path", default="auto")

# Numbers the Kronecker form's two intermediates (X and Y above) may hold at once; larger
# batches are contracted in chunks of examples (2**23 float64 numbers: 64 MiB).
_CHUNK_NUMBERS = 2**23


@contextmanager
def gauss_newton_path(path: str) -> Iterator[None]:
    """Force the form of the dense Gauss-Newton sum inside a ``with`` block (benchmarks, tests).

    ``"auto"`` (the default) chooses per pair of blocks by arithmetic; ``"jacobian"``
    always forms per-example gradients; ``"kronecker"`` takes the Kronecker form for
    every pair of blocks with dense inputs, whatever their positions.
    """
    if path not in GAUSS_NEWTON_PATHS:
        raise ValueError(
            f"The Gauss-Newton path must be one of {GAUSS_NEWTON_PATHS}; got {path!r}."
        )
    token = _PATH.set(path)
    try:
        yield
    finally:
        _PATH.reset(token)


def _dense_inputs(block: LayerBlock, a: Inputs) -> bool:
    return not block.one_hot and isinstance(a, torch.Tensor)


def choose_pair_path(
    first: LayerBlock, a_first: Inputs, second: LayerBlock, a_second: Inputs, passes: int
) -> str:
    """``"kronecker"`` or ``"jacobian"`` for the block pair (see the module notes)."""
    if not (_dense_inputs(first, a_first) and _dense_inputs(second, a_second)):
        return "jacobian"
    forced = _PATH.get()
    if forced != "auto":
        return forced
    return "kronecker" if a_first.shape[1] * a_second.shape[1] < passes else "jacobian"


def _add_kronecker(
    acc: torch.Tensor, a: torch.Tensor, s: torch.Tensor, a2: torch.Tensor, s2: torch.Tensor
) -> None:
    """Add Σ_m Σ_{t,t'} vec(Σ_v s_{v,t} s2_{v,t'}ᵀ) vec(a_t a2_{t'}ᵀ)ᵀ to ``acc``.

    ``acc`` (d_out d_out2, d_in d_in2) holds the pair's block with its axes in the order
    (o, o', i, i'); ``a`` (n, T, d_in), ``s`` (V, n, T, d_out), and the same for the
    second block.
    """
    n, t, d_in = a.shape
    t2, d_in2 = a2.shape[1], a2.shape[2]
    d_out, d_out2 = s.shape[-1], s2.shape[-1]
    per_example = t * t2 * (d_out * d_out2 + d_in * d_in2)
    chunk = max(1, _CHUNK_NUMBERS // per_example)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        x = torch.einsum("vnto,vnup->ntuop", s[:, rows], s2[:, rows])
        y = torch.einsum("nti,nuj->ntuij", a[rows], a2[rows])
        acc.addmm_(x.reshape(-1, d_out * d_out2).T, y.reshape(-1, d_in * d_in2))


class GaussNewtonSum:
    """Σ over the batches added of Σ_m Σ_v vec G_{m,v} vec G_{m,v}ᵀ, block pair by block pair.

    :meth:`add` takes a batch's layer inputs and the output gradients of the expected
    Fisher's passes; :meth:`matrix` returns the (P, P) sum, laid out block by block,
    each block's (d_out, d_in) matrix row-major. Each pair keeps the path it was first
    given (the paths depend on the blocks' positions, which are the same in every batch
    of a pass); a Kronecker pair keeps its sum in (o, o', i, i') order and is rearranged
    once, in :meth:`matrix`.
    """

    def __init__(self, blocks: Sequence[LayerBlock], dtype: torch.dtype, device: torch.device):
        self.blocks = list(blocks)
        self.dtype, self.device = dtype, device
        self._sums: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}

    def add(self, a: Mapping[str, Inputs], variants: Sequence[Mapping[str, torch.Tensor]]) -> None:
        passes = len(variants)
        if not passes:  # a batch without counted positions (every target ignored)
            return
        jacobians: dict[str, torch.Tensor] = {}
        stacked: dict[str, torch.Tensor] = {}

        def jacobian(b: LayerBlock) -> torch.Tensor:  # (V n, P_l), formed once per block
            if b.name not in jacobians:
                rows = [block_gradient_of(b, a, v) for v in variants]
                flat = torch.cat([g.reshape(g.shape[0], -1) for g in rows])
                jacobians[b.name] = flat.to(self.dtype)
            return jacobians[b.name]

        def outputs(b: LayerBlock) -> torch.Tensor:  # (V, n, T, d_out)
            if b.name not in stacked:
                stacked[b.name] = torch.stack([v[b.name] for v in variants]).to(self.dtype)
            return stacked[b.name]

        for i, first in enumerate(self.blocks):
            for j in range(i, len(self.blocks)):
                second = self.blocks[j]
                if (i, j) not in self._sums:
                    # a tied block's gradient sums its uses, read under their own names
                    path = (
                        "jacobian"
                        if first.uses or second.uses
                        else choose_pair_path(first, a[first.name], second, a[second.name], passes)
                    )
                    size = (first.n_params, second.n_params)
                    if path == "kronecker":
                        size = (first.d_out * second.d_out, first.d_in * second.d_in)
                    self._sums[i, j] = (
                        path,
                        torch.zeros(size, dtype=self.dtype, device=self.device),
                    )
                path, acc = self._sums[i, j]
                if path == "kronecker":
                    a1, a2 = a[first.name], a[second.name]
                    assert isinstance(a1, torch.Tensor) and isinstance(a2, torch.Tensor)
                    _add_kronecker(
                        acc, a1.to(self.dtype), outputs(first), a2.to(self.dtype), outputs(second)
                    )
                else:
                    acc.addmm_(jacobian(first).T, jacobian(second))

    def matrix(self) -> torch.Tensor:
        """The (P, P) sum of the batches added (zeros before the first)."""
        starts, start = [], 0
        for b in self.blocks:
            starts.append(start)
            start += b.n_params
        total = torch.zeros(start, start, dtype=self.dtype, device=self.device)
        for (i, j), (path, acc) in self._sums.items():
            first, second = self.blocks[i], self.blocks[j]
            if path == "kronecker":  # (o, o', i, i') -> the Kronecker layout (o, i) x (o', i')
                shape = (first.d_out, second.d_out, first.d_in, second.d_in)
                acc = acc.reshape(shape).permute(0, 2, 1, 3).reshape(first.n_params, -1)
            rows = slice(starts[i], starts[i] + first.n_params)
            cols = slice(starts[j], starts[j] + second.n_params)
            total[rows, cols] = acc
            if i != j:
                total[cols, rows] = acc.T
        return total
