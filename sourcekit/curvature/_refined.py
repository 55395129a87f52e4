"""A fitted curvature refined with exact curvature products (``refine_steps``).

:class:`RefinedCurvature` wraps a fitted curvature (EK-FAC by default) and an operator
x ↦ H̄x that applies the exact curvature it approximates
(:class:`~sourcekit.curvature._products.GaussNewtonProducts`), and applies spectral
functions of H̄ itself by Krylov iterations (``sourcekit.curvature._krylov``), the
fitted curvature serving where it helps:

- the inverse (influence functions, Adam's residual): preconditioned conjugate
  gradients on (H̄ + shift) x = v, with the fitted curvature's own inverse as the
  preconditioner, ``steps`` products;
- every other function (SOURCE's decay e^{−sσ} and residual (1 − e^{−sσ})/σ, their
  finite-product forms): the Lanczos approximation of F(H̄ + shift) v from ``steps``
  products, one Krylov basis for all the functions of a call.

The operator is any symmetric product callable on flat (Q, P) vectors, so a curvature
of another form (Adam's preconditioned P^½ H̄ P^½, for instance) plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..gradients._layers import LayerBlock
from ._krylov import Operator, conjugate_gradients, lanczos
from ._objects import (
    Carried,
    Curvature,
    Shift,
    SpectralFunction,
    flatten_blocks,
    shift_of,
    unflatten_blocks,
)
from ._rates import SegmentRates
from ._spectral import Inverse

__all__ = ["RefinedCurvature"]


class RefinedCurvature(Curvature):
    """The curvature H̄ applied exactly through products, a fitted one as its guide.

    Parameters
    ----------
    base : Curvature
        The fitted approximation of H̄ (the preconditioner of the inverse; its diagonal
        and mean eigenvalues are this curvature's).
    products : callable
        x ↦ H̄ x on flat float64 vectors of shape (Q, P), blocks in ``base.blocks``
        order (:func:`~sourcekit.curvature._objects.flatten_blocks`).
    steps : int
        Products per application: conjugate-gradient iterations for the inverse,
        Lanczos steps for the other functions.
    exact_diagonal : callable, optional
        Returns the diagonal of H̄ per block (d_out, d_in), computed on first use;
        :meth:`diagonal` returns it (Adam's diagonal decay), or ``base``'s diagonal
        without it.

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
    >>> refined = RefinedCurvature(diagonal, lambda x: x @ h, steps=3)
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
    ) -> None:
        self.kind = base.kind
        self.blocks: list[LayerBlock] = list(base.blocks)
        self.base = base
        self.products = products
        self.steps = int(steps)
        self.exact_diagonal = exact_diagonal

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

        The inverse takes ``steps`` conjugate-gradient iterations preconditioned by the
        fitted curvature's inverse; the other functions share one Lanczos basis of
        ``steps`` products. ``dtype`` is accepted for the common interface: the
        iterations run in float64.
        """
        v = flatten_blocks(self.blocks, grads).to(torch.float64)
        diag = self._shift_vector(shift, v)

        def operator(x: torch.Tensor) -> torch.Tensor:
            return self.products(x) + diag * x

        def precondition(r: torch.Tensor) -> torch.Tensor:
            applied = self.base.apply(Inverse(), unflatten_blocks(self.blocks, r), shift)
            return flatten_blocks(self.blocks, applied).to(torch.float64)

        results: dict[int, torch.Tensor] = {}
        spectral = [i for i, fn in enumerate(fns) if not isinstance(fn, Inverse)]
        for i, fn in enumerate(fns):
            if isinstance(fn, Inverse):
                results[i] = conjugate_gradients(operator, v, self.steps, precondition)
        if spectral:
            basis = lanczos(operator, v, self.steps)
            for i, out in zip(spectral, basis.apply([fns[i] for i in spectral]), strict=True):
                results[i] = out
        return [unflatten_blocks(self.blocks, results[i]) for i in range(len(fns))]

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
        K = P^½ (H̄ + Λ) P^½, and v_next = v − (H̄ + Λ) u by one more product.
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

        def shifted(x: torch.Tensor) -> torch.Tensor:
            return self.products(x) + diag * x

        (scaled,) = lanczos(lambda x: root * shifted(root * x), root * v, self.steps).apply(
            [residual]
        )
        u = root * scaled
        return (
            Carried(unflatten_blocks(self.blocks, u)),
            Carried(unflatten_blocks(self.blocks, v - shifted(u))),
        )

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The exact diagonal of H̄ where given (``exact_diagonal``), else the fitted
        curvature's."""
        if self.exact_diagonal is not None:
            return self.exact_diagonal()
        return self.base.diagonal()

    def mean_eigenvalues(self) -> dict[str, float]:
        """The fitted curvature's mean eigenvalues (the influence function's default damping)."""
        return self.base.mean_eigenvalues()

    def to(self, device: torch.device) -> RefinedCurvature:
        return RefinedCurvature(
            self.base.to(device), self.products, self.steps, self.exact_diagonal
        )

    def __repr__(self) -> str:
        return f"RefinedCurvature(base={self.base!r}, steps={self.steps})"
