"""The dense curvatures of tiny models: the Gauss-Newton matrix ("exact") and the Hessian.

"exact" is the Gauss-Newton matrix mean_c E[Jᵀ ∇²_z L J] over the checkpoints c, formed
from one backward pass per output of the loss's output-Hessian square root (the expected
Fisher, computed exactly, so the ``fisher`` setting does not apply); "hessian" is the
dense Hessian of the mean training loss with respect to the blocks' parameters. Both
are one matrix over all blocks jointly, eigendecomposed in float64: meant for tests and
teaching (at most 20,000 parameters).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch.func import hessian

from ..exceptions import NonFiniteError
from ..gradients._layers import LayerBlock
from ..gradients._per_example import checkpoint_batches, model_at
from ..trajectory._inputs import ModelInputs, functional_forward
from ._gauss_newton import GaussNewtonSum
from ._objects import (
    Carried,
    Curvature,
    Shift,
    SpectralFunction,
    flatten_blocks,
    shift_of,
    unflatten_blocks,
)
from ._passes import CurvaturePasses, sum_over_ranks
from ._rates import SegmentRates
from ._spectral import Inverse

__all__ = ["DenseCurvature", "fit_gauss_newton", "fit_hessian"]

# The largest number of attributed parameters a dense curvature is formed for.
MAX_PARAMETERS = 20_000


class DenseCurvature(Curvature):
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
    >>> curvature = influence.state_.curvature
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
        """A copy on ``device``, with the eigendecomposition moved, not computed again."""
        moved = copy.copy(self)
        moved.matrix = self.matrix.to(device)
        moved.eigenvalues = self.eigenvalues.to(device)
        moved.eigenvectors = self.eigenvectors.to(device)
        return moved

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return flatten_blocks(self.blocks, grads)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return unflatten_blocks(self.blocks, flat)

    def apply_many(
        self,
        fns: Sequence[SpectralFunction],
        grads: dict[str, torch.Tensor],
        shift: Shift = 0.0,
        dtype: torch.dtype | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """``[apply(fn, grads, shift) for fn in fns]``, rotating ``grads`` only once.

        Always in float64 (``dtype`` is accepted for the common interface): the dense
        forms are for tiny models, where precision matters more than speed. A per-block
        shift changes the eigenvectors, so it has no fixed eigenbasis to keep carried
        vectors in: a chain passes through it in parameter coordinates
        (:meth:`Curvature.apply_carried`).
        """
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
            shifted = self.matrix + torch.diag(diag)
            if all(isinstance(fn, Inverse) for fn in fns):
                # (H + D)⁻¹ V by a Cholesky factorisation: a third of the arithmetic of
                # the eigendecomposition a general function needs, and all of it in
                # matrix products (the influence function's per-block default damping).
                factor, info = torch.linalg.cholesky_ex(shifted)
                if int(info) == 0:
                    solved = self.unflatten(torch.cholesky_solve(v.T, factor).T)
                    return [solved for _ in fns]
            lam, q = torch.linalg.eigh(shifted)
        else:
            lam = self.eigenvalues + shift_of(shift, self.blocks[0].name)
            q = self.eigenvectors
        rotated = v @ q
        return [self.unflatten((rotated * fn(lam)) @ q.T) for fn in fns]

    def apply_rates(
        self,
        rates: SegmentRates,
        carried: Carried,
        shift: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> tuple[Carried, Carried]:
        """:meth:`Curvature.apply_rates` exactly, for any per-parameter rates.

        K = P^½ (H̄ + Λ) P^½ is formed and eigendecomposed, with P = s_p / s each
        parameter's learning-rate sum relative to the fastest parameter's, s, and R the
        residual of that parameter's sequence; in float64, like :meth:`apply_many`.
        """
        sums, decays = [], []
        for b in self.blocks:
            like = torch.zeros(b.d_out, b.d_in, dtype=self.matrix.dtype, device=self.matrix.device)
            r = rates.blocks[b.name]
            sums.append(r.entry_sums(like).reshape(-1))
            decays.append(r.entrywise(r.coupled, like).reshape(-1))
        s_p, decay = torch.cat(sums), torch.cat(decays)
        total, residual = rates.reference()
        p = s_p / total if total > 0 else torch.zeros_like(s_p)
        root = p.sqrt()
        shifted = self.matrix + torch.diag(decay + shift)
        k = root[:, None] * shifted * root[None, :]
        lam, q = torch.linalg.eigh(0.5 * (k + k.T))
        flat = self.flatten(carried.in_parameters()).to(self.matrix.dtype)
        u = (((flat * root) @ q) * residual(lam)) @ q.T * root
        return Carried(self.unflatten(u)), Carried(self.unflatten(flat - u @ shifted))

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


def _block_params(model: torch.nn.Module, blocks: Sequence[LayerBlock]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for b in blocks for name in (b.weight, b.bias) if name is not None}


def _block_positions(
    blocks: Sequence[LayerBlock], shapes: dict[str, torch.Size], device: torch.device
) -> dict[str, torch.Tensor]:
    """Where each entry of each parameter sits in the blocks' layout (block by block,
    each block's (d_out, d_in) matrix row-major): {name: flat indices, numel}."""
    out, start = {}, 0
    for b in blocks:
        index = torch.arange(start, start + b.n_params, device=device).reshape(b.d_out, b.d_in)
        out.update({k: v.reshape(-1) for k, v in b.split(index, shapes).items()})
        start += b.n_params
    return out


def _gauss_newton_sum(passes: CurvaturePasses, model: torch.nn.Module, step: int) -> torch.Tensor:
    """Σ_m J_mᵀ ∇²_z L J_m over the examples: the expected Fisher, one backward per output,
    summed block pair by block pair (:class:`~sourcekit.curvature._gauss_newton.GaussNewtonSum`)."""
    blocks, device = passes.blocks, passes.settings.device
    total = GaussNewtonSum(blocks, torch.float64, device)
    for batch in checkpoint_batches(
        model,
        blocks,
        passes.trajectory.train,
        passes.indices,
        passes.trajectory.loss,
        fisher="expected",
        want_loss=False,
        noise=None,
        batch_size=passes.settings.batch_size,
        device=device,
        dtype=torch.float64,
        step=step,
    ):
        total.add(batch.a, batch.fisher)
    return total.matrix()


def _hessian_sum(passes: CurvaturePasses, model: torch.nn.Module, step: int) -> torch.Tensor:
    """Σ_m ∇²_θ L(z_m, θ) restricted to the blocks' parameters.

    One ``torch.func.hessian`` (forward over reverse: a Hessian-vector product per
    parameter) per batch, differentiated with respect to the parameter tensors
    themselves: a flat vector split into them would make every product's reverse pass
    scatter into a vector of all P parameters once per tensor (about 15 % of the time
    on the digits MLP). The parts are summed over the batches and laid out once.
    """
    blocks, trajectory, indices = passes.blocks, passes.trajectory, passes.indices
    batch_size, device = passes.settings.batch_size, passes.settings.device
    params = {k: v.detach() for k, v in _block_params(model, blocks).items()}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    fixed.update(dict(model.named_buffers()))
    data = trajectory.train.to(device, torch.float64)

    def batch_loss(
        tensors: dict[str, torch.Tensor], x: ModelInputs, y: torch.Tensor
    ) -> torch.Tensor:
        return trajectory.loss(functional_forward(model, {**fixed, **tensors}, x), y).sum()

    sums: dict[tuple[str, str], torch.Tensor] = {}
    for start in range(0, len(indices), batch_size):
        batch = data[indices[start : start + batch_size]]
        parts = hessian(batch_loss)(params, batch.inputs, batch.targets)
        for first, row in parts.items():
            for second, part in row.items():
                part = part.reshape(params[first].numel(), params[second].numel())
                if (first, second) in sums:
                    sums[first, second] += part
                else:
                    sums[first, second] = part
    positions = _block_positions(blocks, {k: v.shape for k, v in params.items()}, device)
    n_params = sum(b.n_params for b in blocks)
    total = torch.zeros(n_params, n_params, dtype=torch.float64, device=device)
    for (first, second), part in sums.items():
        total[positions[first][:, None], positions[second][None, :]] = part
    return total


def _fit_dense(
    kind: str,
    passes: CurvaturePasses,
    part: Callable[[CurvaturePasses, torch.nn.Module, int], torch.Tensor],
) -> DenseCurvature:
    """mean_c of ``part(passes, model at c, c)`` / N over the checkpoints, as a
    DenseCurvature."""
    blocks = passes.blocks
    n_params = sum(b.n_params for b in blocks)
    if n_params > MAX_PARAMETERS:
        raise ValueError(
            f"curvature={kind!r} builds a dense {n_params} x {n_params} matrix; it is meant for tiny "
            "models (tests and teaching). Use curvature='ekfac' for this model."
        )
    dev = passes.settings.device
    total = torch.zeros(n_params, n_params, dtype=torch.float64, device=dev)
    (n_examples,) = sum_over_ranks([], [len(passes.indices)])
    for step in passes.steps:
        model = model_at(passes.trajectory, step, blocks, device=dev, dtype=torch.float64)
        summed = part(passes, model, step)
        sum_over_ranks([summed], [])
        if not torch.isfinite(summed).all():
            raise NonFiniteError(
                f"NaN or infinity in the dense {kind} curvature at checkpoint step {step}. The run "
                "may have diverged there; choose other checkpoints or check the recorded data."
            )
        total += summed / (n_examples * len(passes.steps))
    return DenseCurvature(kind, blocks, total)


def fit_gauss_newton(passes: CurvaturePasses) -> DenseCurvature:
    """The dense Gauss-Newton matrix ("exact"), the expected Fisher computed exactly."""
    return _fit_dense("exact", passes, _gauss_newton_sum)


def fit_hessian(passes: CurvaturePasses) -> DenseCurvature:
    """The dense Hessian of the mean training loss ("hessian")."""
    return _fit_dense("hessian", passes, _hessian_sum)
