"""The curvature interface, and the eigenbasis form that most kinds share.

Every curvature (:class:`Curvature`) holds, for a set of layer blocks, (an approximation
of) the curvature H̄ of the training objective and offers:

- ``apply(fn, grads, shift)``: F(H̄ + shift·I) V for per-block matrices V of shape
  (n, d_out, d_in), where F is a spectral function (``sourcekit.curvature._spectral``)
  and ``shift`` (damping plus weight decay) is a float or a per-block dict;
  ``apply_many(fns, grads, shift)`` does the same for several functions at once;
  ``dtype=`` sets the precision of the rotations (float64 by default; F itself is
  always evaluated in float64);
- ``apply_carried(fns, carried, shift)``: the same for vectors carried along a chain of
  curvatures (SOURCE's query side, :class:`Carried`), whose results may stay in the
  curvature's own eigenbasis until the next curvature of the chain takes them;
- ``apply_rates(rates, carried, shift)``: a segment of that chain whose parameters train
  at their own rates (parameter groups, frozen layers: ``sourcekit.curvature._rates``);
- ``diagonal()``: the diagonal of H̄ in parameter coordinates, per block (d_out, d_in);
- ``mean_eigenvalues()``: the mean eigenvalue of each block (trace / dimension);
- ``to(device)``: a copy on another device.

:class:`EigenbasisCurvature` covers EK-FAC, K-FAC, the diagonal and the identity: per
block an eigenbasis Q_S ⊗ Q_A (the identity for the diagonal forms) and eigenvalues Λ of
shape (d_out, d_in), so that F(H̄)V = Q_S (F(Λ) ⊙ (Q_Sᵀ V Q_A)) Q_Aᵀ. Its eigenbasis does
not depend on the shift, so a chain can hand vectors from one such curvature to the next
with one change of basis (:meth:`EigenbasisCurvature.apply_carried`); a curvature
without such a basis (the dense forms, ``sourcekit.curvature._dense``) takes and returns
vectors in parameter coordinates, the base class's :meth:`Curvature.apply_carried`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..gradients._layers import LayerBlock
from ._rates import SegmentRates

__all__ = ["Carried", "Curvature", "EigenbasisCurvature", "KroneckerFactors", "Shift"]

Shift = float | dict[str, float]
SpectralFunction = Callable[[torch.Tensor], torch.Tensor]


def flatten_blocks(blocks: Sequence[LayerBlock], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-block matrices {name: (Q, d_out, d_in)} as flat vectors (Q, P), block by block."""
    return torch.cat([grads[b.name].reshape(grads[b.name].shape[0], -1) for b in blocks], dim=1)


def unflatten_blocks(blocks: Sequence[LayerBlock], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten_blocks`."""
    out, start = {}, 0
    for b in blocks:
        out[b.name] = flat[:, start : start + b.n_params].reshape(-1, b.d_out, b.d_in)
        start += b.n_params
    return out


def shift_of(shift: Shift, name: str) -> float:
    """The shift of block ``name``: ``shift`` itself, or its entry for the block."""
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


class Curvature(ABC):
    """What every curvature offers to scoring (see the module notes).

    A new kind subclasses it (or returns an :class:`EigenbasisCurvature`) and implements
    ``apply_many``, ``diagonal``, ``mean_eigenvalues`` and ``to``; ``apply``,
    ``apply_carried`` and ``apply_rates`` follow from ``apply_many``.

    Attributes
    ----------
    kind : str
        The name of the kind in the registry (``sourcekit.curvature.CURVATURES``).
    blocks : list of LayerBlock
        The layer blocks it covers, in order.

    Examples
    --------
    A curvature c·I (every eigenvalue c) needs the four methods only:

    >>> import torch
    >>> from sourcekit.curvature import Curvature, Inverse
    >>> from sourcekit.gradients._layers import LayerBlock
    >>> class Scaled(Curvature):
    ...     def __init__(self, blocks, c):
    ...         self.kind, self.blocks, self.c = "scaled", list(blocks), c
    ...     def apply_many(self, fns, grads, shift=0.0, dtype=None):
    ...         sigma = torch.tensor(self.c + shift, dtype=torch.float64)
    ...         return [{k: fn(sigma) * g for k, g in grads.items()} for fn in fns]
    ...     def diagonal(self):
    ...         return {b.name: torch.full((b.d_out, b.d_in), self.c) for b in self.blocks}
    ...     def mean_eigenvalues(self):
    ...         return {b.name: self.c for b in self.blocks}
    ...     def to(self, device):
    ...         return self
    >>> block = LayerBlock("fc", "linear", "fc.weight", None, d_out=2, d_in=3)
    >>> h = Scaled([block], 4.0)
    >>> h.apply(Inverse(), {"fc": torch.ones(1, 2, 3)}, shift=1.0)["fc"][0, 0]  # 1/(4 + 1)
    tensor([0.2000, 0.2000, 0.2000])
    """

    kind: str
    blocks: list[LayerBlock]

    @abstractmethod
    def apply_many(
        self,
        fns: Sequence[SpectralFunction],
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """``[apply(fn, grads, shift) for fn in fns]``, rotating ``grads`` only once."""

    def apply(
        self,
        fn: SpectralFunction,
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """F(H̄ + shift·I) applied to per-block matrices (n, d_out, d_in)."""
        return self.apply_many((fn,), grads, shift, dtype)[0]

    def apply_carried(
        self,
        fns: Sequence[SpectralFunction],
        carried: Carried,
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
    ) -> list[Carried]:
        """:meth:`apply_many` for vectors carried along a chain of curvatures.

        Here in parameter coordinates: the vectors are brought there, and so are the
        results (a curvature with an eigenbasis of its own keeps them in it).
        """
        return [
            Carried(out) for out in self.apply_many(fns, carried.in_parameters(), shift, dtype)
        ]

    def apply_rates(
        self,
        rates: SegmentRates,
        carried: Carried,
        shift: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> tuple[Carried, Carried]:
        """(u, v_next) of a segment whose parameters train at their own rates.

        u = P^½ R(K) P^½ v and v_next = v − (H̄ + Λ) u with K = P^½ (H̄ + Λ) P^½, P the
        parameters' rates relative to a reference and Λ their coupled decays plus
        ``shift`` (``sourcekit.curvature._rates``). Here each block takes the functions
        of its own rates and decay (their means over its entries where they differ),
        applied to that block's vectors alone, in parameter coordinates: exact for a
        block-diagonal curvature whose blocks each keep one sequence and one decay.
        """
        v = carried.in_parameters()
        u: dict[str, torch.Tensor] = {}
        after: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            alone = {k: t if k == block.name else torch.zeros_like(t) for k, t in v.items()}
            residual, decay = self.apply_many(
                rates.block_functions(block.name), alone, shift, dtype
            )
            u[block.name], after[block.name] = residual[block.name], decay[block.name]
        return Carried(u), Carried(after)

    @abstractmethod
    def diagonal(self) -> dict[str, torch.Tensor]:
        """The diagonal of H̄ in parameter coordinates, per block (d_out, d_in)."""

    @abstractmethod
    def mean_eigenvalues(self) -> dict[str, float]:
        """The mean eigenvalue (trace / dimension) of each block."""

    @abstractmethod
    def to(self, device: torch.device) -> Curvature:
        """A copy on ``device``."""


@dataclass(frozen=True)
class Carried:
    """Per-block vectors carried along a chain of curvatures (SOURCE's query side).

    ``values`` are written in parameter coordinates (``basis`` None) or in the
    eigenbasis of ``basis``; there, ``scale`` (per block, float64, or None) is a
    spectral function's values F(Λ) still to multiply them by, so that the results of
    several functions share one rotated copy of the vectors until they are used.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.curvature import Carried
    >>> v = {"fc": torch.ones(1, 2, 3)}
    >>> carried = Carried(v)  # in parameter coordinates
    >>> carried.in_parameters() is v
    True
    """

    values: dict[str, torch.Tensor]
    basis: EigenbasisCurvature | None = None
    scale: dict[str, torch.Tensor] | None = None

    def block(self, name: str) -> torch.Tensor:
        """The vectors of block ``name`` in their coordinates, scaled."""
        v = self.values[name]
        return v if self.scale is None else self.scale[name].to(v.dtype) * v

    def in_parameters(self) -> dict[str, torch.Tensor]:
        """The vectors in parameter coordinates."""
        if self.basis is None:
            return self.values if self.scale is None else {k: self.block(k) for k in self.values}
        return self.basis.unrotate({k: self.block(k) for k in self.values})

    def in_basis(
        self, target: EigenbasisCurvature, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The vectors in ``target``'s eigenbasis, in its working precision for ``dtype``.

        From another eigenbasis over the same blocks, one change of basis per block
        (:meth:`KroneckerFactors.basis_change`) instead of a rotation back to parameter
        coordinates and one forward.
        """
        if self.basis is target:
            return {k: self.block(k).to(target.work_dtype(k, dtype)) for k in self.values}
        if self.basis is not None and set(self.basis.factors) == set(target.factors):
            changed = self.basis.change_basis({k: self.block(k) for k in self.values}, target)
            return {k: v.to(target.work_dtype(k, dtype)) for k, v in changed.items()}
        return target.rotate(self.in_parameters(), dtype)

    def to(self, dtype: torch.dtype) -> Carried:
        """The vectors rounded to ``dtype`` (scaled first; unchanged where already in it)."""
        if all(v.dtype == dtype for v in self.values.values()):
            return self
        return Carried({k: self.block(k).to(dtype) for k in self.values}, self.basis)


class EigenbasisCurvature(Curvature):
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
    >>> curvature = sourcekit.InfluenceAttributor().fit(trajectory).state_.curvature
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

    def work_dtype(self, name: str, dtype: torch.dtype | None) -> torch.dtype:
        """The precision of block ``name``'s rotations: ``dtype``, or its eigenvalues'."""
        return self.factors[name].eigenvalues.dtype if dtype is None else dtype

    def rotate(
        self, grads: dict[str, torch.Tensor], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Q_Sᵀ V Q_A per block: ``grads`` in this eigenbasis, rotated in ``dtype``."""
        out = {}
        for block in self.blocks:
            work_dtype = self.work_dtype(block.name, dtype)
            work = self.factors[block.name].as_dtype(work_dtype)
            out[block.name] = work.rotate(grads[block.name].to(work_dtype))
        return out

    def unrotate(self, rotated: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Q_S W Q_Aᵀ per block, in the precision of ``rotated``: back to parameters."""
        return {
            b.name: self.factors[b.name].as_dtype(rotated[b.name].dtype).unrotate(rotated[b.name])
            for b in self.blocks
        }

    def change_basis(
        self, rotated: dict[str, torch.Tensor], target: EigenbasisCurvature
    ) -> dict[str, torch.Tensor]:
        """``rotated``, written in this eigenbasis, written in ``target``'s (one rotation
        per block, in the precision of ``rotated``)."""
        out = {}
        for block in self.blocks:
            w = rotated[block.name]
            change = self.factors[block.name].basis_change(target.factors[block.name])
            out[block.name] = change.as_dtype(w.dtype).rotate(w)
        return out

    def spectrum(self, fn: SpectralFunction, shift: Shift = 0.0) -> dict[str, torch.Tensor]:
        """F(Λ + shift) per block, (d_out, d_in), in float64."""
        return {
            b.name: fn(self.factors[b.name].eigenvalues + shift_of(shift, b.name))
            for b in self.blocks
        }

    def apply_many(
        self,
        fns: Sequence[SpectralFunction],
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """``[apply(fn, grads, shift) for fn in fns]``, rotating ``grads`` only once.

        The rotations run in ``dtype`` (default: the eigenvalues', float64). They are
        orthogonal, so they add only ``dtype``'s rounding, about eps √d of the entries'
        scale; F(σ) is evaluated in float64 and rounded once to ``dtype``.
        """
        outs: list[dict[str, torch.Tensor]] = [{} for _ in fns]
        for block in self.blocks:
            work_dtype = self.work_dtype(block.name, dtype)
            work = self.factors[block.name].as_dtype(work_dtype)
            rotated = work.rotate(grads[block.name].to(work_dtype))
            sigma = self.factors[block.name].eigenvalues + shift_of(shift, block.name)
            for out, fn in zip(outs, fns, strict=True):
                out[block.name] = work.unrotate(fn(sigma).to(rotated.dtype) * rotated)
        return outs

    def apply_carried(
        self,
        fns: Sequence[SpectralFunction],
        carried: Carried,
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
    ) -> list[Carried]:
        """:meth:`apply_many` for carried vectors, with the results left in this eigenbasis.

        The vectors are brought into this eigenbasis (one change of basis from the
        previous curvature's, see :meth:`Carried.in_basis`) and every result shares that
        one rotated copy, scaled by its function's values when it is used: a result
        taken in parameter coordinates costs one rotation back, and one handed to the
        next curvature of the chain one change of basis.
        """
        rotated = carried.in_basis(self, dtype)
        return [Carried(rotated, self, self.spectrum(fn, shift)) for fn in fns]

    def apply_rates(
        self,
        rates: SegmentRates,
        carried: Carried,
        shift: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> tuple[Carried, Carried]:
        """:meth:`Curvature.apply_rates` in this eigenbasis, with the results left in it.

        The curvature is block-diagonal, so each block takes the functions of its own
        rates; where a block's eigenbasis is the identity (the diagonal forms) they act
        entry by entry, each entry with its own rates and decay, and elsewhere they are
        those of the block's mean rates and decay. The vectors are brought into this
        eigenbasis once, as :meth:`apply_carried` does.
        """
        rotated = carried.in_basis(self, dtype)
        scales: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
        for block in self.blocks:
            f = self.factors[block.name]
            fns = (
                rates.entry_functions(block.name, f.eigenvalues)
                if f.q_s is None and f.q_a is None
                else rates.block_functions(block.name)
            )
            sigma = f.eigenvalues + shift
            for scale, fn in zip(scales, fns, strict=True):
                scale[block.name] = fn(sigma)
        return Carried(rotated, self, scales[0]), Carried(rotated, self, scales[1])

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
