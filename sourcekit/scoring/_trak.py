"""TRAK (METHOD.md section 6): an influence function in a random low-dimensional projection.

Per-example gradients are projected by a seeded random P × k matrix R (entries N(0, 1/k)
or ±1/√k, so that E[R Rᵀ] = I): φ = Rᵀ g. At a checkpoint θ_c, with Φ the (N × k)
matrix of projected training-loss gradients φ_m = Rᵀ ∇L(z_m, θ_c) and φ_q = Rᵀ ∇f(z_q, θ_c),

    τ_c[q, m] = −(1/N) φ_qᵀ (ΦᵀΦ/N + λI)⁻¹ φ_m,

the influence function of METHOD.md section 2 with the empirical Fisher ΦᵀΦ/N of the
projected gradients as curvature; over several checkpoints the scores are averaged
(ensembling). Fitting keeps Φ and the eigendecomposition ΦᵀΦ/N = Q Λ Qᵀ (float64) of
each checkpoint, which do not depend on λ; scoring is then
u = Q (Λ + λ)⁻¹ Qᵀ φ_q and τ = −(1/N) Φ u.

With λ = 0 the inverse is the pseudo-inverse (eigenvalues at rounding level are
dropped): every φ_m lies in the span of Φ's rows, so this is the limit λ → 0.

Φ may hold only some of the training examples (a rank's shard under
``torch.distributed``): ΦᵀΦ is then a partial sum (:func:`projected_gram`) that the
caller sums over the ranks before :func:`gram_eigendecomposition`, and the scores fill
only the shard's columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..gradients._layers import FactoredGradients, LayerBlock
from ..gradients._training import GradientSource
from ._contraction import block_dot

__all__ = [
    "PROJECTIONS",
    "Projector",
    "RandomProjection",
    "TRAKCheckpoint",
    "default_damping",
    "gram_eigendecomposition",
    "kernel_eigendecomposition",
    "projected_gram",
    "projected_training_gradients",
    "trak_scores",
]

PROJECTIONS = ("gaussian", "rademacher")

# Entries of one generated piece of R (8 MiB in float64): R is never formed whole.
_CHUNK_ENTRIES = 2**20


@dataclass(frozen=True)
class RandomProjection:
    """A seeded random P × k projection, generated block by block in pieces of rows.

    The rows of R follow the parameters of the layer blocks in order, each block's
    (d_out, d_in) gradient matrix flattened row-major. Piece j of block b (rows
    j·r .. (j+1)·r − 1 of the block, r = ``piece_rows``) is drawn in float64 on the CPU
    from a generator seeded by (seed, b, j), so R depends only on these attributes,
    never on the device, the batch size or the order of use.

    Attributes
    ----------
    blocks : tuple of (name, n_params)
    dim : int
        k, the projected dimension.
    kind : {"gaussian", "rademacher"}
        Entries N(0, 1/k), or ±1/√k with equal probability.
    seed : int
    piece_rows : int
        Rows per generated piece (by default as many as 2**20 entries allow).
    """

    blocks: tuple[tuple[str, int], ...]
    dim: int
    kind: str
    seed: int
    piece_rows: int

    @classmethod
    def for_blocks(
        cls,
        blocks: Sequence[LayerBlock],
        dim: int,
        kind: str,
        seed: int,
        piece_rows: int | None = None,
    ) -> RandomProjection:
        if kind not in PROJECTIONS:
            raise ValueError(f"The projection must be one of {PROJECTIONS}; got {kind!r}.")
        rows = max(1, _CHUNK_ENTRIES // int(dim)) if piece_rows is None else int(piece_rows)
        return cls(tuple((b.name, b.n_params) for b in blocks), int(dim), kind, int(seed), rows)

    @property
    def n_params(self) -> int:
        return sum(n for _, n in self.blocks)

    def pieces(self, block: int) -> list[slice]:
        """The row ranges of ``block``'s pieces."""
        n, r = self.blocks[block][1], self.piece_rows
        return [slice(i, min(i + r, n)) for i in range(0, n, r)]

    def piece(self, block: int, index: int) -> torch.Tensor:
        """Rows ``pieces(block)[index]`` of R for that block, float64 on the CPU."""
        rows = self.pieces(block)[index]
        seed = np.random.SeedSequence([self.seed, block, index]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(seed))
        shape = (rows.stop - rows.start, self.dim)
        if self.kind == "gaussian":
            values = torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            values = torch.randint(0, 2, shape, generator=generator).double() * 2.0 - 1.0
        return values / self.dim**0.5

    def matrix(self) -> torch.Tensor:
        """The whole P × k matrix R in float64 (for tests and tiny models)."""
        return torch.cat(
            [self.piece(b, j) for b in range(len(self.blocks)) for j in range(len(self.pieces(b)))]
        )

    def projector(self, device: torch.device, dtype: torch.dtype, budget: int) -> Projector:
        """A :class:`Projector` that keeps generated pieces on ``device`` within ``budget`` bytes."""
        return Projector(self, device, dtype, budget)


class Projector:
    """Applies a :class:`RandomProjection` to per-example block gradients.

    Generated pieces of R are kept (on the device, in the working precision) while they
    fit in ``budget`` bytes, and generated again at every use beyond it. A projector is
    a short-lived helper of one fit or one transform; the projection it applies is fixed
    by the :class:`RandomProjection` alone.
    """

    def __init__(
        self, projection: RandomProjection, device: torch.device, dtype: torch.dtype, budget: int
    ) -> None:
        self.projection = projection
        self.device = device
        self.dtype = dtype
        self.budget = int(budget)
        self._pieces: dict[tuple[int, int], torch.Tensor] = {}
        self._used = 0

    def _piece(self, block: int, index: int) -> torch.Tensor:
        key = (block, index)
        if key in self._pieces:
            return self._pieces[key]
        piece = self.projection.piece(block, index).to(self.device, self.dtype)
        nbytes = piece.numel() * piece.element_size()
        if self._used + nbytes <= self.budget:
            self._pieces[key] = piece
            self._used += nbytes
        return piece

    def _factored(self, grads: FactoredGradients, b: int, name: str) -> torch.Tensor:
        """Rᵀ g of one block from its layer inputs and output gradients.

        Each piece of R covers a range of the block's row-major (d_out, d_in) entries;
        padded with zeros to whole output rows, its k columns are k query matrices,
        contracted like any other (:func:`~sourcekit.scoring._contraction.block_dot`).
        """
        block = grads.blocks[name]
        a, s = grads.a[name].to(self.device), grads.s[name].to(self.device)
        out: torch.Tensor | None = None
        for j, rows in enumerate(self.projection.pieces(b)):
            top, bottom = rows.start // block.d_in, -(-rows.stop // block.d_in)
            piece = self._piece(b, j)
            padded = piece.new_zeros(self.projection.dim, (bottom - top) * block.d_in)
            offset = rows.start - top * block.d_in
            padded[:, offset : offset + piece.shape[0]] = piece.T
            u = padded.reshape(self.projection.dim, bottom - top, block.d_in)
            part = block_dot(block, u, a, s[..., top:bottom], self.dtype).T
            out = part if out is None else out + part
        assert out is not None
        return out

    def __call__(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """φ = Rᵀ g for every example: ``grads`` {block: (n, d_out, d_in)} -> (n, k).

        ``grads`` may be :class:`~sourcekit.gradients._layers.FactoredGradients`: the
        projection is then contracted with the layer inputs and output gradients,
        forming the gradients only where that is cheaper.
        """
        out: torch.Tensor | None = None
        for b, (name, _) in enumerate(self.projection.blocks):
            if isinstance(grads, FactoredGradients) and not grads.blocks[name].uses:
                part = self._factored(grads, b, name)
                out = part if out is None else out + part
                continue
            flat = grads[name].reshape(grads[name].shape[0], -1).to(self.device, self.dtype)
            for j, rows in enumerate(self.projection.pieces(b)):
                part = flat[:, rows] @ self._piece(b, j)
                out = part if out is None else out + part
        if out is None:
            raise ValueError("A projection needs at least one block.")
        return out


@dataclass
class TRAKCheckpoint:
    """The damping-independent TRAK state of one checkpoint.

    Attributes
    ----------
    step : int
    features : tensor of shape (n, k)
        Φ: the projected training-loss gradients of ``examples``, one row each.
    eigenvalues : tensor of shape (k,), float64
        Λ of ΦᵀΦ/N over all N training examples (clamped at 0).
    eigenvectors : tensor of shape (k, k), float64
        Q of ΦᵀΦ/N.
    examples : ndarray of int, optional
        The training example of each row of ``features`` (a rank's shard); None: the
        rows are the examples 0..n-1.
    n_train : int, optional
        N, the number of training examples (the 1/N of the score); None: the rows.
    """

    step: int
    features: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    examples: np.ndarray | None = None
    n_train: int | None = None

    @property
    def columns(self) -> np.ndarray:
        """The training examples of the rows of ``features``."""
        if self.examples is None:
            return np.arange(self.features.shape[0], dtype=np.int64)
        return self.examples

    @property
    def n(self) -> int:
        """N: the number of training examples of the kernel."""
        return self.features.shape[0] if self.n_train is None else int(self.n_train)


def projected_training_gradients(
    training_gradients: GradientSource,
    step: int,
    examples: np.ndarray,
    projector: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    *,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Φ: the projected ∇L(z_m, θ_step) of ``examples``, shape (len(examples), k), in that order."""
    examples = np.asarray(examples, dtype=np.int64)
    if len(examples) == 0:
        raise ValueError("TRAK needs at least one training example.")
    row = np.full(int(examples.max()) + 1, -1, dtype=np.int64)
    row[examples] = np.arange(len(examples))
    features: torch.Tensor | None = None
    for indices, grads in training_gradients(step, examples):
        phi = projector(grads).to(dtype)
        if features is None:
            features = torch.zeros(len(examples), phi.shape[1], dtype=dtype, device=phi.device)
        features[torch.from_numpy(row[indices]).to(phi.device)] = phi
    assert features is not None
    return features


def projected_gram(features: torch.Tensor) -> torch.Tensor:
    """ΦᵀΦ in float64, shape (k, k): the kernel's sum over the rows of Φ (n, k)."""
    phi = features.double()
    return phi.T @ phi


def gram_eigendecomposition(gram: torch.Tensor, n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ, Q) of ``gram``/N in float64 (``gram`` = ΦᵀΦ over all N examples); Λ clamped at 0."""
    kernel = gram.double() / n_train
    values, vectors = torch.linalg.eigh(0.5 * (kernel + kernel.T))
    return values.clamp_min(0.0), vectors


def kernel_eigendecomposition(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ, Q) of ΦᵀΦ/N in float64 (Φ of shape (N, k), every example); eigenvalues clamped at 0."""
    return gram_eigendecomposition(projected_gram(features), features.shape[0])


def default_damping(checkpoint: TRAKCheckpoint) -> float:
    """The heuristic damping: 0.1 × the mean eigenvalue of ΦᵀΦ/N (as for influence functions)."""
    return 0.1 * float(checkpoint.eigenvalues.mean())


def trak_scores(
    query_features: Sequence[torch.Tensor],
    checkpoints: Sequence[TRAKCheckpoint],
    damping: Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """TRAK scores of shape (n_queries, N), averaged over the checkpoints.

    Only the columns of the checkpoints' ``examples`` are filled (all N when they hold
    every example); the others are 0.

    Parameters
    ----------
    query_features : sequence of tensors (n_queries, k)
        φ_q at each checkpoint (projected with the same R as the training gradients).
    checkpoints : sequence of TRAKCheckpoint
    damping : sequence of float
        λ of each checkpoint.
    """
    if not checkpoints:
        raise ValueError("TRAK needs at least one checkpoint.")
    scores: torch.Tensor | None = None
    for phi_q, checkpoint, lam in zip(query_features, checkpoints, damping, strict=True):
        values, vectors = checkpoint.eigenvalues, checkpoint.eigenvectors
        shifted = values.to(vectors.device) + float(lam)
        # eigenvalues at rounding level of the largest are dropped (pseudo-inverse)
        cutoff = values.numel() * float(np.finfo(np.float64).eps) * float(values.max())
        inverse = torch.where(
            shifted > cutoff, 1.0 / shifted.clamp_min(np.finfo(np.float64).tiny), 0.0
        )
        u = ((phi_q.double().to(vectors.device) @ vectors) * inverse) @ vectors.T
        features = checkpoint.features
        if scores is None:
            scores = torch.zeros(phi_q.shape[0], checkpoint.n, dtype=dtype, device=features.device)
        columns = torch.from_numpy(checkpoint.columns).to(features.device)
        part = -(u.to(dtype).to(features.device) @ features.to(dtype).T) / checkpoint.n
        scores.index_add_(1, columns, part)
    assert scores is not None
    return scores / len(checkpoints)
