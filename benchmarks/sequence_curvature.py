"""The fitted curvature of a sequence model against its dense Gauss-Newton matrix.

Run:  python benchmarks/sequence_curvature.py

A next-token model (``Embedding(8, 6) → tanh → Linear(6, 8)`` at every position) is trained
with SGD on 96 sequences of T tokens and recorded, for T = 1 and T = 16. Its objective is
the mean over sequences of the mean next-token cross-entropy over positions, whose
Gauss-Newton matrix (1/n) Σ_m J_mᵀ H_m J_m (H_m the block-diagonal of (diag p_t − p_t p_tᵀ)/T
over positions) is computed here densely with torch.func, independently of sourcekit.

For each block, the script prints the sum of the diagonal of the curvature that
``InfluenceAttributor(curvature="diagonal", fisher="true")`` fits, against the dense
diagonal's sum, in two ways:

- "per position": sourcekit as it is (the built-in loss describes its positions, and the
  Fisher is formed per position with the loss's weights);
- "whole example": the same loss without its ``per_position`` description, so that the
  Fisher is formed from the gradient of each sequence's whole loss (what sourcekit did for
  every sequence model before it formed the Fisher per position).

It also prints, per way, the Pearson correlation of EK-FAC influence scores with the dense
influence function (damping 1e-2), over all (query, training example) pairs.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev

import sourcekit
from sourcekit.objectives import cross_entropy

VOCABULARY, WIDTH, N_TRAIN, N_QUERIES = 8, 6, 96, 16


def make_model() -> nn.Module:
    """Embedding → tanh → Linear at every position: logits (n, T, vocabulary)."""
    return nn.Sequential(nn.Embedding(VOCABULARY, WIDTH), nn.Tanh(), nn.Linear(WIDTH, VOCABULARY))


def whole_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The built-in cross-entropy without ``per_position``: one position per example."""
    return cross_entropy(outputs, targets)


whole_example_loss.sample_targets = cross_entropy.sample_targets  # type: ignore[attr-defined]
whole_example_loss.noise_shape = cross_entropy.noise_shape  # type: ignore[attr-defined]


def data(positions: int, n: int, seed: int) -> sourcekit.Examples:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCABULARY, (n, positions + 1), generator=g)
    return sourcekit.Examples(tokens[:, :-1], tokens[:, 1:])  # predict the next token


def record(positions: int) -> sourcekit.Trajectory:
    stage = sourcekit.TrainingStage(
        sourcekit.OptimizerSpec("sgd", lr=0.5), epochs=5, batch_size=16, n_checkpoints=1
    )
    return sourcekit.train(
        "sequence_curvature:make_model",
        data(positions, N_TRAIN, seed=positions),
        [stage],
        loss="cross_entropy",
        measurement="cross_entropy",
        progress=False,
    )


def with_loss(
    trajectory: sourcekit.Trajectory, loss: object, directory: str
) -> sourcekit.Trajectory:
    """The same recorded run, read back with another loss callable (the same values)."""
    trajectory.save(directory, overwrite=True)
    return sourcekit.Trajectory.load(directory, loss=loss)  # type: ignore[arg-type]


def dense_gauss_newton(trajectory: sourcekit.Trajectory) -> dict[str, torch.Tensor]:
    """Diagonal of the Gauss-Newton matrix of the mean loss at the final state, per block."""
    model = trajectory.build_model().double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    inputs, targets = trajectory.train.inputs, trajectory.train.targets
    positions = targets.shape[1]

    def logits(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, p, (inputs,))

    jac = jacrev(logits)(params)  # name -> (n, T, C, *param shape)
    probs = logits(params).detach().softmax(dim=-1)
    hess = (torch.diag_embed(probs) - probs[..., :, None] * probs[..., None, :]) / positions
    out = {}
    for name, j in jac.items():
        j = j.reshape(*j.shape[:3], -1)  # (n, T, C, P)
        diag = torch.einsum("ntcp,ntcd,ntdp->p", j, hess, j) / len(inputs)
        out[name] = diag
    return out


def fitted_diagonal(trajectory: sourcekit.Trajectory) -> dict[str, torch.Tensor]:
    estimator = sourcekit.InfluenceAttributor(
        curvature="diagonal", fisher="true", dtype="float64"
    ).fit(trajectory)
    curvature = estimator.state_.curvature
    return {b.name: curvature.factors[b.name].eigenvalues for b in curvature.blocks}


def influence_scores(
    trajectory: sourcekit.Trajectory, queries: sourcekit.Examples, curvature: str
) -> np.ndarray:
    estimator = sourcekit.InfluenceAttributor(damping=1e-2, curvature=curvature, dtype="float64")
    return estimator.fit(trajectory).transform(queries).ravel()


def main() -> None:
    print(
        "block sums of the diagonal curvature (fitted / dense Gauss-Newton), and Pearson of "
        "EK-FAC influence with the dense influence function (damping 1e-2)\n"
    )
    print(
        f"{'T':>3}  {'Fisher formed':<14} {'embedding block':>18} {'output block':>18} {'Pearson':>8}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for positions in (1, 16):
            run = record(positions)
            queries = data(positions, N_QUERIES, seed=100 + positions)
            dense = dense_gauss_newton(run)
            reference = influence_scores(run, queries, "exact")
            whole = with_loss(run, whole_example_loss, f"{scratch}/{positions}")
            for way, trajectory in (("per position", run), ("whole example", whole)):
                fitted = fitted_diagonal(trajectory)
                embed = f"{float(fitted['0'].sum()):.3f} / {float(dense['0.weight'].sum()):.3f}"
                out_dense = float(dense["2.weight"].sum() + dense["2.bias"].sum())
                out = f"{float(fitted['2'].sum()):.3f} / {out_dense:.3f}"
                scores = influence_scores(trajectory, queries, "ekfac")
                pearson = float(np.corrcoef(scores, reference)[0, 1])
                print(f"{positions:>3}  {way:<14} {embed:>18} {out:>18} {pearson:>8.3f}")


if __name__ == "__main__":
    main()
