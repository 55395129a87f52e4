"""Fitting curvature over the checkpoints of a segment (METHOD.md section 5).

For EK-FAC, at every checkpoint c of the segment, over the stage's training examples:

1. A_c = E[a aᵀ] (layer inputs, bias as an input of 1, averaged over positions, weighted
   by the loss's position weights where the layer's positions are the outputs') and
   S_c = E[Σ_t s_t s_tᵀ] (output gradients for Fisher targets, formed per output
   position with weights √w_t, so that the Fisher has the objective's scale: see
   ``_fisher_totals`` in ``sourcekit.gradients._per_example``); each batch's sum is
   formed in the working precision and accumulated across batches in float64;
2. A = mean_c A_c and S = mean_c S_c are eigendecomposed in float64 (one basis per
   segment): A = Q_A Λ_A Q_Aᵀ, S = Q_S Λ_S Q_Sᵀ;
3. Λ_c = E[(Q_Sᵀ G Q_A)^∘2] over per-example gradients G at checkpoint c, in that basis;
   the eigenvalues are Λ = mean_c Λ_c.

K-FAC stops after step 2 with Λ = Λ_S ⊗ Λ_A; "diagonal" is Λ = mean_c E[G^∘2] in
parameter coordinates, which is also what every kind but the dense ones uses for blocks
with one-hot inputs (embedding tables, ``LayerBlock.diagonal``); "identity" is Λ = 1; "exact" is the dense Gauss-Newton matrix
mean_c E[Jᵀ ∇²_z L J], and "hessian" the dense Hessian of the mean training loss.

The layer inputs and output gradients of a pass are kept in memory, within a byte
budget, so that the eigenvalue correction (and later the scoring of training examples)
does not need another pass over the data.

Under ``torch.distributed`` each rank passes its shard of the examples (see
``sourcekit._distributed.shard``): the sums above and the counts that normalise them are
summed over the ranks before they are divided or eigendecomposed, so every rank returns
the same curvature, that of all the examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, hessian

from .._distributed import all_reduce_sum, is_distributed
from ..exceptions import NonFiniteError
from ..gradients._layers import (
    LayerBlock,
    block_gradient,
    block_gradients,
    squared_gradient_sum,
)
from ..gradients._patches import Inputs, dense
from ..gradients._per_example import (
    FISHER,
    BatchFactors,
    FisherNoise,
    checkpoint_batches,
    model_at,
)
from ..trajectory import Trajectory
from ._objects import DenseCurvature, EigenbasisCurvature, KroneckerFactors

__all__ = ["CURVATURES", "CacheBudget", "FitSettings", "fisher_seed", "fit_curvature"]

CURVATURES = ("ekfac", "kfac", "diagonal", "identity", "exact", "hessian")
"""The values of ``curvature=`` that :func:`fit_curvature` and the attributors accept."""


def fisher_seed(random_state: int | None, step: int) -> int:
    """Seed of the Fisher targets sampled at checkpoint ``step``."""
    base = 0 if random_state is None else int(random_state)
    return int(np.random.SeedSequence([base, int(step), 7]).generate_state(1)[0])


class CacheBudget:
    """Bytes that cached layer inputs and output gradients may occupy."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.used = 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


class PassCache:
    """The batches of one pass over a checkpoint, kept whole within a budget or not at all.

    The first batch offered decides: the pass's bytes are projected from it (the same
    bytes per example for the whole pass) and reserved in the budget. If they do not
    fit, nothing is kept and :attr:`active` turns False at once, so that the pass can
    stop computing what only the cache would have used (the training-loss gradients
    during a curvature pass). The reservation is settled to the bytes actually kept
    when the pass ends (:meth:`close`), or returned with :meth:`drop`.
    """

    def __init__(self, budget: CacheBudget, n_examples: int, active: bool = True) -> None:
        self.budget = budget
        self.n_examples = int(n_examples)
        self.active = active
        self.batches: list[BatchFactors] = []
        self._reserved = 0
        self._kept = 0

    def wanted(self) -> bool:
        """Whether batches are still being kept (asked before computing them)."""
        return self.active

    def offer(self, entry: BatchFactors) -> None:
        if not self.active:
            return
        nbytes = entry.nbytes()
        if not self.batches:
            per_example = -(-nbytes // max(1, len(entry.indices)))  # ceiling
            self._reserved = per_example * self.n_examples
            if not self.budget.take(self._reserved):
                self._reserved = 0
                self.active = False
                return
        if self._kept + nbytes > self._reserved:  # uneven batches: reserve the rest, or give up
            if not self.budget.take(self._kept + nbytes - self._reserved):
                self.drop()
                return
            self._reserved = self._kept + nbytes
        self.batches.append(entry)
        self._kept += nbytes

    def drop(self) -> None:
        """Keep nothing, and return the reserved bytes."""
        self.budget.give_back(self._reserved)
        self._reserved = self._kept = 0
        self.batches = []
        self.active = False

    def close(self) -> list[BatchFactors] | None:
        """The kept batches (None if the pass was not kept); unused bytes go back."""
        if not self.active or not self.batches:
            self.drop()
            return None
        self.budget.give_back(self._reserved - self._kept)
        self._reserved = self._kept
        return self.batches


@dataclass
class FitSettings:
    """How passes over the training data are run.

    ``dtype`` is the working precision of the covariances and of their rotations;
    ``gradient_dtype`` that of the forward and backward passes and of the kept batches
    (None: ``dtype``). Eigendecompositions always run in float64.
    """

    fisher: str = "true"
    random_state: int | None = 0
    batch_size: int = 256
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    gradient_dtype: torch.dtype | None = None

    @property
    def pass_dtype(self) -> torch.dtype:
        return self.dtype if self.gradient_dtype is None else self.gradient_dtype


@dataclass
class LossCache:
    """Per checkpoint, the batches of (indices, layer inputs, training-loss output gradients)."""

    batches: dict[int, list[BatchFactors]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(b.nbytes() for batches in self.batches.values() for b in batches)


def _check(matrix: torch.Tensor, what: str, name: str) -> None:
    if not torch.isfinite(matrix).all():
        raise NonFiniteError(
            f"NaN or infinity in the {what} of layer {name!r}. The checkpoints of this segment may "
            "have diverged; choose other checkpoints or check the recorded data."
        )


def _eigh(matrix: torch.Tensor, what: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check(matrix, what, name)
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = torch.linalg.eigh(sym.double())
    return values.clamp_min(0.0), vectors


# Numbers a chunk of per-example matrices may hold (16 MiB in float32).
_CHUNK_NUMBERS = 2**22


def _gram(x: Inputs, dtype: torch.dtype) -> torch.Tensor:
    """Σ over examples and positions of x xᵀ, formed in ``dtype``, returned in float64.

    Inputs captured in a lower precision (``gradient_dtype``) are widened first: the
    products of a batch are summed in the working precision, never in bfloat16.
    """
    x = dense(x).to(dtype)
    n, t, d = x.shape
    if t > 1 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        # Positions last in memory (a convolution's unfolded patches, (n, d, T) seen as
        # (n, T, d)). With many positions, one product per example reads them in place;
        # with few (deep layers, T < d / 2) those products are too thin to run fast, and
        # one product over all examples, after copying them side by side, is faster.
        if 2 * t < d:
            side_by_side = x.transpose(1, 2).transpose(0, 1).reshape(d, n * t)
            return (side_by_side @ side_by_side.T).double()
        rows = x.transpose(1, 2)
        chunk = max(1, _CHUNK_NUMBERS // (d * d))
        total = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for start in range(0, n, chunk):
            part = rows[start : start + chunk]
            total += (part @ part.transpose(1, 2)).sum(dim=0).double()
        return total
    flat = x.reshape(-1, d)
    return (flat.T @ flat).double()


def _position_weighted(
    x: Inputs, weights: torch.Tensor | None, dtype: torch.dtype
) -> tuple[Inputs, float]:
    """A block's inputs scaled by √w_t of the loss's output positions, and their total weight.

    Where a layer has as many positions as the outputs (a sequence model's Linear layers
    at every token), its input covariance weighs position t by the loss's weight w_t:
    Ā = Σ w_t a_t a_tᵀ / Σ w_t, so that positions the loss ignores (padding) do not count
    and K-FAC is exact where the curvature is a Kronecker product (a linear layer under a
    squared error). Other layers (convolutions, layers before a pooling) average their
    positions uniformly. The scaled inputs are in ``dtype``.
    """
    n, t = x.shape[0], x.shape[1]
    if weights is None or not isinstance(x, torch.Tensor) or tuple(weights.shape) != (n, t):
        return x, float(n * t)
    root = weights.sqrt().to(device=x.device, dtype=dtype)
    return x.to(dtype) * root[..., None], float(weights.sum())


def _sum_fisher(
    blocks: Sequence[LayerBlock],
    batch: BatchFactors,
    a_sums: dict,
    s_sums: dict,
    counts: dict,
    dtype: torch.dtype,
) -> None:
    for block in blocks:
        a, weight = _position_weighted(batch.a[block.name], batch.position_weights, dtype)
        a_sums[block.name] += _gram(a, dtype)
        counts[block.name][0] += weight
        for variant in batch.fisher:
            s_sums[block.name] += _gram(variant[block.name], dtype)
        counts[block.name][1] += a.shape[0]


def _sum_over_ranks(sums: Sequence[torch.Tensor], counts: Sequence[float]) -> list[float]:
    """Sum ``sums`` (in place) and ``counts`` over the ranks; return the summed counts.

    The seam between a pass over this rank's shard of the examples and the
    normalisation: in one process nothing changes; under ``torch.distributed`` every
    rank then holds the sums and counts of the whole training set.
    """
    if not is_distributed():
        return list(counts)
    table = torch.tensor(list(counts), dtype=torch.float64)  # integers exact up to 2**53
    all_reduce_sum([*sums, table])
    return table.tolist()


def _squared_rotated(
    block: LayerBlock,
    batch: BatchFactors,
    q_s: torch.Tensor | None,
    q_a: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Σ over examples (and Fisher variants) of (Q_Sᵀ G Q_A)^∘2, summed in ``dtype``, as float64.

    Two orders give the same numbers for T positions and V Fisher variants:

    - rotate the factors first, Q_Aᵀ a_t and Q_Sᵀ s_t, then square the gradient they form
      (without forming it when T = 1): T d_in² + V T d_out² (+ V T d_out d_in when
      T > 1) multiply-adds per example;
    - form G = Σ_t s_t a_tᵀ, then rotate it: V (T d_out d_in + d_out d_in (d_out + d_in)).

    The cheaper is taken: the first for layers with few positions (an MLP, a short
    sequence), the second for convolutions with many positions. The rotation runs in
    ``dtype`` (the working precision; orthogonal matrices are well conditioned), the
    batch's sum is returned in float64 for the accumulation across batches.
    """
    a = batch.a[block.name]
    a = a.to(dtype) if a.is_floating_point() else a
    variants = [v[block.name].to(dtype) for v in batch.fisher]
    if (q_s is None and q_a is None) or block.one_hot:
        total = sum(squared_gradient_sum(block, a, s) for s in variants)
        return torch.as_tensor(total).double()
    n, t, d_in = a.shape
    d_out = block.d_out
    q_s = None if q_s is None else q_s.to(dtype)
    q_a = None if q_a is None else q_a.to(dtype)
    n_variants = len(variants)
    rotate_first = t * d_in**2 + n_variants * t * d_out**2 <= n_variants * d_out * d_in * (
        d_out + d_in
    )
    total = torch.zeros(d_out, d_in, dtype=dtype, device=a.device)
    if rotate_first:
        a = dense(a)
        a_r = a if q_a is None else a @ q_a
        for s in variants:
            total += squared_gradient_sum(block, a_r, s if q_s is None else s @ q_s)
        return total.double()
    chunk = max(1, _CHUNK_NUMBERS // (d_out * d_in))
    for s in variants:
        for start in range(0, n, chunk):
            g = block_gradient(block, a[start : start + chunk], s[start : start + chunk])
            if q_s is not None:
                g = q_s.T @ g
            if q_a is not None:
                g = g @ q_a
            total += (g * g).sum(dim=0)
    return total.double()


def _fisher_batches(
    trajectory: Trajectory,
    blocks: Sequence[LayerBlock],
    step: int,
    indices: np.ndarray,
    settings: FitSettings,
    *,
    want_loss: bool | Callable[[], bool],
) -> Iterator[BatchFactors]:
    """One pass over ``indices`` at checkpoint ``step`` with the settings' Fisher targets."""
    model = model_at(trajectory, step, blocks, device=settings.device, dtype=settings.pass_dtype)
    return checkpoint_batches(
        model,
        blocks,
        trajectory.train,
        indices,
        trajectory.loss,
        fisher=settings.fisher,
        want_loss=want_loss,
        noise=FisherNoise(fisher_seed(settings.random_state, step)),
        batch_size=settings.batch_size,
        device=settings.device,
        dtype=settings.pass_dtype,
        step=step,
    )


def fit_curvature(
    kind: str,
    trajectory: Trajectory,
    blocks: Sequence[LayerBlock],
    steps: Sequence[int],
    indices: np.ndarray,
    settings: FitSettings,
    *,
    budget: CacheBudget | None = None,
    loss_cache: LossCache | None = None,
) -> EigenbasisCurvature | DenseCurvature:
    """Fit one curvature over the checkpoints ``steps`` using the examples ``indices``.

    When ``loss_cache`` is given, the layer inputs and training-loss output gradients of
    every batch are stored in it while the budget allows (they are what scoring needs).

    Parameters
    ----------
    kind : {"ekfac", "kfac", "diagonal", "identity", "exact", "hessian"}
        The approximation (see :data:`CURVATURES`).
    trajectory : Trajectory
        The recorded run; its checkpoints are read, its model is never modified.
    blocks : sequence of LayerBlock
        The layers to attribute through (``find_blocks(model, modules)``).
    steps : sequence of int
        The checkpoints to average over (a segment's, or the final step).
    indices : ndarray of int
        The training examples to average over (the segment's stage), or this rank's
        shard of them under ``torch.distributed``: the sums and counts are then summed
        over the ranks, so every rank must make the same call with its own shard.
    settings : FitSettings
        Fisher targets, seed, batch size, device and precision of the passes.
    budget : CacheBudget, optional
        Bytes that cached layer inputs and output gradients may occupy (default: none).
    loss_cache : LossCache, optional
        Filled with the training-loss factors of every batch, within the budget.

    Returns
    -------
    EigenbasisCurvature or DenseCurvature
        Dense for "exact" and "hessian".

    Raises
    ------
    NonFiniteError
        If NaN or infinity appears in the covariances or eigenvalues (a diverged
        checkpoint).

    Examples
    --------
    ``LayerBlock``, ``find_blocks`` and ``FitSettings`` are not part of the public API
    yet; the attributors call this function for you.

    >>> import numpy as np
    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.curvature import fit_curvature
    >>> from sourcekit.curvature._fit import FitSettings
    >>> from sourcekit.gradients._layers import find_blocks
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(model, data, [stage], progress=False)
    >>> blocks = find_blocks(trajectory.build_model())
    >>> [(b.name, b.d_out, b.d_in) for b in blocks]  # the bias is an extra input column
    [('0', 4, 4), ('2', 2, 5)]
    >>> curvature = fit_curvature(
    ...     "kfac", trajectory, blocks, trajectory.checkpoint_steps[:3],
    ...     np.arange(trajectory.n_train), FitSettings(fisher="empirical"),
    ... )
    >>> curvature
    EigenbasisCurvature(kind='kfac', blocks=['0', '2'])
    """

    if kind not in CURVATURES:
        raise ValueError(f"The curvature kind must be one of {CURVATURES}; got {kind!r}.")
    if settings.fisher not in FISHER:
        raise ValueError(f"The 'fisher' setting must be one of {FISHER}; got {settings.fisher!r}.")
    if kind in ("exact", "hessian"):
        return _fit_dense(kind, trajectory, blocks, steps, indices, settings)
    if kind == "identity":
        factors = {
            b.name: KroneckerFactors(
                None,
                None,
                torch.ones(b.d_out, b.d_in, dtype=torch.float64, device=settings.device),
            )
            for b in blocks
        }
        return EigenbasisCurvature(kind, blocks, factors)
    budget = budget or CacheBudget(0)
    dev = settings.device
    # Blocks with one-hot inputs (embeddings) always get the diagonal; the others the kind's.
    diagonal = [b for b in blocks if kind == "diagonal" or b.diagonal]
    kronecker = [b for b in blocks if b not in diagonal]
    a_mean = {
        b.name: torch.zeros(b.d_in, b.d_in, dtype=torch.float64, device=dev) for b in kronecker
    }
    s_mean = {
        b.name: torch.zeros(b.d_out, b.d_out, dtype=torch.float64, device=dev) for b in kronecker
    }
    diag_mean = {
        b.name: torch.zeros(b.d_out, b.d_in, dtype=torch.float64, device=dev) for b in diagonal
    }
    fisher_cache: dict[int, list[BatchFactors] | None] = {}
    for step in steps:
        a_sum = {name: torch.zeros_like(m) for name, m in a_mean.items()}
        s_sum = {name: torch.zeros_like(m) for name, m in s_mean.items()}
        diag_sum = {name: torch.zeros_like(m) for name, m in diag_mean.items()}
        counts = {b.name: [0.0, 0.0] for b in blocks}
        # The training-loss factors (what scoring needs) and the Fisher factors (what the
        # eigenvalue correction needs) are kept while the budget allows; once the loss
        # factors cannot be kept, the pass stops computing them.
        loss_kept = PassCache(budget, len(indices), active=loss_cache is not None)
        fisher_kept = PassCache(budget, len(indices), active=kind == "ekfac" and bool(kronecker))
        for batch in _fisher_batches(
            trajectory, blocks, step, indices, settings, want_loss=loss_kept.wanted
        ):
            for b in diagonal:
                diag_sum[b.name] += _squared_rotated(b, batch, None, None, settings.dtype)
                counts[b.name][1] += len(batch.indices)
            _sum_fisher(kronecker, batch, a_sum, s_sum, counts, settings.dtype)
            if batch.loss is not None:
                loss_kept.offer(BatchFactors(batch.indices, batch.a, [], batch.loss))
            fisher_kept.offer(BatchFactors(batch.indices, batch.a, batch.fisher, None))
        partial = [*a_sum.values(), *s_sum.values(), *diag_sum.values()]
        flat = _sum_over_ranks(partial, [c for b in blocks for c in counts[b.name]])
        counts = {b.name: flat[2 * i : 2 * i + 2] for i, b in enumerate(blocks)}
        kept_loss = loss_kept.close()
        if loss_cache is not None and kept_loss:  # (a rank's shard may be empty)
            loss_cache.batches[step] = kept_loss
        fisher_cache[step] = fisher_kept.close()
        for sums, what in (
            (a_sum, "input covariance"),
            (s_sum, "output-gradient covariance"),
            (diag_sum, "diagonal curvature"),
        ):
            for name, matrix in sums.items():
                _check(matrix, f"{what} at checkpoint step {step}", name)
        for b in blocks:
            n_positions, n_examples = counts[b.name]
            if b in diagonal:
                diag_mean[b.name] += diag_sum[b.name] / (n_examples * len(steps))
            else:
                a_mean[b.name] += a_sum[b.name] / (n_positions * len(steps))
                s_mean[b.name] += s_sum[b.name] / (n_examples * len(steps))
    factors = {}
    for b in diagonal:
        _check(diag_mean[b.name], "diagonal curvature", b.name)
        factors[b.name] = KroneckerFactors(None, None, diag_mean[b.name])
    bases = {}
    for b in kronecker:
        lam_a, q_a = _eigh(a_mean[b.name], "input covariance", b.name)
        lam_s, q_s = _eigh(s_mean[b.name], "output-gradient covariance", b.name)
        bases[b.name] = (lam_s, q_s, lam_a, q_a)
    if kind in ("diagonal", "kfac") or not kronecker:
        for name, (lam_s, q_s, lam_a, q_a) in bases.items():
            factors[name] = KroneckerFactors(q_s, q_a, torch.outer(lam_s, lam_a))
        return EigenbasisCurvature(kind, blocks, {b.name: factors[b.name] for b in blocks})
    corrected = {
        b.name: torch.zeros(b.d_out, b.d_in, dtype=torch.float64, device=dev) for b in kronecker
    }
    for step in steps:
        batches = fisher_cache.pop(step)
        if batches is None:
            batches_iter = _fisher_batches(
                trajectory, blocks, step, indices, settings, want_loss=False
            )
        else:
            batches_iter = iter(batches)
        total = {name: torch.zeros_like(m) for name, m in corrected.items()}
        n = 0.0
        for batch in batches_iter:
            n += len(batch.indices)
            for b in kronecker:
                _, q_s, _, q_a = bases[b.name]
                total[b.name] += _squared_rotated(b, batch, q_s, q_a, settings.dtype)
        (n,) = _sum_over_ranks(list(total.values()), [n])
        if batches is not None:
            budget.give_back(sum(e.nbytes() for e in batches))
        for b in kronecker:
            corrected[b.name] += total[b.name] / (n * len(steps))
    for b in kronecker:
        _check(corrected[b.name], "corrected eigenvalues", b.name)
        _, q_s, _, q_a = bases[b.name]
        factors[b.name] = KroneckerFactors(q_s, q_a, corrected[b.name])
    return EigenbasisCurvature(kind, blocks, {b.name: factors[b.name] for b in blocks})


def _block_params(model: torch.nn.Module, blocks: Sequence[LayerBlock]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for b in blocks for name in (b.weight, b.bias) if name is not None}


def _flat_block_vector(
    blocks: Sequence[LayerBlock], tensors: dict[str, torch.Tensor]
) -> torch.Tensor:
    return torch.cat([b.matrix(tensors).reshape(-1) for b in blocks])


def _unflat_block_vector(
    blocks: Sequence[LayerBlock], flat: torch.Tensor, shapes: dict[str, torch.Size]
) -> dict[str, torch.Tensor]:
    out = {}
    start = 0
    for b in blocks:
        out.update(b.split(flat[start : start + b.n_params].reshape(b.d_out, b.d_in), shapes))
        start += b.n_params
    return out


def _gauss_newton_sum(
    model, blocks, trajectory, indices, batch_size, device, step
) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Σ_m J_mᵀ ∇²_z L J_m over the examples: the expected Fisher, one backward per output."""
    n_params = sum(b.n_params for b in blocks)
    total = torch.zeros(n_params, n_params, dtype=torch.float64, device=device)
    for batch in checkpoint_batches(
        model,
        blocks,
        trajectory.train,
        indices,
        trajectory.loss,
        fisher="expected",
        want_loss=False,
        noise=None,
        batch_size=batch_size,
        device=device,
        dtype=torch.float64,
        step=step,
    ):
        for variant in batch.fisher:
            grads = block_gradients(batch.a, variant, blocks)
            j = torch.cat([grads[b.name].reshape(len(batch.indices), -1) for b in blocks], dim=1)
            total += j.T @ j
    return total


def _hessian_sum(model, blocks, trajectory, indices, batch_size, device) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Σ_m ∇²_θ L(z_m, θ) restricted to the blocks' parameters."""
    params = _block_params(model, blocks)
    shapes = {k: v.shape for k, v in params.items()}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    fixed.update(dict(model.named_buffers()))
    flat0 = _flat_block_vector(blocks, {k: v.detach() for k, v in params.items()})
    data = trajectory.train.to(device, torch.float64)

    def batch_loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tensors = {**fixed, **_unflat_block_vector(blocks, flat, shapes)}
        return trajectory.loss(functional_call(model, tensors, (x,)), y).sum()

    total = torch.zeros(flat0.numel(), flat0.numel(), dtype=torch.float64, device=device)
    for start in range(0, len(indices), batch_size):
        idx = torch.from_numpy(indices[start : start + batch_size]).to(device)
        total += hessian(batch_loss)(flat0, data.inputs[idx], data.targets[idx])
    return total


def _fit_dense(
    kind: str,
    trajectory: Trajectory,
    blocks: Sequence[LayerBlock],
    steps: Sequence[int],
    indices: np.ndarray,
    settings: FitSettings,
) -> DenseCurvature:
    n_params = sum(b.n_params for b in blocks)
    if n_params > 20_000:
        raise ValueError(
            f"curvature={kind!r} builds a dense {n_params} x {n_params} matrix; it is meant for tiny "
            "models (tests and teaching). Use curvature='ekfac' for this model."
        )
    dev = settings.device
    total = torch.zeros(n_params, n_params, dtype=torch.float64, device=dev)
    (n_examples,) = _sum_over_ranks([], [len(indices)])
    for step in steps:
        model = model_at(trajectory, step, blocks, device=dev, dtype=torch.float64)
        if kind == "exact":
            part = _gauss_newton_sum(
                model, blocks, trajectory, indices, settings.batch_size, dev, step
            )
        else:
            part = _hessian_sum(model, blocks, trajectory, indices, settings.batch_size, dev)
        _sum_over_ranks([part], [])
        if not torch.isfinite(part).all():
            raise NonFiniteError(
                f"NaN or infinity in the dense {kind} curvature at checkpoint step {step}. The run "
                "may have diverged there; choose other checkpoints or check the recorded data."
            )
        total += part / (n_examples * len(steps))
    return DenseCurvature(kind, blocks, total)
