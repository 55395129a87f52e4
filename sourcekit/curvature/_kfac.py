"""K-FAC (METHOD.md section 5, steps 1-2), and the pass that EK-FAC and the diagonal share.

At every checkpoint c of the segment, over the stage's training examples:

1. A_c = E[a aᵀ] (layer inputs, bias as an input of 1, averaged over positions, weighted
   by the loss's position weights where the layer's positions are the outputs') and
   S_c = E[Σ_t s_t s_tᵀ] (output gradients for Fisher targets, formed per output
   position with weights √w_t, so that the Fisher has the objective's scale: see
   ``_fisher_totals`` in ``sourcekit.gradients._per_example``); each batch's sum is
   formed in the working precision and accumulated across batches in float64;
2. A = mean_c A_c and S = mean_c S_c are eigendecomposed in float64 (one basis per
   segment): A = Q_A Λ_A Q_Aᵀ, S = Q_S Λ_S Q_Sᵀ, and K-FAC's eigenvalues are
   Λ = Λ_S ⊗ Λ_A.

Blocks with one-hot inputs (embedding tables, ``LayerBlock.diagonal``) get the diagonal
Λ = mean_c E[G^∘2] in parameter coordinates instead, from the same pass
(:func:`kronecker_pass`, which the diagonal kind runs with every block diagonal). The
pass keeps the training-loss factors of every batch for scoring, and (for EK-FAC's
eigenvalue correction) the Fisher factors, while the budget allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..gradients._layers import (
    LayerBlock,
    block_gradient,
    block_gradient_of,
    squared_gradient_sum,
)
from ..gradients._patches import Inputs, dense
from ..gradients._per_example import BatchFactors
from ..gradients._training import PassCache
from ._objects import EigenbasisCurvature, KroneckerFactors
from ._passes import CurvaturePasses, check_finite, eigh, sum_over_ranks

__all__ = ["KroneckerPass", "fit_kfac", "kronecker_pass", "squared_rotated"]


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


def squared_rotated(
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
    if block.uses:  # a tied parameter: the diagonal of its summed gradient
        return _tied_squared_sum(block, batch, dtype)
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


def _tied_squared_sum(block: LayerBlock, batch: BatchFactors, dtype: torch.dtype) -> torch.Tensor:
    """Σ over examples (and Fisher variants) of G∘G for a tied block, G the sum of its
    uses' gradients (formed in chunks of examples), as float64."""
    a = {
        u.name: batch.a[u.name].to(dtype)
        if batch.a[u.name].is_floating_point()
        else batch.a[u.name]
        for u in block.uses
    }
    n = next(iter(a.values())).shape[0]
    chunk = max(1, _CHUNK_NUMBERS // block.n_params)
    total = torch.zeros(block.d_out, block.d_in, dtype=dtype, device=next(iter(a.values())).device)
    for variant in batch.fisher:
        s = {u.name: variant[u.name].to(dtype) for u in block.uses}
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            g = block_gradient_of(
                block, {k: v[part] for k, v in a.items()}, {k: v[part] for k, v in s.items()}
            )
            total += (g * g).sum(dim=0)
    return total.double()


@dataclass
class KroneckerPass:
    """What :func:`kronecker_pass` collects over a segment's checkpoints.

    Attributes
    ----------
    diagonal : dict of block name to KroneckerFactors
        The blocks whose curvature is the diagonal, Λ = mean_c E[G^∘2].
    bases : dict of block name to (Λ_S, Q_S, Λ_A, Q_A)
        The eigendecompositions of the other blocks' factors S and A (float64).
    fisher : dict of step to list of BatchFactors, or None
        The Fisher factors of each checkpoint's batches, where they were kept.
    """

    diagonal: dict[str, KroneckerFactors]
    bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    fisher: dict[int, list[BatchFactors] | None]


def kronecker_pass(
    passes: CurvaturePasses, diagonal: Sequence[LayerBlock], *, keep_fisher: bool
) -> KroneckerPass:
    """One pass per checkpoint: the factors A and S of every block (the diagonal of those in
    ``diagonal``), averaged over the checkpoints, eigendecomposed.

    The training-loss factors of every batch go to ``passes.loss_cache`` and, with
    ``keep_fisher``, the Fisher factors are kept for a second pass, while the budget
    allows; once the loss factors cannot be kept, the pass stops computing them.
    """
    blocks, steps, indices = passes.blocks, passes.steps, passes.indices
    settings, budget, loss_cache = passes.settings, passes.budget, passes.loss_cache
    dev = settings.device
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
        loss_kept = PassCache(budget, len(indices), active=loss_cache is not None)
        fisher_kept = PassCache(budget, len(indices), active=keep_fisher)
        for batch in passes.batches(step, want_loss=loss_kept.wanted):
            for b in diagonal:
                diag_sum[b.name] += squared_rotated(b, batch, None, None, settings.dtype)
                counts[b.name][1] += len(batch.indices)
            _sum_fisher(kronecker, batch, a_sum, s_sum, counts, settings.dtype)
            if batch.loss is not None:
                loss_kept.offer(BatchFactors(batch.indices, batch.a, [], batch.loss))
            fisher_kept.offer(BatchFactors(batch.indices, batch.a, batch.fisher, None))
        partial = [*a_sum.values(), *s_sum.values(), *diag_sum.values()]
        flat = sum_over_ranks(partial, [c for b in blocks for c in counts[b.name]])
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
                check_finite(matrix, f"{what} at checkpoint step {step}", name)
        for b in blocks:
            n_positions, n_examples = counts[b.name]
            if b in diagonal:
                diag_mean[b.name] += diag_sum[b.name] / (n_examples * len(steps))
            else:
                a_mean[b.name] += a_sum[b.name] / (n_positions * len(steps))
                s_mean[b.name] += s_sum[b.name] / (n_examples * len(steps))
    factors = {}
    for b in diagonal:
        check_finite(diag_mean[b.name], "diagonal curvature", b.name)
        factors[b.name] = KroneckerFactors(None, None, diag_mean[b.name])
    bases = {}
    for b in kronecker:
        lam_a, q_a = eigh(a_mean[b.name], "input covariance", b.name)
        lam_s, q_s = eigh(s_mean[b.name], "output-gradient covariance", b.name)
        bases[b.name] = (lam_s, q_s, lam_a, q_a)
    return KroneckerPass(factors, bases, fisher_cache)


def fit_kfac(passes: CurvaturePasses) -> EigenbasisCurvature:
    """K-FAC: per block the eigenbasis Q_S ⊗ Q_A with eigenvalues Λ_S ⊗ Λ_A."""
    found = kronecker_pass(passes, [b for b in passes.blocks if b.diagonal], keep_fisher=False)
    factors = dict(found.diagonal)
    for name, (lam_s, q_s, lam_a, q_a) in found.bases.items():
        factors[name] = KroneckerFactors(q_s, q_a, torch.outer(lam_s, lam_a))
    return EigenbasisCurvature(
        "kfac", passes.blocks, {b.name: factors[b.name] for b in passes.blocks}
    )
