"""Curvature approximations as small objects with one interface.

Every curvature holds, for a set of layer blocks, an eigendecomposition of (an
approximation of) the Gauss-Newton matrix H̄ and offers:

- ``apply(fn, grads, shift)``: F(H̄ + shift·I) V for per-block matrices V of shape
  (n, d_out, d_in), where F is a spectral function (``sourcekit.curvature._spectral``)
  and ``shift`` (damping plus weight decay) is a float or a per-block dict;
  ``apply_many(fns, grads, shift)`` does the same for several functions at once;
  ``dtype=`` sets the precision of the rotations (float64 by default; F itself is
  always evaluated in float64);
- ``diagonal()``: the diagonal of H̄ in parameter coordinates, per block (d_out, d_in);
- ``mean_eigenvalues()``: the mean eigenvalue of each block (trace / dimension).

``EigenbasisCurvature`` covers EK-FAC, K-FAC, the diagonal and the identity: per block
an eigenbasis Q_S ⊗ Q_A (the identity for the diagonal forms) and eigenvalues Λ of shape
(d_out, d_in), so that F(H̄)V = Q_S (F(Λ) ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ. ``DenseCurvature`` is the
exact matrix over all blocks jointly (tiny models only: tests and teaching).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..gradients._layers import LayerBlock

__all__ = ["DenseCurvature", "EigenbasisCurvature", "KroneckerFactors"]

Shift = float | dict[str, float]


def _shift_of(shift: Shift, name: str) -> float:
    return float(shift[name]) if isinstance(shift, dict) else float(shift)


@dataclass
class KroneckerFactors:
    """One block's eigenbasis and eigenvalues (float64).

    The block's curvature is (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ, acting on (d_out, d_in)
    matrices V as Q_S (Λ ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ.

    Attributes
    ----------
    q_s : tensor of shape (d_out, d_out) or None
        Orthonormal eigenbasis of the output-gradient side; None for the identity.
    q_a : tensor of shape (d_in, d_in) or None
        Orthonormal eigenbasis of the input side; None for the identity.
    eigenvalues : tensor of shape (d_out, d_in)
        Λ, one eigenvalue per entry of the rotated matrix.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.curvature import KroneckerFactors
    >>> q_s = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # orthonormal
    >>> factors = KroneckerFactors(q_s, None, torch.ones(2, 3, dtype=torch.float64))
    >>> v = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    >>> factors.rotate(v)  # Q_Sᵀ V Q_A, with Q_A the identity
    tensor([[3., 4., 5.],
            [0., 1., 2.]], dtype=torch.float64)
    >>> torch.equal(factors.unrotate(factors.rotate(v)), v)
    True
    """

    q_s: torch.Tensor | None  # (d_out, d_out), None for the identity
    q_a: torch.Tensor | None  # (d_in, d_in), None for the identity
    eigenvalues: torch.Tensor  # (d_out, d_in)

    def as_dtype(self, dtype: torch.dtype) -> KroneckerFactors:
        """The eigenbases in ``dtype`` (the eigenvalues stay as they are)."""
        if self.eigenvalues.dtype == dtype:
            return self
        return KroneckerFactors(
            None if self.q_s is None else self.q_s.to(dtype),
            None if self.q_a is None else self.q_a.to(dtype),
            self.eigenvalues,
        )

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        if self.q_s is not None:
            v = self.q_s.T @ v
        if self.q_a is not None:
            v = v @ self.q_a
        return v

    def unrotate(self, w: torch.Tensor) -> torch.Tensor:
        if self.q_a is not None:
            w = w @ self.q_a.T
        if self.q_s is not None:
            w = self.q_s @ w
        return w

    def basis_change(self, target: KroneckerFactors) -> KroneckerFactors:
        """The rotation from this eigenbasis to ``target``'s, as factors (in float64).

        ``self.basis_change(target).rotate(w)`` equals ``target.rotate(self.unrotate(w))``
        with one rotation instead of two: its factors are Q_Sᵀ Q'_S (left) and
        Q_Aᵀ Q'_A (right), products of orthogonal matrices, formed once per pair of
        bases. The eigenvalues are the target's.
        """

        def product(mine: torch.Tensor | None, theirs: torch.Tensor | None):  # type: ignore[no-untyped-def]
            if mine is None:
                return theirs
            if theirs is None:
                return mine.T
            return mine.T @ theirs

        return KroneckerFactors(
            product(self.q_s, target.q_s), product(self.q_a, target.q_a), target.eigenvalues
        )


class _Curvature:
    """What every curvature offers; subclasses implement ``apply_many``."""

    blocks: list[LayerBlock]

    def apply_many(
        self,
        fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
        *,
        rotated: bool = False,
        targets: Sequence[EigenbasisCurvature | None] | None = None,
    ) -> list[dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """F(H̄ + shift·I) applied to per-block matrices (n, d_out, d_in)."""
        return self.apply_many((fn,), grads, shift, dtype)[0]


class EigenbasisCurvature(_Curvature):
    """Block-diagonal curvature with a Kronecker-factored eigenbasis per block.

    What :func:`~sourcekit.curvature.fit_curvature` returns for EK-FAC, K-FAC, the
    diagonal and the identity.

    Parameters
    ----------
    kind : str
        "ekfac", "kfac", "diagonal" or "identity" (for reporting).
    blocks : sequence of LayerBlock
        The layer blocks, each with its name and gradient shape (d_out, d_in).
    factors : dict of block name to KroneckerFactors
        Each block's eigenbasis and eigenvalues.

    Examples
    --------
    The EK-FAC curvature an influence function fits at the final parameters of a small
    network, applied to per-block matrices of shape (n, d_out, d_in):

    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.curvature import Inverse
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(model, data, [stage], progress=False)
    >>> curvature = sourcekit.InfluenceAttributor().fit(trajectory).state_["curvature"]
    >>> curvature
    EigenbasisCurvature(kind='ekfac', blocks=['0', '2'])
    >>> grads = {b.name: torch.randn(5, b.d_out, b.d_in) for b in curvature.blocks}
    >>> {name: tuple(g.shape) for name, g in grads.items()}
    {'0': (5, 4, 4), '2': (5, 2, 5)}

    ``apply(fn, grads, shift)`` computes F(H̄ + shift·I) V; the inverse undoes the
    curvature itself:

    >>> damped = curvature.apply(lambda sigma: sigma, grads, shift=1.0)  # (H̄ + I) V
    >>> back = curvature.apply(Inverse(), damped, shift=1.0)
    >>> all(torch.allclose(back[name], grads[name].double()) for name in grads)
    True
    """

    def __init__(
        self, kind: str, blocks: Sequence[LayerBlock], factors: dict[str, KroneckerFactors]
    ) -> None:
        self.kind = kind
        self.blocks = list(blocks)
        self.factors = factors

    def to(self, device: torch.device) -> EigenbasisCurvature:
        moved = {}
        for name, f in self.factors.items():
            moved[name] = KroneckerFactors(
                None if f.q_s is None else f.q_s.to(device),
                None if f.q_a is None else f.q_a.to(device),
                f.eigenvalues.to(device),
            )
        return EigenbasisCurvature(self.kind, self.blocks, moved)

    def apply_many(
        self,
        fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
        *,
        rotated: bool = False,
        targets: Sequence[EigenbasisCurvature | None] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """``[apply(fn, grads, shift) for fn in fns]``, rotating ``grads`` only once.

        The rotations run in ``dtype`` (default: the eigenvalues', float64). They are
        orthogonal, so they add only ``dtype``'s rounding, about eps √d of the entries'
        scale; F(σ) is evaluated in float64 and rounded once to ``dtype``.

        A chain of curvatures (SOURCE's query side) can skip the way back through
        parameter coordinates: ``rotated=True`` says ``grads`` are already in this
        curvature's eigenbasis, and ``targets[i]``, when given, asks for the i-th result
        in that curvature's eigenbasis (one basis change instead of a rotation back and
        a rotation forward).
        """
        outs: list[dict[str, torch.Tensor]] = [{} for _ in fns]
        targets = list(targets) if targets is not None else [None] * len(fns)
        for block in self.blocks:
            f = self.factors[block.name]
            work_dtype = f.eigenvalues.dtype if dtype is None else dtype
            work = f.as_dtype(work_dtype)
            v = grads[block.name].to(work_dtype)
            rotated_v = v if rotated else work.rotate(v)
            sigma = f.eigenvalues + _shift_of(shift, block.name)
            for out, fn, target in zip(outs, fns, targets, strict=True):
                w = fn(sigma).to(rotated_v.dtype) * rotated_v
                if target is None:
                    out[block.name] = work.unrotate(w)
                else:
                    change = f.basis_change(target.factors[block.name]).as_dtype(work_dtype)
                    out[block.name] = change.rotate(w)
        return outs

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The diagonal of H̄ in parameter coordinates, per block (d_out, d_in)."""
        out = {}
        for block in self.blocks:
            f = self.factors[block.name]
            lam = f.eigenvalues
            if f.q_s is not None:
                lam = (f.q_s * f.q_s) @ lam
            if f.q_a is not None:
                lam = lam @ (f.q_a * f.q_a).T
            out[block.name] = lam
        return out

    def mean_eigenvalues(self) -> dict[str, float]:
        """The mean eigenvalue (trace / dimension) of each block."""
        return {b.name: float(self.factors[b.name].eigenvalues.mean()) for b in self.blocks}

    def __repr__(self) -> str:
        return f"EigenbasisCurvature(kind={self.kind!r}, blocks={[b.name for b in self.blocks]})"


class DenseCurvature(_Curvature):
    """The exact (dense) curvature matrix over all blocks, eigendecomposed in float64.

    Parameters are ordered block by block, each block's (d_out, d_in) matrix row-major.
    What :func:`~sourcekit.curvature.fit_curvature` returns for ``"exact"`` (the
    Gauss-Newton matrix) and ``"hessian"``; meant for tiny models, tests and teaching.

    Parameters
    ----------
    kind : str
        "exact" or "hessian" (for reporting).
    blocks : sequence of LayerBlock
        The layer blocks, in the order of the matrix's parameters.
    matrix : tensor of shape (P, P)
        The curvature over all P attributed parameters (symmetrised on construction).

    Attributes
    ----------
    eigenvalues : tensor of shape (P,)
    eigenvectors : tensor of shape (P, P)

    Examples
    --------
    >>> import torch
    >>> import sourcekit
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(model, data, [stage], progress=False)
    >>> influence = sourcekit.InfluenceAttributor(curvature="exact").fit(trajectory)
    >>> curvature = influence.state_["curvature"]
    >>> curvature, tuple(curvature.matrix.shape)
    (DenseCurvature(kind='exact', n_params=26), (26, 26))
    >>> bool(curvature.eigenvalues.min() > -1e-12)  # a Gauss-Newton matrix is PSD
    True
    """

    def __init__(self, kind: str, blocks: Sequence[LayerBlock], matrix: torch.Tensor) -> None:
        self.kind = kind
        self.blocks = list(blocks)
        self.matrix = 0.5 * (matrix + matrix.T)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.matrix)
        self._slices = {}
        start = 0
        for b in self.blocks:
            self._slices[b.name] = slice(start, start + b.n_params)
            start += b.n_params

    def to(self, device: torch.device) -> DenseCurvature:
        return DenseCurvature(self.kind, self.blocks, self.matrix.to(device))

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(
            [grads[b.name].reshape(grads[b.name].shape[0], -1) for b in self.blocks], dim=1
        )

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            b.name: flat[:, self._slices[b.name]].reshape(-1, b.d_out, b.d_in) for b in self.blocks
        }

    def apply_many(
        self,
        fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
        *,
        rotated: bool = False,
        targets: Sequence[EigenbasisCurvature | None] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """``[apply(fn, grads, shift) for fn in fns]``, rotating ``grads`` only once.

        Always in float64 (``dtype`` is accepted for the common interface): the dense
        forms are for tiny models, where precision matters more than speed. Its vectors
        are always in parameter coordinates (``rotated`` and ``targets``, the
        eigenbasis chain of :class:`EigenbasisCurvature`, are refused).
        """
        if rotated or any(t is not None for t in targets or ()):
            raise ValueError(
                "A DenseCurvature takes and returns vectors in parameter coordinates; "
                "rotated=True and targets are for EigenbasisCurvature chains."
            )
        v = self.flatten(grads).to(self.matrix.dtype)
        if isinstance(shift, dict) and len({float(x) for x in shift.values()}) > 1:
            diag = torch.cat(
                [
                    torch.full(
                        (b.n_params,),
                        float(shift[b.name]),
                        dtype=self.matrix.dtype,
                        device=self.matrix.device,
                    )
                    for b in self.blocks
                ]
            )
            lam, q = torch.linalg.eigh(self.matrix + torch.diag(diag))
        else:
            lam = self.eigenvalues + _shift_of(shift, self.blocks[0].name)
            q = self.eigenvectors
        rotated = v @ q
        return [self.unflatten((rotated * fn(lam)) @ q.T) for fn in fns]

    def diagonal(self) -> dict[str, torch.Tensor]:
        """The diagonal of the matrix, per block (d_out, d_in)."""
        d = torch.diagonal(self.matrix)
        return {b.name: d[self._slices[b.name]].reshape(b.d_out, b.d_in) for b in self.blocks}

    def mean_eigenvalues(self) -> dict[str, float]:
        """The mean of each block's diagonal (its trace / dimension)."""
        d = torch.diagonal(self.matrix)

        return {b.name: float(d[self._slices[b.name]].mean()) for b in self.blocks}

    def __repr__(self) -> str:
        return f"DenseCurvature(kind={self.kind!r}, n_params={self.matrix.shape[0]})"
