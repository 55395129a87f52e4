"""A fitted curvature refined with exact curvature products (``refine_steps``).

:class:`RefinedCurvature` wraps a fitted curvature B (EK-FAC by default, fitted on all
of the segment's examples) and an operator x ↦ H̃x that applies the exact Gauss-Newton
matrix of a subset of them (:class:`~sourcekit.curvature._products.GaussNewtonProducts`),
and applies spectral functions of their blend

    A = (1 − w) B + w H̃,    w = ``weight`` in (0, 1],

by Krylov iterations (``sourcekit.curvature._krylov``). H̃ is unbiased for the segment's
exact matrix H̄ but, from a few hundred examples, noisy (of low rank: flat where no
example of the subset reaches, where SOURCE's residual is largest); B is biased (its
Kronecker eigenbasis, no coupling between layers) but estimated from every example.
The blend is a shrinkage estimate of H̄ between them; with w = 1 and every example it
is H̄ itself.

- the inverse (influence functions, Adam's residual): preconditioned conjugate
  gradients on (A + shift) x = v, with B's own inverse as the preconditioner,
  ``steps`` products;
- every other function F (SOURCE's decay e^{−sσ} and residual (1 − e^{−sσ})/σ, their
  finite-product forms): F(B) v, which B applies exactly, corrected by block Krylov
  spaces shared by the whole block of query vectors
  (:func:`~sourcekit.curvature._krylov.krylov_subspace`): W_A of A and W_B of B, both
  started from the same r combinations of the vectors that carry most of their energy
  (``rank``, :func:`~sourcekit.curvature._krylov.principal_combinations`):

      F(B) v + W_A F(W_A A W_Aᵀ) W_Aᵀ v − W_B F(W_B B W_Bᵀ) W_Bᵀ v.

  The two Rayleigh-Ritz approximations err alike where A and B agree, so their
  difference carries what A adds to B with far less of the truncation error of a few
  steps; as the spaces grow the result → F(A) v, and where A = B the two are the same
  and the result is F(B) v. A step is one product carrying r vectors, whatever the
  number of queries Q: the refinement costs r·k products' worth of passes per segment
  instead of Q·k (B's products are rotations). The part of a query outside the span of
  the r combinations is corrected only through its projections (with r ≥ Q nothing is
  outside, and W_A holds every query's own Krylov space K_k(A, v)).

Under Adam and AdamW (:class:`RefinedAdam`) the functions are of the preconditioned
K_A = p^½ (A + c) p^½ + w (``sourcekit.curvature._preconditioner``), the guide is the
eigenbasis form of B, whose K̃ is diagonal in B's eigenbasis, and the correction is taken
between the two in the same way, their spaces started from the same combinations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..gradients._layers import LayerBlock
from ._krylov import (
    Operator,
    conjugate_gradients,
    krylov_subspace,
    lanczos,
    principal_combinations,
)
from ._objects import (
    Carried,
    Curvature,
    EigenbasisCurvature,
    Shift,
    SpectralFunction,
    flatten_blocks,
    shift_of,
    unflatten_blocks,
)
from ._preconditioner import EigenbasisAdam
from ._preconditioner import SpectralFunction as _Function
from ._rates import SegmentRates
from ._spectral import Inverse

__all__ = ["RefinedCurvature"]


class RefinedCurvature(Curvature):
    """A fitted curvature B blended with exact products H̃ (see the module notes).

    Parameters
    ----------
    base : Curvature
        The fitted approximation B of H̄ (the preconditioner of the inverse; its diagonal
        and mean eigenvalues are this curvature's).
    products : callable
        x ↦ H̃ x on flat float64 vectors of shape (Q, P), blocks in ``base.blocks``
        order (:func:`~sourcekit.curvature._objects.flatten_blocks`).
    steps : int
        Products per application: conjugate-gradient iterations for the inverse,
        block Krylov steps for the other functions.
    weight : float, default=1.0
        w, the exact products' share of the blend A = (1 − w) B + w H̃, in (0, 1].
    exact_diagonal : callable, optional
        Returns the diagonal of H̃ per block (d_out, d_in), computed on first use;
        :meth:`diagonal` blends it with ``base``'s (``base``'s alone without it).
    rank : int or None, default=None
        r, the combinations of a block of query vectors that start the shared Krylov
        space of the functions other than the inverse; None: every vector of the block.

    Examples
    --------
    A dense matrix stands in for the products; a diagonal approximation guides them:

    >>> import torch
    >>> from sourcekit.curvature import EigenbasisCurvature, Inverse, KroneckerFactors, Residual
    >>> from sourcekit.curvature._refined import RefinedCurvature
    >>> from sourcekit.gradients._layers import LayerBlock
    >>> block = LayerBlock("fc", "linear", "fc.weight", None, d_out=1, d_in=3)
    >>> h = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=torch.float64)
    >>> diagonal = EigenbasisCurvature(
    ...     "diagonal", [block], {"fc": KroneckerFactors(None, None, torch.diagonal(h)[None])}
    ... )
    >>> refined = RefinedCurvature(diagonal, lambda x: x @ h, steps=3)  # w = 1: A = H
    >>> v = {"fc": torch.ones(1, 1, 3, dtype=torch.float64)}
    >>> u = refined.apply(Inverse(), v, shift=0.1)["fc"]  # (H + 0.1)⁻¹ v in 3 CG steps
    >>> bool(torch.allclose(u.reshape(1, 3) @ (h + 0.1 * torch.eye(3)), v["fc"].reshape(1, 3)))
    True
    """

    def __init__(
        self,
        base: Curvature,
        products: Operator,
        steps: int,
        exact_diagonal: Callable[[], dict[str, torch.Tensor]] | None = None,
        weight: float = 1.0,
        rank: int | None = None,
    ) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight={weight!r} must lie in (0, 1].")
        if rank is not None and rank < 1:
            raise ValueError(f"rank={rank!r} must be a positive integer or None.")
        self.kind = base.kind
        self.blocks: list[LayerBlock] = list(base.blocks)
        self.base = base
        self.products = products
        self.steps = int(steps)
        self.exact_diagonal = exact_diagonal
        self.weight = float(weight)
        self.rank = rank

    def _base_product(self, x: torch.Tensor, shift: Shift) -> torch.Tensor:
        """(B + shift) x for flat (Q, P) vectors, through B's eigenbasis."""
        applied = self.base.apply(_Identity(), unflatten_blocks(self.blocks, x), shift)
        return flatten_blocks(self.blocks, applied).to(torch.float64)

    def _blend(self, shift: Shift, like: torch.Tensor) -> Operator:
        """x ↦ (A + shift) x = (1 − w)(B + shift) x + w (H̃ + shift) x."""
        diag = self._shift_vector(shift, like)
        w = self.weight
        if w == 1.0:
            return lambda x: self.products(x) + diag * x
        return lambda x: w * (self.products(x) + diag * x) + (1 - w) * self._base_product(x, shift)

    def _shift_vector(self, shift: Shift, like: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                torch.full(
                    (b.n_params,), shift_of(shift, b.name), dtype=like.dtype, device=like.device
                )
                for b in self.blocks
            ]
        )

    def apply_many(
        self,
        fns: Sequence[SpectralFunction],
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """``[apply(fn, grads, shift) for fn in fns]`` by Krylov iterations, in float64.

        The inverse takes ``steps`` conjugate-gradient iterations on A preconditioned by
        B's inverse; the other functions are F(B) v + W_A F(T_A) W_Aᵀ v − W_B F(T_B) W_Bᵀ v,
        one block Krylov space of A of ``steps`` products (r vectors each) for all of
        them and all the vectors, and one of B. ``dtype`` is accepted for the common
        interface: the iterations run in float64.
        """
        v = flatten_blocks(self.blocks, grads).to(torch.float64)
        operator = self._blend(shift, v)

        def precondition(r: torch.Tensor) -> torch.Tensor:
            applied = self.base.apply(Inverse(), unflatten_blocks(self.blocks, r), shift)
            return flatten_blocks(self.blocks, applied).to(torch.float64)

        results: dict[int, torch.Tensor] = {}
        spectral = [i for i, fn in enumerate(fns) if not isinstance(fn, Inverse)]
        for i, fn in enumerate(fns):
            if isinstance(fn, Inverse):
                results[i] = conjugate_gradients(operator, v, self.steps, precondition)
        if spectral:
            wanted = [fns[i] for i in spectral]
            combinations = principal_combinations(v, self.rank)
            space = krylov_subspace(operator, combinations @ v, self.steps)
            blended = space.apply(wanted, v)
            guide = self._guide(wanted, grads, combinations, shift)
            for i, a, c in zip(spectral, blended, guide, strict=True):
                results[i] = a + c
        return [unflatten_blocks(self.blocks, results[i]) for i in range(len(fns))]

    def _guide(
        self,
        fns: Sequence[SpectralFunction],
        grads: dict[str, torch.Tensor],
        combinations: torch.Tensor,
        shift: Shift,
    ) -> list[torch.Tensor]:
        """F(B) v − W_B F(W_B B W_Bᵀ) W_Bᵀ v for each function, flat: what B's exact
        functions correct in their projection on B's own block Krylov space W_B, started
        from the same ``combinations`` of the vectors. Where B has an eigenbasis both are
        taken in it, where B is diagonal: one rotation there and one back, no product."""
        if not isinstance(self.base, EigenbasisCurvature):
            v = flatten_blocks(self.blocks, grads).to(torch.float64)
            space = krylov_subspace(
                lambda x: self._base_product(x, shift), combinations @ v, self.steps
            )
            exact = self.base.apply_many(fns, grads, shift)
            return [
                flatten_blocks(self.blocks, f).to(torch.float64) - g
                for f, g in zip(exact, space.apply(list(fns), v), strict=True)
            ]
        sigma = _flat(self.blocks, self.base.spectrum(_Identity(), shift)).to(torch.float64)
        return _eigenbasis_correction(self.base, grads, sigma, combinations, fns, self.steps)

    def apply_rates(
        self,
        rates: SegmentRates,
        carried: Carried,
        shift: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> tuple[Carried, Carried]:
        """:meth:`Curvature.apply_rates` for any per-parameter rates, as the dense kinds do.

        With P = s_p / s (each parameter's learning-rate sum relative to the fastest
        one's), Λ the coupled decays plus ``shift`` and R the residual of the fastest
        sequence: u = P^½ R(K) P^½ v by ``steps`` Lanczos steps on the operator
        K = P^½ (A + Λ) P^½, and v_next = v − (A + Λ) u by one more product (no
        correction by B here: B's own form for these rates is per block, not R(K_B)).
        """
        sums, decays = [], []
        for b in self.blocks:
            like = torch.zeros(b.d_out, b.d_in, dtype=torch.float64)
            r = rates.blocks[b.name]
            sums.append(r.entry_sums(like).reshape(-1))
            decays.append(r.entrywise(r.coupled, like).reshape(-1))
        v = flatten_blocks(self.blocks, carried.in_parameters()).to(torch.float64)
        s_p, diag = torch.cat(sums).to(v.device), torch.cat(decays).to(v.device) + shift
        total, residual = rates.reference()
        root = (s_p / total).sqrt() if total > 0 else torch.zeros_like(s_p)

        blend = self._blend(0.0, v)

        def shifted(x: torch.Tensor) -> torch.Tensor:
            return blend(x) + diag * x

        (scaled,) = lanczos(lambda x: root * shifted(root * x), root * v, self.steps).apply(
            [residual]
        )
        u = root * scaled
        return (
            Carried(unflatten_blocks(self.blocks, u)),
            Carried(unflatten_blocks(self.blocks, v - shifted(u))),
        )

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The diagonal of A: (1 − w) B's + w H̃'s where the latter is given
        (``exact_diagonal``), else B's."""
        fitted = self.base.diagonal()
        if self.exact_diagonal is None:
            return fitted
        w = self.weight
        return {k: w * t + (1 - w) * fitted[k] for k, t in self.exact_diagonal().items()}

    def mean_eigenvalues(self) -> dict[str, float]:
        """The fitted curvature's mean eigenvalues (the influence function's default damping)."""
        return self.base.mean_eigenvalues()

    def to(self, device: torch.device) -> RefinedCurvature:
        return RefinedCurvature(
            self.base.to(device),
            self.products,
            self.steps,
            self.exact_diagonal,
            self.weight,
            self.rank,
        )

    def __repr__(self) -> str:
        return (
            f"RefinedCurvature(base={self.base!r}, steps={self.steps}, "
            f"weight={self.weight:g}, rank={self.rank})"
        )


def _flat(blocks: Sequence[LayerBlock], per_block: dict[str, torch.Tensor]) -> torch.Tensor:
    """One (d_out, d_in) tensor per block as a single flat vector, in the blocks' layout."""
    return flatten_blocks(blocks, {b.name: per_block[b.name][None] for b in blocks})[0]


class _Identity:
    """σ ↦ σ: with a shift, the product (B + shift) x through B's eigenbasis."""

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma


class RefinedAdam:
    """A segment under Adam or AdamW whose curvature is refined: SOURCE's functions of
    K_A = p^½ (A + c) p^½ + w, A the blend of a :class:`RefinedCurvature`.

    The guide is the eigenbasis form of the fitted curvature B
    (:class:`~sourcekit.curvature._preconditioner.EigenbasisAdam`): in B's eigenbasis Q its
    K̃ = Q diag(κ) Qᵀ, κ = π (Λ + c̃) + w̃, and it scores with u_B = p̃^½ F_r(K̃ + δ) p̃^½ v,
    p̃ = Q diag(π) Qᵀ (what :meth:`EigenbasisAdam.apply` returns, formed here in the same
    rotation as its correction). With C the r leading combinations of the vectors p^½ v
    (``refined.rank``), W the block Krylov space of K_A + δ started from C p^½ v
    (``refined.steps`` products with A of r vectors each) and W̃ that of K̃ + δ started
    from C p̃^½ v, the refined residual is

        u = u_B + p^½ W F_r(W (K_A + δ) Wᵀ) Wᵀ p^½ v − p̃^½ W̃ F_r(W̃ (K̃ + δ) W̃ᵀ) W̃ᵀ p̃^½ v,

    the second space built in B's eigenbasis, where K̃ is diagonal (no product). As the
    spaces grow u tends to p^½ F_r(K_A + δ) p^½ v; where A = B and p = p̃ the two
    projections are the same and u = u_B.
    The carried vector is v − (A + c + (w + δ)/p) u, as for the dense form, with one more
    product.

    Parameters
    ----------
    refined : RefinedCurvature
        The blend A, around the fitted eigenbasis curvature B.
    guide : EigenbasisAdam
        B's Adam form, built from the same p, c and w.
    """

    def __init__(self, refined: RefinedCurvature, guide: EigenbasisAdam) -> None:
        self.refined = refined
        self.guide = guide
        self.curvature = guide.curvature
        d = guide.diagonals
        self.p, self.c, self.w = (_flat(refined.blocks, x) for x in (d.p, d.c, d.w))
        self.root = self.p.clamp_min(0).sqrt()
        # the EK-FAC form's K̃ and p̃^½ in its eigenbasis: κ and π^½, in its layout
        blocks = self.curvature.blocks
        self.kappa = _flat(
            blocks, {b.name: self.curvature.factors[b.name].eigenvalues for b in blocks}
        ).to(torch.float64)
        weights = _flat(blocks, guide.weights).to(torch.float64).clamp_min(0).sqrt()
        self.half = weights.to(self.kappa.device)

    def apply(
        self,
        fns: tuple[_Function, _Function],
        carried: Carried,
        damping: float,
        carry: bool,
    ) -> tuple[dict[str, torch.Tensor], Carried | None]:
        """(u, v_next) in parameter coordinates, in float64 (see the class notes)."""
        blocks, refined = self.refined.blocks, self.refined
        vectors = carried.in_parameters()
        v = flatten_blocks(blocks, vectors).to(torch.float64)
        p, c, w, root = (t.to(v.device) for t in (self.p, self.c, self.w, self.root))
        blend = refined._blend(0.0, v)

        def shifted(x: torch.Tensor) -> torch.Tensor:  # (A + c) x
            return blend(x) + c * x

        residual = fns[0]
        start = root * v
        combinations = principal_combinations(start, refined.rank)
        space = krylov_subspace(
            lambda x: root * shifted(root * x) + (w + damping) * x,
            combinations @ start,
            refined.steps,
        )
        (scaled,) = space.apply([residual], start)
        u = root * scaled + self._guide(residual, vectors, combinations, damping)
        if not carry:
            return unflatten_blocks(blocks, u), None
        safe = torch.where(p > 0, p, torch.ones_like(p))
        own = torch.where(p > 0, (w + damping) / safe, torch.zeros_like(p))
        after = v - shifted(u) - own * u
        return unflatten_blocks(blocks, u), Carried(unflatten_blocks(blocks, after))

    def _guide(
        self,
        fn: _Function,
        vectors: dict[str, torch.Tensor],
        combinations: torch.Tensor,
        damping: float,
    ) -> torch.Tensor:
        """u_B − p̃^½ W̃ F_r(W̃ (K̃ + δ) W̃ᵀ) W̃ᵀ p̃^½ v, flat: the EK-FAC form's residual
        Q π^½ F_r(κ + δ) z less its projection on the block Krylov space W̃ of K̃ + δ
        started from the same ``combinations`` of z = π^½ Qᵀ v, both taken where K̃ is
        diagonal (in B's eigenbasis): one rotation there and one back, no product."""
        (corrected,) = _eigenbasis_correction(
            self.curvature,
            vectors,
            self.kappa + damping,
            combinations,
            [fn],
            self.refined.steps,
            self.half,
        )
        return corrected


def _eigenbasis_correction(
    curvature: EigenbasisCurvature,
    vectors: dict[str, torch.Tensor],
    sigma: torch.Tensor,
    combinations: torch.Tensor,
    fns: Sequence[SpectralFunction],
    steps: int,
    half: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """h F(σ) z − h W F(W diag(σ) Wᵀ) Wᵀ z rotated back, flat, for each function F: an
    eigenbasis form's exact function of z = h Qᵀ v less its projection on the block
    Krylov space W of diag(σ) started from ``combinations`` of z, both taken in the
    eigenbasis Q of ``curvature`` (σ flat in its layout, h = ``half`` or 1): one rotation
    there and one back, no product."""
    blocks = curvature.blocks
    z = flatten_blocks(blocks, curvature.rotate(vectors, torch.float64)).to(sigma)
    if half is not None:
        z = half * z
    space = krylov_subspace(lambda x: sigma * x, combinations.to(z) @ z, steps)
    out = []
    for fn, approx in zip(fns, space.apply(list(fns), z), strict=True):
        corrected = fn(sigma) * z - approx
        if half is not None:
            corrected = half * corrected
        out.append(flatten_blocks(blocks, curvature.unrotate(unflatten_blocks(blocks, corrected))))
    return out
