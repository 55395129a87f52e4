"""Adam's diagonal preconditioner over a segment, and the curvature its updates see
(METHOD.md section 4, Adam; docs/source.md, "Adam and AdamW").

Under Adam and AdamW, a segment's updates are preconditioned by P = 1/(√v̂ + ε), v̂ the
bias-corrected second moment. SOURCE takes P̄, its mean over the segment's checkpoints,
from the recorded optimiser states, per block in the blocks' (d_out, d_in) layout
(:func:`adam_preconditioner`). Each parameter takes the β₁, β₂ and ε of its own
parameter group; a parameter its stage does not train has no moments and takes no step,
and gets P = 1.

With P̄ and the curvature H̄ constant over the segment, its linearised updates are

    δθ ← δθ − η_k (p (H̄ + c) + w) δθ − η_k p g / N,

p = P̄ times each parameter's rate relative to the segment's reference sequence η_k
(1 without parameter groups), c the coupled decay (Adam) and w the decoupled decay
times the relative rate (AdamW), all diagonal. In the coordinates x = p^{−½} δθ this is
plain descent on the symmetric

    K = p^½ (H̄ + c) p^½ + w

with the forcing p^½ g / N, so a segment carries an earlier effect by
S = p^½ F_S(K) p^{−½} and contributes p^½ F_r(K) p^½ g / N: for the query side,
u = p^½ F_r(K) p^½ v and v_next = Sᵀ v = v − (H̄ + c + w/p) u (the identity
F_S(σ) = 1 − σ F_r(σ) of both the exponential and the finite-product forms, which
needs no division by p: a frozen parameter, p = 0, passes v through). The damping δ is
added to K's eigenvalues, a shift of the preconditioned curvature like AdamW's decay.
:func:`preconditioned_curvature` builds it from a fitted H̄:

- dense kinds ("exact", "hessian"): K exactly, as a matrix, eigendecomposed once
  (:class:`DenseAdam`); with P̄ and H̄ constant the finite-product form then equals
  exact unrolling;
- eigenbasis kinds (EK-FAC, K-FAC, diagonal, identity; :class:`EigenbasisAdam`): each
  diagonal operator D (p, c, w) is replaced by its diagonal in the block's eigenbasis
  Q = Q_S ⊗ Q_A, (Q_S ∘ Q_S)ᵀ D (Q_A ∘ Q_A) (:func:`basis_diagonal`), so that p commutes
  with H̄ and the whole segment acts in H̄'s eigenbasis: K's eigenvalues are
  π (Λ + c̃) + w̃, u = Q π F_r(K) Qᵀ v and v_next = Q F_S(K) Qᵀ v. Exact for the diagonal
  and identity kinds (Q = I) and where p is constant on a block; elsewhere it keeps
  H̄'s eigenbasis where K's turns away from it (docs/source.md measures the
  alternatives).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..exceptions import TrajectoryError
from ..gradients._layers import LayerBlock
from ..trajectory import Segment, Trajectory
from ..trajectory._settings import stage_groups
from ._dense import DenseCurvature
from ._objects import Carried, Curvature, EigenbasisCurvature, KroneckerFactors
from ._rates import BlockRates

__all__ = [
    "DenseAdam",
    "EigenbasisAdam",
    "adam_preconditioner",
    "basis_diagonal",
    "preconditioned_curvature",
]

SpectralFunction = Callable[[torch.Tensor], torch.Tensor]

# The smallest fraction of P that Adam's own response keeps (``response=True``): where
# the mean gradient dominates its noise the response drives P towards 0, and 1e-6 keeps
# K's conditioning within float64's reach.
_RESPONSE_FLOOR = 1e-6


def adam_preconditioner(
    trajectory: Trajectory,
    segment: Segment,
    blocks: Sequence[LayerBlock],
    *,
    response: bool = False,
) -> dict[str, torch.Tensor]:
    """P̄: the mean over the segment's checkpoints of Adam's response to a persistent gradient.

    At a checkpoint with bias-corrected moments m̂ and v̂, Adam's update is m̂ P with
    P = 1/(√v̂ + ε). With ``response=False`` (v̂ held fixed) a gradient change δg moves
    it by P δg. A change that persists moves m̂ by δg (the bias-corrected average of a
    constant) and v̂ by 2ĝ δg (ĝ the gradient averaged as v̂ averages its square), so the
    update moves by P (1 − m̂ ĝ / (v̂ + ε√v̂)) δg: ``response=True`` takes this, with ĝ
    estimated by m̂ and the factor clipped to [10⁻⁶, 1].

    A checkpoint at a stage's first step holds the previous stage's optimiser state (or
    none), so only checkpoints after the stage's first update count.
    """
    stage = trajectory.stages[segment.stage]
    total: dict[str, torch.Tensor] = {}
    used = 0
    for step in segment.checkpoints:
        if step <= stage.start:
            continue
        state = trajectory.checkpoint(step).optimizer
        if "exp_avg_sq" not in state or "step" not in state:
            continue
        # Each parameter's own group: its betas at the last update before the checkpoint, its ε.
        settings = {}
        for group in stage_groups(trajectory, stage):
            spec, _ = group.at(step - 1 - stage.start)
            settings.update({name: (spec.betas, spec.eps) for name in group.parameters})
        moments, firsts = state["exp_avg_sq"], state.get("exp_avg", {})
        t = state["step"]
        shapes = trajectory._param_shapes
        names = [n for b in blocks for n in (b.weight, b.bias) if n is not None]
        # Parameters the stage does not train have no moments; they take no step (their
        # rate is 0), so any positive preconditioner does: 1.
        p: dict[str, torch.Tensor] = {}
        for n in names:
            if n not in moments or n not in settings:
                p[n] = torch.ones(shapes[n], dtype=torch.float64)
                continue
            (beta1, beta2), eps = settings[n]
            v_hat = moments[n].double() / (1 - beta2**t)
            root = v_hat.sqrt()
            p[n] = 1.0 / (root + eps)
            if response and n in firsts:
                m_hat = firsts[n].double() / (1 - beta1**t)
                denominator = v_hat + eps * root
                moved = torch.where(
                    denominator > 0, m_hat * m_hat / denominator.clamp_min(1e-300), 0.0
                )
                p[n] = p[n] * (1.0 - moved).clamp(_RESPONSE_FLOOR, 1.0)
        for block in blocks:
            total[block.name] = total.get(block.name, 0) + block.matrix(p)
        used += 1
    if used == 0:
        raise TrajectoryError(
            f"Segment {segment.index} (steps {segment.start}..{segment.end - 1}) trains with "
            f"{stage.optimizer.kind}, but none of its checkpoints {list(segment.checkpoints)} holds "
            "second moments from this stage. SOURCE needs a checkpoint after the stage's first step: "
            "record checkpoints with TrajectoryRecorder or sourcekit.train."
        )
    return {k: v / used for k, v in total.items()}


def basis_diagonal(factors: KroneckerFactors, matrix: torch.Tensor) -> torch.Tensor:
    """diag(Qᵀ diag(vec M) Q) for Q = Q_S ⊗ Q_A: (Q_S ∘ Q_S)ᵀ M (Q_A ∘ Q_A), shape (d_out, d_in).

    The diagonal, in a block's eigenbasis, of the operator that multiplies a
    (d_out, d_in) matrix entrywise by ``matrix``: entry (i, j) is
    Σ_ab Q_S[a, i]² M[a, b] Q_A[b, j]². An identity factor leaves its side as it is.

    Examples
    --------
    >>> import torch
    >>> from sourcekit.curvature import KroneckerFactors
    >>> from sourcekit.curvature._preconditioner import basis_diagonal
    >>> c, s = 0.6, 0.8
    >>> q_s = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)  # a rotation
    >>> factors = KroneckerFactors(q_s, None, torch.ones(2, 1, dtype=torch.float64))
    >>> basis_diagonal(factors, torch.tensor([[1.0], [4.0]], dtype=torch.float64))
    tensor([[2.9200],
            [2.0800]], dtype=torch.float64)
    """
    out = matrix.to(factors.eigenvalues)
    if factors.q_s is not None:
        out = (factors.q_s * factors.q_s).T @ out
    if factors.q_a is not None:
        out = out @ (factors.q_a * factors.q_a)
    return out


@dataclass
class _Diagonals:
    """p, c and w of a segment per block, (d_out, d_in), float64."""

    p: dict[str, torch.Tensor]
    c: dict[str, torch.Tensor]
    w: dict[str, torch.Tensor]


def _diagonals(
    blocks: Sequence[LayerBlock],
    preconditioner: dict[str, torch.Tensor],
    coupled: float,
    decoupled: float,
    rates: dict[str, BlockRates] | None,
    reference: float,
) -> _Diagonals:
    p, c, w = {}, {}, {}
    for block in blocks:
        pre = preconditioner[block.name].double()
        if rates is None:
            relative = torch.ones_like(pre)
            c[block.name] = torch.full_like(pre, coupled)
            decay = torch.full_like(pre, decoupled)
        else:
            r = rates[block.name]
            zeros = torch.zeros_like(pre)
            relative = r.entry_sums(zeros) / reference if reference > 0 else zeros
            c[block.name] = r.entrywise(r.coupled, zeros)
            decay = r.entrywise(r.decoupled, zeros)
        p[block.name] = pre * relative
        w[block.name] = decay * relative
    return _Diagonals(p, c, w)


class DenseAdam:
    """A segment under Adam with a dense curvature: K = p^½ (H̄ + c) p^½ + w, exactly.

    Parameters
    ----------
    curvature : DenseCurvature
        H̄, as fitted.
    p, c, w : tensor of shape (P,)
        The diagonals of the module notes, in the matrix's parameter order.
    """

    def __init__(
        self, curvature: DenseCurvature, p: torch.Tensor, c: torch.Tensor, w: torch.Tensor
    ) -> None:
        self.hessian = curvature
        self.p, self.c, self.w = p, c, w
        self.root = p.sqrt()
        matrix = self.root[:, None] * (curvature.matrix + torch.diag(c)) * self.root[None, :]
        self.curvature = DenseCurvature(curvature.kind, curvature.blocks, matrix + torch.diag(w))

    def apply(
        self,
        fns: tuple[SpectralFunction, SpectralFunction],
        carried: Carried,
        damping: float,
        carry: bool,
    ) -> tuple[dict[str, torch.Tensor], Carried | None]:
        """(u, v_next) in parameter coordinates, in float64."""
        k = self.curvature
        v = k.flatten(carried.in_parameters()).to(k.matrix.dtype)
        rotated = (v * self.root) @ k.eigenvectors
        u = (rotated * fns[0](k.eigenvalues + damping)) @ k.eigenvectors.T * self.root
        if not carry:
            return k.unflatten(u), None
        # v_next = v − (H̄ + c + (w + δ)/p) u, the last term 0 where p = 0 (there u = 0)
        safe = torch.where(self.p > 0, self.p, torch.ones_like(self.p))
        own = torch.where(self.p > 0, (self.w + damping) / safe, torch.zeros_like(self.p))
        after = v - u @ self.hessian.matrix - u * (self.c + own)
        return k.unflatten(u), Carried(k.unflatten(after))


class EigenbasisAdam:
    """A segment under Adam with an eigenbasis curvature: p, c and w projected on its basis.

    K's eigenvalues are π (Λ + c̃) + w̃ in H̄'s eigenbasis (see the module notes).
    """

    def __init__(self, curvature: EigenbasisCurvature, diagonals: _Diagonals) -> None:
        self.hessian = curvature
        self.diagonals = diagonals
        factors, self.weights = {}, {}
        for block in curvature.blocks:
            f = curvature.factors[block.name]
            pi = basis_diagonal(f, diagonals.p[block.name])
            c = basis_diagonal(f, diagonals.c[block.name])
            w = basis_diagonal(f, diagonals.w[block.name])
            factors[block.name] = KroneckerFactors(f.q_s, f.q_a, pi * (f.eigenvalues + c) + w)
            self.weights[block.name] = pi
        self.curvature = EigenbasisCurvature(curvature.kind, curvature.blocks, factors)

    def apply(
        self,
        fns: tuple[SpectralFunction, SpectralFunction],
        carried: Carried,
        damping: float,
        carry: bool,
        dtype: torch.dtype | None = None,
    ) -> tuple[dict[str, torch.Tensor], Carried | None]:
        """(u in parameter coordinates, v_next left in this eigenbasis)."""
        applied = self.curvature.apply_carried(fns if carry else fns[:1], carried, damping, dtype)
        residual = applied[0]
        assert residual.scale is not None
        weighted = {k: s * self.weights[k].to(s) for k, s in residual.scale.items()}
        u = Carried(residual.values, residual.basis, weighted).in_parameters()
        return u, (applied[1] if carry else None)


AdamForm = DenseAdam | EigenbasisAdam


def preconditioned_curvature(
    curvature: Curvature,
    preconditioner: dict[str, torch.Tensor],
    *,
    coupled: float = 0.0,
    decoupled: float = 0.0,
    rates: dict[str, BlockRates] | None = None,
    reference: float = 0.0,
) -> AdamForm:
    """The curvature a segment's Adam updates see, K = p^½ (H̄ + c) p^½ + w.

    Parameters
    ----------
    curvature : DenseCurvature or EigenbasisCurvature
        H̄, as fitted (without damping or decay).
    preconditioner : dict of block name to tensor (d_out, d_in)
        Adam's P̄ (:func:`adam_preconditioner`).
    coupled, decoupled : float
        The segment's coupled (Adam) and decoupled (AdamW) decay, when its parameters
        share them.
    rates : dict of block name to BlockRates, optional
        Each block's rates and decays where they differ (``sourcekit.curvature._rates``);
        p then holds each entry's rate relative to ``reference``, the learning-rate sum of
        the sequence the segment's functions are formed from.

    Returns
    -------
    DenseAdam or EigenbasisAdam

    Examples
    --------
    With a preconditioner constant on every block (P = p I), K = p (H̄ + λ_c):

    >>> import torch
    >>> import sourcekit
    >>> from sourcekit.curvature._preconditioner import preconditioned_curvature
    >>> data = sourcekit.Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=5)
    >>> trajectory = sourcekit.train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> h = sourcekit.InfluenceAttributor().fit(trajectory).state_.curvature
    >>> p = {b.name: torch.full((b.d_out, b.d_in), 4.0, dtype=torch.float64) for b in h.blocks}
    >>> k = preconditioned_curvature(h, p, coupled=0.5).curvature
    >>> torch.allclose(k.factors[""].eigenvalues, 4.0 * (h.factors[""].eigenvalues + 0.5))
    True
    """
    blocks = curvature.blocks
    diagonals = _diagonals(blocks, preconditioner, coupled, decoupled, rates, reference)
    if isinstance(curvature, EigenbasisCurvature):
        return EigenbasisAdam(curvature, diagonals)
    if isinstance(curvature, DenseCurvature):

        def flat(values: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([values[b.name].reshape(-1) for b in blocks]).to(curvature.matrix)

        return DenseAdam(curvature, flat(diagonals.p), flat(diagonals.c), flat(diagonals.w))
    raise TypeError(
        f"SOURCE's Adam form needs a dense or an eigenbasis curvature; got {type(curvature).__name__}."
    )
