"""Contraction scoring against forming per-example gradients, and low-rank query matrices.

Run:  python benchmarks/contraction.py [--queries 100] [--repeats 5] [--threads 1]

SOURCE (n_segments=3, EK-FAC) is fitted once per workload; its ``transform`` is then
timed with the contraction path forced each way and with low-rank query matrices
(``query_rank`` r in 1, 4, 16), side by side in one run:

- ``formed``: every per-example gradient G = Σ_t s_t a_tᵀ is built, then contracted
  with the preconditioned query matrices by one matrix product (the plain path);
- ``contracted``: Σ_t s_tᵀ U_q a_t without forming G;
- ``auto``: the library's default, the cheaper of the two per layer by its cost model;
- ``rank r``: each query matrix replaced by its best rank-r approximation (auto path).

Pearson is the correlation of all scores with the formed path's (exact) scores. Times
are the best of ``--repeats`` runs after a warm-up, the variants taking turns in every
round, so that other load on the machine affects them alike.

Workloads, all built here from synthetic data except the first (no downloads):

- ``digits MLP``: the embedded digits task, ``standard`` recipe (64-32-32-10, T = 1);
- ``conv net``: two Conv2d layers and a Linear head on 3 x 16 x 16 images (T = 256 and
  64 spatial positions);
- ``sequence``: a next-token model on sequences of 16 tokens: Embedding (diagonal
  curvature), a causal running mean, and two Linear layers applied at every position.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import sourcekit
from sourcekit import Examples, OptimizerSpec, TrainingStage
from sourcekit.gradients._layers import find_blocks
from sourcekit.scoring._contraction import LowRank, choose_path, contraction_path

RANKS = (1, 4, 16)


# --- workloads ----------------------------------------------------------------------------
def make_conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class NextToken(nn.Module):
    """Embedding -> causal running mean -> Linear -> GELU -> Linear: (n, T, vocabulary)."""

    def __init__(self, vocabulary: int = 64, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        steps = torch.arange(1, tokens.shape[1] + 1, device=e.device, dtype=e.dtype)
        context = e.cumsum(dim=1) / steps[:, None]
        return self.out(nn.functional.gelu(self.mix(e + context)))


def images(n: int, seed: int) -> Examples:
    """Noisy images of ten fixed random colour patterns."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, 10, (n,), generator=g)
    x = patterns[labels] + 1.5 * torch.randn(n, 3, 16, 16, generator=g)
    return Examples(x, labels)


def token_sequences(n: int, seed: int, vocabulary: int = 64, length: int = 17) -> Examples:
    """Sequences of a fixed random Markov chain; targets are the next tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(vocabulary, vocabulary, generator=torch.Generator().manual_seed(98))
    chain = torch.softmax(logits, dim=1)
    tokens = torch.empty(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocabulary, (n,), generator=g)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=g)[:, 0]
    return Examples(tokens[:, :-1], tokens[:, 1:])


def workloads(n_queries: int) -> list[tuple[str, sourcekit.Trajectory, Examples]]:
    digits = sourcekit.datasets.load_digits_task()
    out = [("digits MLP", digits.record("standard", progress=False), digits.test[:n_queries])]
    conv_stage = TrainingStage(
        OptimizerSpec("sgd", lr=0.05, momentum=0.9), epochs=3, batch_size=64, n_checkpoints=6
    )
    conv = sourcekit.train(make_conv_net, images(1024, 0), [conv_stage], progress=False)
    out.append(("conv net", conv, images(n_queries, 1)))
    seq_stage = TrainingStage(
        OptimizerSpec("sgd", lr=0.5, momentum=0.9), epochs=3, batch_size=64, n_checkpoints=6
    )
    seq = sourcekit.train(
        NextToken,
        token_sequences(1024, 0),
        [seq_stage],
        loss="cross_entropy",
        measurement="cross_entropy",
        progress=False,
    )
    out.append(("sequence", seq, token_sequences(n_queries, 1)))
    return out


# --- measuring ----------------------------------------------------------------------------
def variants(source: sourcekit.SourceAttributor, queries: Examples) -> dict:  # type: ignore[type-arg]
    """Each variant as a function computing the scores."""

    def on_path(path: str):  # type: ignore[no-untyped-def]
        def run() -> np.ndarray:
            with contraction_path(path):
                return source.set_params(query_rank=None).transform(queries)

        return run

    def with_rank(rank: int):  # type: ignore[no-untyped-def]
        return lambda: source.set_params(query_rank=rank).transform(queries)

    out = {path: on_path(path) for path in ("formed", "contracted", "auto")}
    out.update({f"rank {r}": with_rank(r) for r in RANKS})
    return out


def best_times(functions: dict, repeats: int) -> dict[str, tuple[float, np.ndarray]]:  # type: ignore[type-arg]
    """The best time of each function over ``repeats`` rounds (after a warm-up round)."""
    results = {name: (float("inf"), fn()) for name, fn in functions.items()}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            scores = fn()
            seconds = time.perf_counter() - start
            results[name] = (min(results[name][0], seconds), scores)
    return results


def block_paths(trajectory: sourcekit.Trajectory, n_queries: int, batch: int) -> str:
    """Each layer's (T, d_out, d_in) and the path the cost model picks, exact and rank 4."""
    model = trajectory.build_model()
    blocks = find_blocks(model)
    positions: dict[str, int] = {}
    hooks = []
    named = dict(model.named_modules())
    for b in blocks:

        def hook(module, _inputs, out, name=b.name):  # type: ignore[no-untyped-def]
            spatial = out.shape[2:] if isinstance(module, nn.Conv2d) else out.shape[1:-1]
            positions[name] = int(np.prod(spatial))

        hooks.append(named[b.name].register_forward_hook(hook))
    with torch.no_grad():
        model(trajectory.train[:2].inputs)
    for h in hooks:
        h.remove()
    parts = []
    for b in blocks:
        t = positions[b.name]
        dense = torch.empty(n_queries, b.d_out, b.d_in, device="meta")
        low = LowRank(
            torch.empty(n_queries, b.d_out, 4, device="meta"),
            torch.empty(n_queries, b.d_in, 4, device="meta"),
        )
        exact = choose_path(batch, t, dense, b.one_hot)[0]
        rank4 = exact if b.one_hot else choose_path(batch, t, low)[0]
        parts.append(f"{b.name} ({b.kind}, T={t}, {b.d_out}x{b.d_in}): {exact} / r=4 {rank4}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"SOURCE (n_segments=3, EK-FAC) transform, {args.queries} queries, torch threads "
        f"{args.threads}, best of {args.repeats} runs; Pearson against the formed path\n"
    )
    header = f"{'workload':<12}{'variant':<12}{'transform s':>12}{'/ formed':>10}{'Pearson':>10}"
    lines = [header]
    notes = []
    for name, trajectory, queries in workloads(args.queries):
        source = sourcekit.SourceAttributor(n_segments=3, device="cpu").fit(trajectory)
        notes.append(f"{name}: " + block_paths(trajectory, args.queries, source.batch_size))
        results = best_times(variants(source, queries), args.repeats)
        base_time, base = results["formed"]
        for variant, (seconds, scores) in results.items():
            pearson = np.corrcoef(scores.ravel(), base.ravel())[0, 1]
            lines.append(
                f"{name:<12}{variant:<12}{seconds:>12.4f}{seconds / base_time:>10.2f}"
                f"{pearson:>10.4f}"
            )
    print("\n".join(lines))
    print("\nPaths chosen by the cost model per layer (exact / rank 4), batches of 256:")
    print("\n".join(f"  {n}" for n in notes))


if __name__ == "__main__":
    main()
