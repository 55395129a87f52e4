"""Contraction scoring against forming per-example gradients, and low-rank query matrices.

Run:  python benchmarks/contraction.py [--queries 100] [--repeats 3] [--threads 1]
                                       [--workloads digits conv sequence text]

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
  curvature), a causal running mean, and two Linear layers applied at every position;
- ``text clf``: a classifier of sequences of 16 tokens from a vocabulary of 4096:
  Embedding, a Linear layer at every position, mean pooling and a Linear head (the
  embedding table is where a per-example gradient is large and the lookup small).

The column ``scoring s`` is the part of ``transform`` that the variants change: the
contractions and the low-rank factorisations (the rest, query gradients and
preconditioning, is common to all variants).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import sourcekit
import sourcekit.scoring._source as source_kernel
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


class TextClassifier(nn.Module):
    """Embedding -> Linear + GELU at every position -> mean over positions -> Linear."""

    def __init__(self, vocabulary: int = 4096, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.gelu(self.mix(self.embed(tokens))).mean(dim=1))


def labelled_texts(n: int, seed: int, vocabulary: int = 4096) -> Examples:
    """16 tokens per text, half of them from a vocabulary slice that depends on the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    tokens = torch.randint(0, vocabulary, (n, 16), generator=g)
    topical = (
        torch.randint(0, vocabulary // 4, (n, 8), generator=g)
        + (vocabulary // 4) * labels[:, None]
    )
    tokens[:, ::2] = topical
    return Examples(tokens, labels)


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


def record(name: str, n_queries: int) -> tuple[str, sourcekit.Trajectory, Examples]:
    """The workload ``name``: its label, recorded run and queries."""
    stage = TrainingStage(
        OptimizerSpec("sgd", lr=0.05, momentum=0.9), epochs=3, batch_size=64, n_checkpoints=6
    )
    if name == "digits":
        task = sourcekit.datasets.load_digits_task()
        return "digits MLP", task.record("standard", progress=False), task.test[:n_queries]
    if name == "conv":
        run = sourcekit.train(make_conv_net, images(1024, 0), [stage], progress=False)
        return "conv net", run, images(n_queries, 1)
    stage = TrainingStage(
        OptimizerSpec("sgd", lr=0.5, momentum=0.9), epochs=3, batch_size=64, n_checkpoints=6
    )
    if name == "sequence":
        run = sourcekit.train(
            NextToken,
            token_sequences(1024, 0),
            [stage],
            measurement="cross_entropy",
            progress=False,
        )
        return "sequence", run, token_sequences(n_queries, 1)
    run = sourcekit.train(TextClassifier, labelled_texts(1024, 0), [stage], progress=False)
    return "text clf", run, labelled_texts(n_queries, 1)


WORKLOADS = ("digits", "conv", "sequence", "text")


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


class ScoringClock:
    """Accumulates the time spent in SOURCE's contractions and low-rank factorisations."""

    seconds = 0.0

    @classmethod
    def wrap(cls, fn):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - start

        return timed


source_kernel.gradient_dot = ScoringClock.wrap(source_kernel.gradient_dot)
source_kernel.query_matrices = ScoringClock.wrap(source_kernel.query_matrices)


def best_times(functions: dict, repeats: int) -> dict[str, tuple[float, float, np.ndarray]]:  # type: ignore[type-arg]
    """(best total time, best scoring time, scores) of each function over ``repeats``
    rounds after a warm-up round, the functions taking turns in every round."""
    results = {name: (float("inf"), float("inf"), fn()) for name, fn in functions.items()}
    for _ in range(repeats):
        for name, fn in functions.items():
            ScoringClock.seconds = 0.0
            start = time.perf_counter()
            scores = fn()
            seconds = time.perf_counter() - start
            best, best_scoring, _ = results[name]
            results[name] = (min(best, seconds), min(best_scoring, ScoringClock.seconds), scores)
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"SOURCE (n_segments=3, EK-FAC) transform, {args.queries} queries, torch threads "
        f"{args.threads}, best of {args.repeats} runs; Pearson against the formed path\n"
    )
    header = (
        f"{'workload':<12}{'variant':<12}{'transform s':>12}{'scoring s':>11}"
        f"{'scoring / formed':>18}{'Pearson':>9}"
    )
    lines = [header]
    notes = []
    for workload in args.workloads:
        name, trajectory, queries = record(workload, args.queries)
        source = sourcekit.SourceAttributor(n_segments=3, device="cpu").fit(trajectory)
        notes.append(f"{name}: " + block_paths(trajectory, args.queries, source.batch_size))
        results = best_times(variants(source, queries), args.repeats)
        _, base_scoring, base = results["formed"]
        for variant, (seconds, scoring, scores) in results.items():
            pearson = np.corrcoef(scores.ravel(), base.ravel())[0, 1]
            lines.append(
                f"{name:<12}{variant:<12}{seconds:>12.4f}{scoring:>11.4f}"
                f"{scoring / base_scoring:>18.2f}{pearson:>9.4f}"
            )
    print("\n".join(lines))
    print("\nPaths chosen by the cost model per layer (exact / rank 4), batches of 256:")
    print("\n".join(f"  {n}" for n in notes))


if __name__ == "__main__":
    main()
