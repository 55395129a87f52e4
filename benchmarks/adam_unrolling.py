"""SOURCE under Adam and AdamW against exact unrolling, on runs small enough to unroll.

Run:  python benchmarks/adam_unrolling.py

Two problems, each trained once with Adam and once with AdamW (weight decay 0.1, and 0.5
for the regression), with 6 checkpoints and 3 segments:

- a tanh network 4-8-3 on 64 generated examples, batches of 16, 32 steps, learning rate
  0.01: SOURCE with the dense Gauss-Newton matrix ("exact"), the dense Hessian and
  EK-FAC, at damping 1e-3 and "auto", in the exponential and the finite-product form;
- full-batch linear regression (5 inputs, 2 outputs, 40 examples, 60 steps): the dense
  form with and without Adam's own response (``adam_response``), undamped.

For each it prints the mean over queries of the Pearson correlation between SOURCE's
and exact unrolling's score rows, and the ratio of their norms.
"""

from __future__ import annotations

import numpy as np
import torch

import sourcekit
from sourcekit import Examples, OptimizerSpec, SourceAttributor, TrainingStage, UnrolledAttributor


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)]))


def ratio(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a) / np.linalg.norm(b))


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def linear() -> torch.nn.Module:
    return torch.nn.Linear(5, 2).double()


def summed(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.sum(dim=1)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    queries = Examples(
        torch.randn(16, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=g),
    )
    print(
        f"{'run':<14} {'curvature':<9} {'damping':<8} {'form':<9} {'Pearson':>8} {'norm ratio':>11}"
    )
    for opt in (OptimizerSpec("adam", lr=0.01), OptimizerSpec("adamw", lr=0.01, weight_decay=0.1)):
        torch.manual_seed(0)
        stage = TrainingStage(opt, epochs=8, batch_size=16, n_checkpoints=6)
        run = sourcekit.train(mlp, Examples(x, y), [stage], progress=False)
        exact = UnrolledAttributor(device="cpu").fit(run).transform(queries)
        for kind in ("exact", "hessian", "ekfac"):
            for damping in (1e-3, "auto"):
                for form in ("exp", "discrete"):
                    source = SourceAttributor(
                        3, damping=damping, curvature=kind, matrix_function=form,
                        device="cpu", dtype="float64",
                    )  # fmt: skip
                    scores = source.fit(run).transform(queries)
                    print(
                        f"{'mlp ' + opt.kind:<14} {kind:<9} {damping!s:<8} {form:<9} "
                        f"{pearson(scores, exact):+8.3f} {ratio(scores, exact):11.2f}"
                    )
    xl = torch.randn(40, 5, generator=g, dtype=torch.float64)
    weights = torch.randn(5, 2, generator=g, dtype=torch.float64)
    yl = xl @ weights + 0.1 * torch.randn(40, 2, generator=g, dtype=torch.float64)
    lq = Examples(
        torch.randn(8, 5, generator=g, dtype=torch.float64), torch.zeros(8, 2, dtype=torch.float64)
    )
    for opt in (OptimizerSpec("adam", lr=0.01), OptimizerSpec("adamw", lr=0.01, weight_decay=0.5)):
        torch.manual_seed(0)
        stage = TrainingStage(opt, epochs=60, batch_size=40, n_checkpoints=6)
        run = sourcekit.train(
            linear,
            Examples(xl, yl),
            [stage],
            loss="squared_error",
            measurement=summed,
            progress=False,
        )
        exact = UnrolledAttributor(device="cpu").fit(run).transform(lq)
        for response in (False, True):
            source = SourceAttributor(
                3, damping=0.0, curvature="exact", matrix_function="discrete",
                adam_response=response, device="cpu", dtype="float64",
            )  # fmt: skip
            scores = source.fit(run).transform(lq)
            form = "response" if response else "v fixed"
            print(
                f"{'linear ' + opt.kind:<14} {'exact':<9} {'0':<8} {form:<9} "
                f"{pearson(scores, exact):+8.3f} {ratio(scores, exact):11.2f}"
            )


if __name__ == "__main__":
    main()
