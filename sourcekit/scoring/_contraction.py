"""Query matrices against per-example training gradients: ⟨U_q, G_m⟩, formed or contracted.

Every gradient-based score is, per layer block, an inner product between a query matrix
U_q (d_out × d_in: a preconditioned query gradient, a raw one, or a column of a random
projection) and the per-example training gradient G_m = Σ_t s_{m,t} a_{m,t}ᵀ, with
a (n, T, d_in) the block's inputs and s (n, T, d_out) its output gradients at T
positions (sequence positions, or the spatial positions of a convolution):

    ⟨U_q, G_m⟩ = Σ_t s_{m,t}ᵀ U_q a_{m,t}.

Two ways to compute it for q queries and n examples (multiply-adds, leading terms):

- **formed**: build G (n T d_out d_in, or n d_out d_in when T = 1), then one matrix
  product, q n d_out d_in; G takes n d_out d_in numbers of memory;
- **contracted**: per position, U_q a_t (or s_tᵀ U_q, whichever side is narrower) and a
  dot product with the other factor, q n T d_out d_in, with an intermediate of
  n T q min(d_out, d_in) numbers. With low-rank query matrices
  U_q = L_q R_qᵀ (rank r), (s_tᵀ L_q)(R_qᵀ a_t) costs q n T r (d_out + d_in). For one-hot
  inputs (embedding tables) U_q a_t is a column lookup: q n T d_out.

For full-rank query matrices the formed path is never more than a factor of
(T + q)/(q T) ≤ 1 + 1/q behind in arithmetic, and ahead when T > 1 and q > 1; the
contraction avoids G's memory and wins for one-hot inputs and for low-rank queries.
:func:`gradient_dot` estimates both costs per block (arithmetic plus the numbers written
to intermediates) and takes the cheaper; ties go to the contraction, which needs less
memory. Both paths compute the same numbers, up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..gradients._layers import FactoredGradients, LayerBlock, block_gradient

__all__ = [
    "PATHS",
    "LowRank",
    "block_dot",
    "choose_path",
    "contraction_path",
    "gradient_dot",
    "low_rank",
    "query_matrices",
]

PATHS = ("auto", "formed", "contracted")
_PATH: ContextVar[str] = ContextVar("sourcekit_contraction_path", default="auto")

# Numbers an intermediate (formed gradients, or per-position products) may hold at once;
# larger batches are processed in chunks of examples (64 MiB in float32).
_CHUNK_NUMBERS = 2**24


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


@dataclass(frozen=True)
class LowRank:
    """Query matrices in factored form, U_q = left_q right_qᵀ.

    Attributes
    ----------
    left : tensor of shape (q, d_out, r)
        The left singular vectors times the singular values.
    right : tensor of shape (q, d_in, r)
        The right singular vectors.
    """

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.left.shape[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.left.shape[0], self.left.shape[1], self.right.shape[1])

    def dense(self) -> torch.Tensor:
        """The matrices U_q themselves, shape (q, d_out, d_in)."""
        return self.left @ self.right.transpose(-1, -2)

    def to(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.left.to(dtype), self.right.to(dtype))


Query = torch.Tensor | LowRank


def low_rank(u: torch.Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of each matrix of ``u`` (q, d_out, d_in).

    Truncated SVD in float64: U_q = Σ_i σ_i l_i r_iᵀ ≈ Σ_{i≤r} σ_i l_i r_iᵀ, optimal in
    the spectral and Frobenius norms (Eckart-Young). The error of a score is then
    |⟨U_q − U_q^(r), G⟩| ≤ Σ_{i>r} σ_i ‖G‖₂, since |l_iᵀ G r_i| ≤ ‖G‖₂.
    """
    left, sigma, right_h = torch.linalg.svd(u.double(), full_matrices=False)
    r = min(int(rank), sigma.shape[-1])
    return LowRank(left[..., :r] * sigma[:, None, :r], right_h[:, :r, :].transpose(-1, -2))


def query_matrices(
    u: Mapping[str, torch.Tensor],
    blocks: Sequence[LayerBlock],
    rank: int | None,
    dtype: torch.dtype,
) -> dict[str, Query]:
    """The query matrices of each block in ``dtype``, low-rank when ``rank`` is given.

    Blocks with one-hot inputs (embedding tables) stay exact: their contraction is a
    lookup already, and the SVD of a (d_out × vocabulary) matrix per query would cost
    more than it saves.
    """
    one_hot = {b.name for b in blocks if b.one_hot}
    out: dict[str, Query] = {}
    for name, u_k in u.items():
        if rank is None or name in one_hot:
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

    Costs count multiply-adds plus the numbers written to intermediates, for ``n``
    examples with ``positions`` positions each and the query matrices ``query``.
    """
    q, d_out, d_in = _shape(query)
    t = positions
    gradients = n * d_out * d_in
    if one_hot:
        formed = gradients + n * t * d_out + q * gradients + gradients
        contracted = q * n * t * d_out + n * t * q * d_out
    else:
        formed = (gradients if t == 1 else t * gradients) + q * gradients + gradients
        if isinstance(query, LowRank):
            r = query.rank
            formed += q * d_out * d_in * r  # the dense matrices, rebuilt
            contracted = q * n * t * r * (d_out + d_in) + 2 * n * t * q * r
        else:
            narrow = min(d_out, d_in)
            contracted = q * n * t * d_out * d_in + n * t * q * narrow
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
        per_position = torch.bmm(x, a2[:, :, None])[..., 0]
    else:  # U_q a_t: (nT, q, d_out), then the dot product with s_t
        x = (a2 @ u.reshape(q * d_out, d_in).T).reshape(n * t, q, d_out)
        per_position = torch.bmm(x, s2[:, :, None])[..., 0]
    return per_position.reshape(n, t, q).sum(dim=1).T


def _contract_low_rank(u: LowRank, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ_t Σ_i (s_tᵀ l_{q,i})(r_{q,i}ᵀ a_t) for dense inputs: (q, n)."""
    q, d_out, d_in = u.shape
    r = u.rank
    n, t, _ = a.shape
    sl = s.reshape(n * t, d_out) @ u.left.permute(1, 0, 2).reshape(d_out, q * r)
    ar = a.reshape(n * t, d_in) @ u.right.permute(1, 0, 2).reshape(d_in, q * r)
    return (sl * ar).reshape(n, t, q, r).sum(dim=(1, 3)).T


def _contract_one_hot(u: Query, indices: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ_t s_tᵀ U_q e_{i_t} = Σ_t s_tᵀ U_q[:, i_t] (a column lookup): (q, n)."""
    n, t = indices.shape
    flat = indices.reshape(-1)
    keep = (flat >= 0).to(s.dtype)
    cols = flat.clamp_min(0)
    s2 = s.reshape(n * t, -1)
    if isinstance(u, LowRank):
        rows = u.right.permute(1, 0, 2)[cols]  # (nT, q, r)
        sl = (s2 @ u.left.permute(1, 0, 2).reshape(s2.shape[1], -1)).reshape(rows.shape)
        per_position = (sl * rows).sum(dim=-1)
    else:
        columns = u.permute(2, 0, 1)[cols]  # (nT, q, d_out)
        per_position = torch.bmm(columns, s2[:, :, None])[..., 0]
    return (per_position * keep[:, None]).reshape(n, t, -1).sum(dim=1).T


def _formed(block: LayerBlock, u: Query, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    dense = u.dense() if isinstance(u, LowRank) else u
    g = block_gradient(block, a, s)
    return dense.reshape(dense.shape[0], -1) @ g.reshape(g.shape[0], -1).T


def block_dot(
    block: LayerBlock, query: Query, a: torch.Tensor, s: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """⟨U_q, G_m⟩ for one block, shape (q, n), by the cheaper path.

    ``a`` (n, T, d_in) (one-hot blocks: indices (n, T)) and ``s`` (n, T, d_out') with
    d_out' the rows of ``query`` (a slice of the block's output rows is allowed).
    Examples are processed in chunks that keep every intermediate within 2**24 numbers.
    """
    query = query.to(dtype)
    a = a.to(dtype) if a.is_floating_point() else a
    s = s.to(dtype)
    n, t = a.shape[0], a.shape[1]
    q, d_out, d_in = _shape(query)
    path, _ = choose_path(n, t, query, block.one_hot)
    if path == "formed":
        per_example = d_out * d_in * (t if t > 1 and not block.one_hot else 1)
    elif block.one_hot:
        per_example = t * q * d_out
    elif isinstance(query, LowRank):
        per_example = 2 * t * q * query.rank
    else:
        per_example = t * q * min(d_out, d_in)
    chunk = max(1, _CHUNK_NUMBERS // max(1, per_example))
    parts = []
    for start in range(0, n, chunk):
        a_c, s_c = a[start : start + chunk], s[start : start + chunk]
        if path == "formed":
            parts.append(_formed(block, query, a_c, s_c))
        elif block.one_hot:
            parts.append(_contract_one_hot(query, a_c, s_c))
        elif isinstance(query, LowRank):
            parts.append(_contract_low_rank(query, a_c, s_c))
        else:
            parts.append(_contract_dense(query, a_c, s_c))
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
    >>> a, s = torch.randn(5, 2, 4), torch.randn(5, 2, 3)  # 5 examples, 2 positions
    >>> grads = FactoredGradients([block], {"fc": a}, {"fc": s})
    >>> u = {"fc": torch.randn(6, 3, 4)}  # 6 query matrices
    >>> dots = gradient_dot(u, grads, torch.float64)
    >>> formed = u["fc"].reshape(6, -1).double() @ grads["fc"].reshape(5, -1).double().T
    >>> dots.shape, bool(torch.allclose(dots, formed))
    (torch.Size([6, 5]), True)
    """
    out: torch.Tensor | None = None
    for name, query in queries.items():
        if isinstance(grads, FactoredGradients):
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
