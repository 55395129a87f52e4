"""EK-FAC: K-FAC's eigenbasis with corrected eigenvalues (METHOD.md section 5, step 3).

After K-FAC's pass (:func:`~sourcekit.curvature._kfac.kronecker_pass`), a second pass
at every checkpoint c of the segment computes, in the segment's basis Q_S ⊗ Q_A,

    Λ_c = E[(Q_Sᵀ G Q_A)^∘2]   over the per-example gradients G (for Fisher targets),

and the eigenvalues are Λ = mean_c Λ_c: the exact diagonal of the Fisher in that basis
(George et al., 2018). The second pass reads the Fisher factors kept by the first while
the budget allowed them, and streams the data again otherwise.
"""

from __future__ import annotations

import torch

from ._kfac import kronecker_pass, squared_rotated
from ._objects import EigenbasisCurvature, KroneckerFactors
from ._passes import CurvaturePasses, check_finite, sum_over_ranks

__all__ = ["fit_ekfac"]


def fit_ekfac(passes: CurvaturePasses) -> EigenbasisCurvature:
    """EK-FAC: K-FAC's eigenbasis per block, with the eigenvalues measured in it."""
    blocks, steps, settings = passes.blocks, passes.steps, passes.settings
    kronecker = [b for b in blocks if not b.diagonal]
    found = kronecker_pass(passes, [b for b in blocks if b.diagonal], keep_fisher=bool(kronecker))
    factors = dict(found.diagonal)
    corrected = {
        b.name: torch.zeros(b.d_out, b.d_in, dtype=torch.float64, device=settings.device)
        for b in kronecker
    }
    for step in steps:
        batches = found.fisher.pop(step)
        batches_iter = passes.batches(step, want_loss=False) if batches is None else iter(batches)
        total = {name: torch.zeros_like(m) for name, m in corrected.items()}
        n = 0.0
        for batch in batches_iter:
            n += len(batch.indices)
            for b in kronecker:
                _, q_s, _, q_a = found.bases[b.name]
                total[b.name] += squared_rotated(b, batch, q_s, q_a, settings.dtype)
        (n,) = sum_over_ranks(list(total.values()), [n])
        if batches is not None:
            passes.budget.give_back(sum(e.nbytes() for e in batches))
        for b in kronecker:
            corrected[b.name] += total[b.name] / (n * len(steps))
    for b in kronecker:
        check_finite(corrected[b.name], "corrected eigenvalues", b.name)
        _, q_s, _, q_a = found.bases[b.name]
        factors[b.name] = KroneckerFactors(q_s, q_a, corrected[b.name])
    return EigenbasisCurvature("ekfac", blocks, {b.name: factors[b.name] for b in blocks})
