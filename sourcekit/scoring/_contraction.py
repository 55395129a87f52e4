"""Query matrices against per-example training gradients: ⟨U_q, G_m⟩, formed or contracted.

Every gradient-based score is, per layer block, an inner product between a query matrix
U_q (d_out × d_in: a preconditioned query gradient, a raw one, or a column of a random
projection) and the per-example training gradient G_m = Σ_t s_{m,t} a_{m,t}ᵀ, with
a (n, T, d_in) the block's inputs and s (n, T, d_out) its output gradients at T
positions (sequence positions, or the spatial positions of a convolution):

    ⟨U_q, G_m⟩ = Σ_t s_{m,t}ᵀ U_q a_{m,t}.

Two ways to compute it for q queries and n examples (P = d_out d_in):

- **formed**: build G (n T P multiply-adds, or an outer product when T = 1; n P numbers
  written), then one matrix product, q n P;
- **contracted**: per position, U_q a_t (or s_tᵀ U_q, whichever side is narrower) and a
  dot product with the other factor: q n T P multiply-adds and n T q min(d_out, d_in)
  numbers written. With low-rank query matrices U_q = L_q R_qᵀ (rank r),
  (s_tᵀ L_q)(R_qᵀ a_t) costs q n T r (d_out + d_in) and writes 2 n T q r numbers. For
  one-hot inputs (embedding tables) U_q a_t is a column lookup: n T q d_out numbers
  gathered.

For full-rank query matrices the contraction never does less arithmetic (equal when
T = 1, a factor q T/(q + T) more otherwise); it wins by writing less when T = 1 and
q < max(d_out, d_in), and for low-rank queries and one-hot inputs. :func:`choose_path`
prices both per block in multiply-adds, counting each number written to an intermediate
as ``_STREAM`` of them and each number gathered by index as ``_GATHER`` (measured on a
CPU: a matrix product does about 10 multiply-adds in the time an elementwise pass writes
one number, and 100 in the time an indexed gather moves one), and takes the cheaper;
ties go to the contraction, which needs less memory. Both paths compute the same
numbers, up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from ..gradients._layers import (
    FactoredGradients,
    LayerBlock,
    block_gradient,
    from_block_layout,
)
from ..gradients._patches import Inputs, dense

__all__ = [
    "PATHS",
    "LowRank",
    "block_dot",
    "choose_path",
    "contraction_path",
    "gradient_dot",
    "low_rank",
    "query_matrices",
    "squared_norms",
]

PATHS = ("auto", "formed", "contracted")
_PATH: ContextVar[str] = ContextVar("sourcekit_contraction_path", default="auto")

# Numbers an intermediate may hold at once; larger batches are processed in chunks of
# examples. Per-position products (the contractions) take 2**21 (8 MiB in float32: big
# enough for efficient matrix products, small enough to stay in cache). Formed gradients
# take 2**23 (32 MiB): each chunk reads the query matrices again, so larger chunks read
# them less often (on the benchmark conv net 2**23 scored a batch 18 % faster than 2**21,
# while the contraction of a Linear layer over 16 positions was 2.2 times slower).
_CHUNK_NUMBERS = 2**21
_FORMED_CHUNK_NUMBERS = 2**23
# The cost, in multiply-adds of a matrix product, of one number written to an
# intermediate and read back, and of one number gathered by index (see the module notes).
_STREAM = 10
_GATHER = 100


@contextmanager
def contraction_path(path: str) -> Iterator[None]:
    """Force the path of :func:`gradient_dot` inside a ``with`` block (benchmarks, tests).

    ``"auto"`` (the default) chooses per block by cost; ``"formed"`` always builds the
    per-example gradients; ``"contracted"`` never does.
    """
    if path not in PATHS:
        raise ValueError(f"The contraction path must be one of {PATHS}; got {path!r}.")
    token = _PATH.set(path)
    try:
        yield
    finally:
        _PATH.reset(token)


@dataclass
class LowRank:
    """Query matrices in factored form, U_q = left_q right_qᵀ (rank r).

    Attributes
    ----------
    left : tensor of shape (q, d_out, r)
    right : tensor of shape (q, d_in, r)
        One of the two has orthonormal columns (the top singular vectors of the
        narrower side); the other carries the singular values.
    """

    left: torch.Tensor
    right: torch.Tensor
    _dense: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def rank(self) -> int:
        return int(self.left.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.left.shape[0], self.left.shape[1], self.right.shape[1])

    def dense(self) -> torch.Tensor:
        """The matrices U_q themselves, shape (q, d_out, d_in) (computed once)."""
        if self._dense is None:
            self._dense = self.left @ self.right.transpose(-1, -2)
        return self._dense

    def to(self, dtype: torch.dtype) -> LowRank:
        if self.left.dtype == dtype and self.right.dtype == dtype:
            return self
        return LowRank(self.left.to(dtype), self.right.to(dtype))


Query = torch.Tensor | LowRank


def low_rank(u: torch.Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of each matrix of ``u`` (q, d_out, d_in).

    The truncated SVD U_q = Σ_i σ_i l_i r_iᵀ ≈ Σ_{i≤r} σ_i l_i r_iᵀ, optimal in the
    spectral and Frobenius norms (Eckart-Young), computed in float64 as the projection
    onto the top r eigenvectors of the smaller Gram matrix (U Uᵀ or Uᵀ U): with L those
    of U Uᵀ, U_r = L (Lᵀ U) (2-3 times faster than a full SVD for batches of small
    matrices). The error of a score is |⟨U_q − U_q^(r), G⟩| ≤ Σ_{i>r} σ_i ‖G‖₂, since
    |l_iᵀ G r_i| ≤ ‖G‖₂. A rank of at least min(d_out, d_in) reproduces U.
    """
    u = u.double()
    r = max(1, min(int(rank), u.shape[-1], u.shape[-2]))
    if u.shape[-2] <= u.shape[-1]:
        basis = torch.linalg.eigh(u @ u.transpose(-1, -2))[1][..., -r:]  # (q, d_out, r)
        return LowRank(basis, u.transpose(-1, -2) @ basis)
    basis = torch.linalg.eigh(u.transpose(-1, -2) @ u)[1][..., -r:]  # (q, d_in, r)
    return LowRank(u @ basis, basis)


def query_matrices(
    u: Mapping[str, torch.Tensor],
    blocks: Sequence[LayerBlock],
    rank: int | None,
    dtype: torch.dtype,
) -> dict[str, Query]:
    """The query matrices of each block in ``dtype``, low-rank when ``rank`` is given.

    Blocks with one-hot inputs (embedding tables) stay exact: their contraction is a
    lookup already, and the SVD of a (d_out × vocabulary) matrix per query would cost
    more than it saves. Their matrices are stored column-major over the vocabulary, so
    that the lookup reads whole rows of memory (and no copy is made per batch).
    """
    one_hot = {b.name for b in blocks if b.one_hot}
    tied = {b.name for b in blocks if b.uses}
    out: dict[str, Query] = {}
    for name, u_k in u.items():
        if name in tied:  # contracted use by use (gradient_dot), each in its own layout
            out[name] = u_k.to(dtype)
        elif name in one_hot:
            out[name] = u_k.to(dtype).permute(2, 0, 1).contiguous().permute(1, 2, 0)
        elif rank is None:
            out[name] = u_k.to(dtype)
        else:
            out[name] = low_rank(u_k, rank).to(dtype)
    return out


def _shape(query: Query) -> tuple[int, int, int]:
    return query.shape if isinstance(query, LowRank) else tuple(query.shape)  # type: ignore[return-value]


def choose_path(
    n: int, positions: int, query: Query, one_hot: bool = False
) -> tuple[str, dict[str, float]]:
    """The cheaper path for one block, and the cost estimates of both.

    Costs are in multiply-adds, with each number written to an intermediate counted as
    ``_STREAM`` and each number gathered by index as ``_GATHER`` of them, for ``n``
    examples with ``positions`` positions each and the query matrices ``query``.
    """
    q, d_out, d_in = _shape(query)
    t = positions
    gradients = n * d_out * d_in
    if one_hot:  # G: zero-filled, then n T rows of s scattered into it
        formed = _STREAM * gradients + _GATHER * n * t * d_out + q * gradients
        contracted = (_GATHER + _STREAM) * n * t * q * d_out
    else:
        formed = _STREAM * gradients + q * gradients + (t * gradients if t > 1 else 0)
        if isinstance(query, LowRank):
            r = query.rank
            formed += q * d_out * d_in * r  # the dense matrices, rebuilt
            contracted = q * n * t * r * (d_out + d_in) + _STREAM * 2 * n * t * q * r
        else:
            narrow = min(d_out, d_in)
            contracted = q * n * t * d_out * d_in + _STREAM * n * t * q * narrow
    costs = {"formed": float(formed), "contracted": float(contracted)}
    forced = _PATH.get()
    if forced != "auto":
        return forced, costs
    return ("contracted" if contracted <= formed else "formed"), costs


def _contract_dense(u: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ_t s_tᵀ U_q a_t for dense inputs, by the narrower side first: (n, T, q) -> (q, n)."""
    q, d_out, d_in = u.shape
    n, t, _ = a.shape
    a2, s2 = a.reshape(n * t, d_in), s.reshape(n * t, d_out)
    if d_in <= d_out:  # s_tᵀ U_q: (nT, q, d_in), then the dot product with a_t
        x = (s2 @ u.permute(1, 0, 2).reshape(d_out, q * d_in)).reshape(n * t, q, d_in)
        per_position = (x * a2[:, None, :]).sum(dim=-1)
    else:  # U_q a_t: (nT, q, d_out), then the dot product with s_t
        x = (a2 @ u.reshape(q * d_out, d_in).T).reshape(n * t, q, d_out)
        per_position = (x * s2[:, None, :]).sum(dim=-1)
    return per_position.reshape(n, t, q).sum(dim=1).T


def _contract_low_rank(u: LowRank, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ_t Σ_i (s_tᵀ l_{q,i})(r_{q,i}ᵀ a_t) for dense inputs: (q, n)."""
    q, d_out, d_in = u.shape
    r = u.rank
    n, t, _ = a.shape
    sl = s.reshape(n * t, d_out) @ u.left.permute(1, 0, 2).reshape(d_out, q * r)
    ar = a.reshape(n * t, d_in) @ u.right.permute(1, 0, 2).reshape(d_in, q * r)
    return (sl * ar).reshape(n, t, q, r).sum(dim=(1, 3)).T


def _contract_one_hot(u: torch.Tensor, indices: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ_t s_tᵀ U_q e_{i_t} = Σ_t s_tᵀ U_q[:, i_t] (a column lookup): (q, n)."""
    n, t = indices.shape
    flat = indices.reshape(-1)
    keep = (flat >= 0).to(s.dtype)
    s2 = s.reshape(n * t, -1)
    # (vocabulary, q d_out): a view when ``u`` comes from query_matrices, a copy otherwise
    table = u.permute(2, 0, 1).reshape(u.shape[2], -1)
    columns = torch.nn.functional.embedding(flat.clamp_min(0), table)
    per_position = (columns.reshape(n * t, u.shape[0], -1) * s2[:, None, :]).sum(dim=-1)
    return (per_position * keep[:, None]).reshape(n, t, -1).sum(dim=1).T


def _flat(u: Query) -> torch.Tensor:
    """The query matrices as rows (q, d_out d_in), for the formed path."""
    dense = u.dense() if isinstance(u, LowRank) else u
    return dense.reshape(dense.shape[0], -1)


def _formed(block: LayerBlock, flat_u: torch.Tensor, a: Inputs, s: torch.Tensor) -> torch.Tensor:
    g = block_gradient(block, a, s)
    return flat_u @ g.reshape(g.shape[0], -1).T


def block_dot(
    block: LayerBlock, query: Query, a: Inputs, s: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """⟨U_q, G_m⟩ for one block, shape (q, n), by the cheaper path.

    ``a`` (n, T, d_in) (one-hot blocks: indices (n, T)) and ``s`` (n, T, d_out') with
    d_out' the rows of ``query`` (a slice of the block's output rows is allowed).
    Examples are processed in chunks that keep every intermediate within
    ``_CHUNK_NUMBERS`` numbers (``_FORMED_CHUNK_NUMBERS`` for formed gradients).
    """
    query = query.to(dtype)
    if block.one_hot and isinstance(query, LowRank):  # a lookup needs no factors
        query = query.dense()
    a = a.to(dtype) if a.is_floating_point() else a
    s = s.to(dtype)
    n, t = a.shape[0], a.shape[1]
    q, d_out, d_in = _shape(query)
    path, _ = choose_path(n, t, query, block.one_hot)
    if path == "formed":  # G itself (the sum over positions is a batched matrix product)
        per_example = d_out * d_in
    elif block.one_hot:
        per_example = t * q * d_out
    elif isinstance(query, LowRank):
        per_example = 2 * t * q * query.rank
    else:
        per_example = t * q * min(d_out, d_in)
    limit = _FORMED_CHUNK_NUMBERS if path == "formed" else _CHUNK_NUMBERS
    chunk = max(1, limit // max(1, per_example))
    flat_u = _flat(query) if path == "formed" else None
    parts = []
    for start in range(0, n, chunk):
        a_c, s_c = a[start : start + chunk], s[start : start + chunk]
        if flat_u is not None:
            parts.append(_formed(block, flat_u, a_c, s_c))
        elif isinstance(query, torch.Tensor) and block.one_hot:
            parts.append(_contract_one_hot(query, dense(a_c), s_c))
        elif isinstance(query, LowRank):
            parts.append(_contract_low_rank(query, dense(a_c), s_c))
        else:
            parts.append(_contract_dense(query, dense(a_c), s_c))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def gradient_dot(
    queries: Mapping[str, Query], grads: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Σ over blocks of ⟨U_q, G_m⟩: every query matrix against every example, (q, n).

    The one contraction every gradient-based kernel uses (SOURCE, influence functions,
    TracIn, gradient similarity, TRAK's projection). ``queries`` maps block names to
    query matrices (q, d_out, d_in) or :class:`LowRank` factors; the blocks of
    ``queries`` are used. ``grads`` maps block names to per-example gradients
    (n, d_out, d_in), or is a :class:`~sourcekit.gradients._layers.FactoredGradients`,
    whose layer inputs and output gradients are contracted without forming G when
    that is cheaper (:func:`choose_path`).

    Examples
    --------
    >>> import torch
    >>> from sourcekit.gradients._layers import FactoredGradients, LayerBlock
    >>> block = LayerBlock("fc", "linear", "fc.weight", None, d_out=3, d_in=4)
    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(5, 2, 4, generator=g, dtype=torch.float64)  # 5 examples, 2 positions
    >>> s = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    >>> grads = FactoredGradients([block], {"fc": a}, {"fc": s})
    >>> u = {"fc": torch.randn(6, 3, 4, generator=g, dtype=torch.float64)}  # 6 query matrices
    >>> dots = gradient_dot(u, grads, torch.float64)
    >>> formed = u["fc"].reshape(6, -1) @ grads["fc"].reshape(5, -1).T
    >>> dots.shape, bool(torch.allclose(dots, formed))
    (torch.Size([6, 5]), True)
    """
    out: torch.Tensor | None = None
    for name, query in queries.items():
        if isinstance(grads, FactoredGradients) and grads.blocks[name].uses:
            part = _tied_dot(grads.blocks[name], query, grads, dtype)
        elif isinstance(grads, FactoredGradients):
            block = grads.blocks[name]
            part = block_dot(block, query, grads.a[name], grads.s[name], dtype)
        else:
            dense = query.dense() if isinstance(query, LowRank) else query
            g = grads[name]
            part = (
                dense.reshape(dense.shape[0], -1).to(dtype) @ g.reshape(g.shape[0], -1).to(dtype).T
            )
        out = part if out is None else out + part
    if out is None:
        raise ValueError("gradient_dot needs at least one block.")
    return out


def _tied_dot(
    block: LayerBlock, query: Query, grads: FactoredGradients, dtype: torch.dtype
) -> torch.Tensor:
    """⟨U_q, G_m⟩ for a tied block, G = Σ over uses of each use's gradient in the block's
    layout: the sum over uses of ⟨U_q in the use's layout, the use's gradient⟩, each
    contracted like an ordinary block (a lookup for an embedding's use)."""
    dense = query.dense() if isinstance(query, LowRank) else query
    total: torch.Tensor | None = None
    for use in block.uses:
        u = from_block_layout(block, use, dense)
        part = block_dot(use, u, grads.a[use.name], grads.s[use.name], dtype)
        total = part if total is None else total + part
    assert total is not None
    return total


def _block_squared_norms(block: LayerBlock, a: Inputs, s: torch.Tensor) -> torch.Tensor:
    """‖G_m‖² of one block, (n,): Σ_{t,t'} (s_tᵀ s_t')(a_tᵀ a_t') when that is cheaper."""
    n, t = a.shape[0], a.shape[1]
    # Position Grams: n T² (d_in + d_out), or n T² d_out for one-hot rows (an equality
    # test), against n T d_out d_in to form G (plus its n d_out d_in zeros when one-hot).
    gram_cost = t * t * (block.d_out + (0 if block.one_hot else block.d_in))
    if gram_cost >= (1 if block.one_hot else t) * block.n_params:
        g = block_gradient(block, a, s)
        return (g.reshape(n, -1) ** 2).sum(dim=1)
    s_gram = s @ s.transpose(1, 2)  # (n, T, T)
    a = dense(a)
    if block.one_hot:  # e_iᵀ e_j = [i = j], and padding (-1) selects nothing
        a_gram = ((a[:, :, None] == a[:, None, :]) & (a[:, :, None] >= 0)).to(s.dtype)
    else:
        a_gram = a @ a.transpose(1, 2)
    return (s_gram * a_gram).sum(dim=(1, 2))


def squared_norms(grads: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """‖G_m‖² summed over the blocks, shape (n,), without forming G when cheaper.

    For :class:`~sourcekit.gradients._layers.FactoredGradients`, ‖Σ_t s_t a_tᵀ‖² =
    Σ_{t,t'} (s_tᵀ s_t')(a_tᵀ a_t') costs n T² (d_in + d_out) instead of n T d_out d_in.
    """
    total: torch.Tensor | None = None
    for name in grads:
        if isinstance(grads, FactoredGradients) and not grads.blocks[name].uses:
            a = grads.a[name]
            a = a.to(dtype) if a.is_floating_point() else a
            part = _block_squared_norms(grads.blocks[name], a, grads.s[name].to(dtype))
        else:
            g = grads[name]
            part = (g.reshape(g.shape[0], -1).to(dtype) ** 2).sum(dim=1)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("squared_norms needs at least one block.")
    return total
