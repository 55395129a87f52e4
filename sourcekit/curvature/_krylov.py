"""Krylov iterations for functions of a symmetric operator known only through products.

An *operator* is a callable ``x ↦ A x`` on tensors of shape (Q, P): Q vectors at once,
each of P parameters, with A symmetric (a curvature plus its shift). Every column of the
batch has its own Krylov space; the products are what costs (one pass over data each),
everything else here is small dense algebra.

- :func:`lanczos` builds, for each of the Q starting vectors v, an orthonormal basis
  W_k of the Krylov space K_k(A, v) = span{v, Av, …, A^{k−1}v} with k products and the
  projection T_k = W_kᵀ A W_k. :meth:`Lanczos.apply` then returns the Lanczos
  approximation f(A)v ≈ ‖v‖ W_k f(T_k) e₁ for any spectral function f, so that one
  basis serves SOURCE's residual and decay at once. In exact arithmetic
  (Saad 1992; Druskin & Knizhnerman 1989)

      ‖f(A)v − ‖v‖ W_k f(T_k) e₁‖ ≤ 2 ‖v‖ min_{deg p < k} max_{σ∈[λ_min, λ_max]} |f(σ) − p(σ)|,

  because the approximation is exact for polynomials of degree below k and the Ritz
  values (the eigenvalues of T_k) lie in [λ_min(A), λ_max(A)]. The basis is
  reorthogonalised in full (two passes of Gram-Schmidt), so that rounding does not
  break this in float64.
- :func:`krylov_subspace` builds one orthonormal basis W for a whole block of r
  starting vectors X, the block Krylov space span{X, AX, …, A^{k−1}X} (at most r·k
  directions, r products per step), and its projection T = Wᵀ A W.
  :meth:`Subspace.apply` returns the Rayleigh-Ritz approximation W f(T) Wᵀ v for any
  vector v: for v in span(X) it contains the Krylov space K_k(A, v), so it is exact for
  polynomials of degree below k and meets the bound above; a vector outside span(X)
  is approximated only through its projection on W. :func:`principal_combinations`
  chooses X for a block of Q vectors: the r combinations of them that carry most of their
  energy, so that a few products serve many vectors.
- :func:`conjugate_gradients` solves A x = b by conjugate gradients preconditioned with
  M ≈ A⁻¹ (a callable too), starting from x = 0, k products. In exact arithmetic

      ‖x_k − x‖_A ≤ 2 ((√κ − 1)/(√κ + 1))^k ‖x‖_A,   κ = λ_max(MA)/λ_min(MA),

  and x_k is the best approximation in the A-norm among all of x_0 + K_k(MA, Mb): in
  particular at least as good as k steps of preconditioned Richardson (Neumann)
  iteration x ← x + α M (b − A x) with any step α.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Lanczos",
    "Operator",
    "Subspace",
    "conjugate_gradients",
    "krylov_subspace",
    "lanczos",
    "principal_combinations",
]

Operator = Callable[[torch.Tensor], torch.Tensor]
"""``x ↦ A x`` for a batch of vectors x of shape (Q, P), A symmetric."""


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise inner products of two (Q, P) batches: shape (Q,)."""
    return (a * b).sum(dim=1)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0 where den is 0 (a vector that has converged or was zero)."""
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(num), num / safe)


@dataclass
class Lanczos:
    """The Lanczos decomposition of Q starting vectors (see the module notes).

    Attributes
    ----------
    columns : list of tensors of shape (Q, P)
        The orthonormal columns of W_k, one tensor per step, each holding that column of
        every vector's basis (columns past an invariant subspace are 0). Kept apart
        rather than stacked: every use is a sum over the k columns, and a (Q, P, k)
        stack would be copied at every step and read across its last axis.
    projection : tensor of shape (Q, k, k)
        T_k = W_kᵀ A W_k (symmetric).
    norms : tensor of shape (Q,)
        ‖v‖ of each starting vector.
    """

    columns: list[torch.Tensor]
    projection: torch.Tensor
    norms: torch.Tensor

    def leading(self, steps: int) -> Lanczos:
        """The decomposition after the first ``steps`` products (the leading part of this one)."""
        return Lanczos(self.columns[:steps], self.projection[:, :steps, :steps], self.norms)

    def apply(self, fns: list[Callable[[torch.Tensor], torch.Tensor]]) -> list[torch.Tensor]:
        """‖v‖ W_k f(T_k) e₁ for each spectral function f: a list of (Q, P) tensors."""
        ritz, vectors = torch.linalg.eigh(self.projection)
        weights = vectors[:, 0, :] * self.norms[:, None]  # (Q, k): e₁ in the Ritz basis, scaled
        out = []
        for fn in fns:
            # the coordinates of the result in W_k: V (weights ∘ f(ritz)), (Q, k)
            coordinates = torch.einsum("qki,qi->qk", vectors, weights * fn(ritz))
            out.append(_combine(self.columns, coordinates))
        return out


def _combine(columns: list[torch.Tensor], coordinates: torch.Tensor) -> torch.Tensor:
    """Σ_j coordinates[:, j] · columns[j]: (Q, P)."""
    total = coordinates[:, :1] * columns[0]
    for j in range(1, len(columns)):
        total = torch.addcmul(total, coordinates[:, j : j + 1], columns[j])
    return total


def lanczos(operator: Operator, v: torch.Tensor, steps: int) -> Lanczos:
    """The Lanczos decomposition of ``v`` (Q, P) after ``steps`` products with A.

    Each product's result is orthogonalised against the whole basis (twice, which keeps
    the basis orthonormal to rounding in float64), and its Gram-Schmidt coefficients are
    the new column of T_k = W_kᵀ A W_k. A starting vector that spans an invariant
    subspace before ``steps`` (or is zero) gets zero columns from there on, which add
    nothing to :meth:`Lanczos.apply`.

    Examples
    --------
    With as many steps as dimensions the approximation is exact (up to rounding):

    >>> import torch
    >>> from sourcekit.curvature._krylov import lanczos
    >>> a = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]], dtype=torch.float64)
    >>> v = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    >>> (approx,) = lanczos(lambda x: x @ a, v, steps=3).apply([torch.exp])
    >>> bool(torch.allclose(approx, v @ torch.linalg.matrix_exp(a)))
    True
    """
    if steps < 1:
        raise ValueError(f"The number of Lanczos steps must be at least 1; got {steps}.")
    n_vectors = v.shape[0]
    norms = v.norm(dim=1)
    w = v / torch.where(norms == 0, torch.ones_like(norms), norms)[:, None]
    columns = [w]
    projection = torch.zeros(n_vectors, steps, steps, dtype=v.dtype, device=v.device)
    for j in range(steps):
        x = operator(columns[j])
        for _ in range(2):  # full reorthogonalisation: classical Gram-Schmidt, twice
            coefficients = torch.stack([_dot(c, x) for c in columns], dim=1)  # (Q, j + 1)
            projection[:, : j + 1, j] += coefficients
            x = x - _combine(columns, coefficients)
        if j == steps - 1:
            break
        beta = x.norm(dim=1)
        # An invariant subspace (beta at the rounding level of ‖T‖) ends the basis.
        size = projection[:, : j + 1, : j + 1].abs().amax(dim=(1, 2))
        alive = beta > 64 * (j + 1) * torch.finfo(v.dtype).eps * size
        beta = torch.where(alive, beta, torch.zeros_like(beta))
        projection[:, j + 1, j] = beta
        columns.append(torch.where(alive[:, None], x / _nonzero(beta)[:, None], 0.0))
    projection = 0.5 * (projection + projection.transpose(1, 2))
    return Lanczos(columns, projection, norms)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


@dataclass
class Subspace:
    """An orthonormal basis of a block Krylov space and A's projection on it.

    Attributes
    ----------
    basis : tensor of shape (n, P)
        W: n orthonormal rows (n ≤ r·k; directions that were already in the space when
        they arose are dropped).
    projection : tensor of shape (n, n)
        T = W A Wᵀ (rows as vectors), symmetric.
    """

    basis: torch.Tensor
    projection: torch.Tensor

    def apply(
        self, fns: list[Callable[[torch.Tensor], torch.Tensor]], v: torch.Tensor
    ) -> list[torch.Tensor]:
        """W f(T) Wᵀ v for each spectral function f and each row of ``v`` (Q, P): a list
        of (Q, P) tensors."""
        ritz, vectors = torch.linalg.eigh(self.projection)
        coordinates = (v @ self.basis.T) @ vectors  # (Q, n) in the Ritz basis
        return [((coordinates * fn(ritz)) @ vectors.T) @ self.basis for fn in fns]


def krylov_subspace(operator: Operator, start: torch.Tensor, steps: int) -> Subspace:
    """The block Krylov space of the rows of ``start`` (r, P) after ``steps`` products
    (each one carrying the newest block of directions at once).

    Each new block is orthogonalised against the basis (twice) and then orthonormalised
    within itself by its singular value decomposition (through a QR decomposition, at
    r²P operations), which drops the directions whose
    norm fell to the rounding level of the block before orthogonalisation (the space is
    invariant there): the basis stays orthonormal to rounding in float64 whatever the
    start, repeated vectors and zeros included, and the iteration stops early when no
    direction is left.

    Examples
    --------
    Two starting vectors in 4-D: two steps span the whole space, and the approximation
    is exact:

    >>> import torch
    >>> from sourcekit.curvature._krylov import krylov_subspace
    >>> a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) + 0.1
    >>> x = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    >>> space = krylov_subspace(lambda y: y @ a, x, steps=2)
    >>> space.basis.shape
    torch.Size([4, 4])
    >>> (approx,) = space.apply([torch.exp], x)
    >>> bool(torch.allclose(approx, x @ torch.linalg.matrix_exp(a)))
    True
    """
    if steps < 1:
        raise ValueError(f"The number of Krylov steps must be at least 1; got {steps}.")
    eps = torch.finfo(start.dtype).eps
    blocks: list[torch.Tensor] = []
    images: list[torch.Tensor] = []
    x = start
    for _ in range(steps):
        size = float(x.norm(dim=1).max()) if x.numel() else 0.0
        for _ in range(2):  # against the basis so far: block Gram-Schmidt, twice
            for w in blocks:
                x = x - (x @ w.T) @ w
        # x = (Q U) S Vᵀ from a Householder QR of xᵀ and the SVD of its small R: the
        # block's singular values and directions at r²P operations, backward stable
        q, r = torch.linalg.qr(x.T)
        u, s, _ = torch.linalg.svd(r)
        keep = s > 64 * max(x.shape) * eps * size
        if not bool(keep.any()):
            break
        block = (q @ u[:, keep]).T
        blocks.append(block)
        x = operator(block)
        images.append(x)
    if not blocks:
        empty = start.new_zeros(0, start.shape[1])
        return Subspace(empty, start.new_zeros(0, 0))
    basis, image = torch.cat(blocks), torch.cat(images)
    projection = basis @ image.T
    return Subspace(basis, 0.5 * (projection + projection.T))


def principal_combinations(v: torch.Tensor, rank: int | None) -> torch.Tensor:
    """The ``rank`` combinations of the rows of ``v`` (Q, P) that carry most of their
    energy, as an (r, Q) matrix C with orthonormal rows: the leading eigenvectors of the
    Gram matrix v vᵀ, so that the rows of C v are the leading right singular vectors of v
    scaled by their singular values, and their span holds the best rank-r approximation
    of the rows of v. The identity (every row) where ``rank`` is None or at least Q.

    Up to Q = 4r + 64 rows the Gram matrix is decomposed exactly (Q²P + Q³ operations);
    beyond, a randomized range finder (Halko, Martinsson and Tropp, 2011) with r + 16
    Gaussian probes from a fixed seed, applied to v vᵀ (whose eigenvalues, the squared
    singular values of v, fall off twice as fast as those), finds the same leading space
    where the energy falls off past r, at about 4 Q (r + 16) P operations."""
    n = v.shape[0]
    if rank is None or rank >= n:
        return torch.eye(n, dtype=v.dtype, device=v.device)
    if n <= 4 * rank + 64:
        _, vectors = torch.linalg.eigh(v @ v.T)
        return vectors[:, -rank:].T.flip(0)
    probes = torch.randn(
        n, rank + 16, generator=torch.Generator().manual_seed(0), dtype=v.dtype
    ).to(v.device)
    found, _ = torch.linalg.qr(v @ (v.T @ probes))  # (Q, r + 16): the range of v vᵀ Ω
    small = found.T @ v
    _, vectors = torch.linalg.eigh(small @ small.T)
    return (found @ vectors[:, -rank:]).T.flip(0)


def conjugate_gradients(
    operator: Operator,
    b: torch.Tensor,
    steps: int,
    precondition: Operator | None = None,
) -> torch.Tensor:
    """x ≈ A⁻¹ b for each column of ``b`` (Q, P): ``steps`` iterations of preconditioned CG.

    ``precondition`` applies M ≈ A⁻¹ (symmetric positive definite); None is plain CG.
    Starting from x₀ = 0, the first iterate is the preconditioned right-hand side M b
    scaled to minimise the A-norm error, and every further one improves on it (see the
    module notes for the bound).

    Examples
    --------
    >>> import torch
    >>> from sourcekit.curvature._krylov import conjugate_gradients
    >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    >>> x = conjugate_gradients(lambda x: x @ a, b, steps=2)  # exact after 2 steps in 2-D
    >>> bool(torch.allclose(x @ a, b))
    True
    """
    if steps < 1:
        raise ValueError(
            f"The number of conjugate-gradient steps must be at least 1; got {steps}."
        )
    apply_m = precondition if precondition is not None else (lambda r: r)
    x = torch.zeros_like(b)
    r = b.clone()
    z = apply_m(r)
    p = z
    rz = _dot(r, z)
    for i in range(steps):
        ap = operator(p)
        alpha = _ratio(rz, _dot(p, ap))
        x = x + alpha[:, None] * p
        if i == steps - 1:
            break
        r = r - alpha[:, None] * ap
        z = apply_m(r)
        rz_next = _dot(r, z)
        p = z + _ratio(rz_next, rz)[:, None] * p
        rz = rz_next
    return x
