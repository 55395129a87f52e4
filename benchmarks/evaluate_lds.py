"""Linear datamodeling score of every attributor on the digits recipes and the text task.

Run:  python benchmarks/evaluate_lds.py [--task digits] [--queries 100] [--subsets 100] [--seeds 3] [--n-jobs 2]
      python benchmarks/evaluate_lds.py --task text --queries 64

For each recipe (digits: ``standard``, ``early``, ``two_stage``, ``adamw``; text:
``standard``, ``early``) it records the run, retrains the recipe on ``--subsets`` random halves of the
training set with ``--seeds`` seeds each (cached under ``--cache``, so a rerun only reads
the files), and prints, for every method, the LDS over the test queries (mean over
queries with a 95 % bootstrap interval) and the wall time of the method.

The text task (``sourcekit.datasets.load_text_task``) is a next-token model whose outputs
have positions: its loss is the mean over each sequence's counted positions. Besides
the methods of the digits table it runs SOURCE and influence functions with the dense
Gauss-Newton matrix, and, marked "whole-example Fisher", SOURCE and influence functions
on the same run with a loss that does not describe its positions, so that the Fisher is
formed from whole-sequence gradients: the curvature sourcekit fitted for sequence models
before it formed the Fisher per position (T times too small for a mean over T
positions).

Damped methods choose their damping by ``GridSearchCV`` with ``LDSScorer`` on held-out
query folds: the queries are split into 5 outer folds, and each fold's scores come from
an estimator whose damping was chosen by an inner 4-fold search on the other queries,
so no query's LDS is measured with a damping chosen on that query. The table lists the
dampings chosen in the outer folds. SOURCE also runs with its default damping
(``damping="auto"``, 0.01/s per segment), which needs no search; and where exact unrolling
runs, a second table gives each method's per-query Pearson correlation with it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold

import sourcekit
from sourcekit.evaluation import (
    LDSScorer,
    linear_datamodeling_score,
    make_subset_masks,
    retrain_measurements,
)
from sourcekit.objectives import cross_entropy

GRID = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
# SOURCE's residual stays bounded by the segment's learning-rate sum as σ → 0, so it
# needs no damping at all: its grid starts at 0.
SOURCE_GRID = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]

Methods = dict[str, tuple[Callable[[], Any], list[float] | None]]


def methods() -> Methods:
    """Name -> (estimator factory, damping grid or None), for the digits task."""
    return {
        "SOURCE (L=3, EK-FAC)": (lambda: sourcekit.SourceAttributor(n_segments=3), SOURCE_GRID),
        "SOURCE (L=3, EK-FAC), default damping": (
            lambda: sourcekit.SourceAttributor(n_segments=3),
            None,
        ),
        "SOURCE (L=3, averaged)": (
            lambda: sourcekit.SourceAttributor(n_segments=3, average_checkpoints=True),
            SOURCE_GRID,
        ),
        "influence (EK-FAC)": (lambda: sourcekit.InfluenceAttributor(damping=1e-3), GRID),
        "TracIn": (lambda: sourcekit.TracInAttributor(), None),
        "TRAK (k=512)": (lambda: sourcekit.TRAKAttributor(projection_dim=512, damping=1e-3), GRID),
        "gradient similarity (dot)": (lambda: sourcekit.GradientSimilarityAttributor(), None),
        "representation similarity": (
            lambda: sourcekit.RepresentationSimilarityAttributor(),
            None,
        ),
        "exact unrolling": (lambda: sourcekit.UnrolledAttributor(), None),
    }


WHOLE_EXAMPLE = "whole-example Fisher"


def text_methods() -> Methods:
    """Name -> (estimator factory, damping grid or None), for the text task."""
    return {
        "SOURCE (L=3, EK-FAC)": (lambda: sourcekit.SourceAttributor(n_segments=3), SOURCE_GRID),
        "SOURCE (L=3, dense)": (
            lambda: sourcekit.SourceAttributor(n_segments=3, curvature="exact"),
            SOURCE_GRID,
        ),
        f"SOURCE (L=3, EK-FAC), {WHOLE_EXAMPLE}": (
            lambda: sourcekit.SourceAttributor(n_segments=3),
            SOURCE_GRID,
        ),
        "influence (EK-FAC)": (lambda: sourcekit.InfluenceAttributor(damping=1e-3), GRID),
        "influence (dense)": (
            lambda: sourcekit.InfluenceAttributor(damping=1e-3, curvature="exact"),
            GRID,
        ),
        f"influence (EK-FAC), {WHOLE_EXAMPLE}": (
            lambda: sourcekit.InfluenceAttributor(damping=1e-3),
            GRID,
        ),
        "TracIn": (lambda: sourcekit.TracInAttributor(), None),
        "exact unrolling": (lambda: sourcekit.UnrolledAttributor(), None),
    }


def whole_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The built-in cross-entropy without its ``per_position`` description."""
    return cross_entropy(outputs, targets)


whole_example_cross_entropy.sample_targets = cross_entropy.sample_targets  # type: ignore[attr-defined]
whole_example_cross_entropy.noise_shape = cross_entropy.noise_shape  # type: ignore[attr-defined]


def with_whole_example_fisher(
    trajectory: sourcekit.Trajectory, directory: str
) -> sourcekit.Trajectory:
    """The same run, read back with a loss whose Fisher is formed from whole-example gradients."""
    trajectory.save(directory, overwrite=True)
    return sourcekit.Trajectory.load(directory, loss=whole_example_cross_entropy)


def pearson_per_query(scores: np.ndarray, reference: np.ndarray) -> float:
    """The mean over queries of the Pearson correlation of two score rows."""
    values = [np.corrcoef(a, b)[0, 1] for a, b in zip(scores, reference, strict=True)]
    return float(np.mean(values))


def scores_with_held_out_damping(
    make: Callable[[], Any], grid: list[float], X: Any, y: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, list[float]]:
    """Scores of every query from an estimator whose damping was chosen without it."""
    scores = np.zeros((len(X), X.trajectory.n_train))
    chosen = []
    for train_rows, test_rows in KFold(5, shuffle=True, random_state=0).split(np.arange(len(X))):
        search = GridSearchCV(
            make(),
            {"damping": grid},
            scoring=LDSScorer(masks),
            cv=KFold(4, shuffle=True, random_state=1),
        )
        search.fit(X[train_rows], y[train_rows])
        chosen.append(search.best_params_["damping"])
        scores[test_rows] = search.best_estimator_.transform(X[test_rows])
    return scores, chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument(
        "--cache", default=".cache/sourcekit-lds", help="directory of the retraining cache"
    )
    parser.add_argument("--task", choices=["digits", "text"], default="digits")
    parser.add_argument(
        "--recipes",
        nargs="+",
        help="default: standard early two_stage adamw (digits), standard early (text)",
    )
    parser.add_argument("--methods", nargs="+", help="only the methods whose names contain these")
    args = parser.parse_args()

    if args.task == "digits":
        task: Any = sourcekit.datasets.load_digits_task()
        recipes = args.recipes or ["standard", "early", "two_stage", "adamw"]
        table = methods()
    else:
        task = sourcekit.datasets.load_text_task()
        recipes = args.recipes or ["standard", "early"]
        table = text_methods()
    if args.methods:
        table = {k: v for k, v in table.items() if any(m in k for m in args.methods)}
    rows = []
    correlations: dict[str, dict[str, float]] = {}
    scratch = tempfile.TemporaryDirectory()
    for recipe in recipes:
        trajectory = task.record(recipe, progress=False)
        queries = task.test[: args.queries]
        masks = make_subset_masks(trajectory.n_train, args.alpha, args.subsets, random_state=0)
        started = time.perf_counter()
        truth = retrain_measurements(
            trajectory,
            queries,
            masks,
            seeds=range(args.seeds),
            n_jobs=args.n_jobs,
            cache_dir=args.cache,
        )
        truth_seconds = time.perf_counter() - started
        y = truth.outputs
        variants = {None: trajectory.bind(queries)}
        recipe_scores = {}
        for name, (make, grid) in table.items():
            variant = WHOLE_EXAMPLE if name.endswith(WHOLE_EXAMPLE) else None
            if variant not in variants:
                run = with_whole_example_fisher(trajectory, f"{scratch.name}/{recipe}")
                variants[variant] = run.bind(queries)
            X = variants[variant]
            sourcekit.base.clear_state_cache()
            started = time.perf_counter()
            if grid is None:
                scores, chosen = clone(make()).fit(X).transform(X), []
            else:
                scores, chosen = scores_with_held_out_damping(make, grid, X, y, masks)
            seconds = time.perf_counter() - started
            recipe_scores[name] = scores
            result = linear_datamodeling_score(scores, masks, y, random_state=0)
            rows.append((recipe, name, result, chosen, seconds, truth_seconds))
            print(
                f"{recipe:<10} {name:<44} LDS {result.mean:+.3f} [{result.confidence_interval[0]:+.3f}, {result.confidence_interval[1]:+.3f}]  {seconds:6.1f} s",
                flush=True,
            )
        if "exact unrolling" in recipe_scores:
            exact = recipe_scores["exact unrolling"]
            correlations[recipe] = {
                name: pearson_per_query(scores, exact)
                for name, scores in recipe_scores.items()
                if name != "exact unrolling"
            }

    print(
        f"\n{args.task} task, {args.queries} test queries, {args.subsets} subsets of {args.alpha:.0%} of the "
        f"training set, {args.seeds} seeds per subset; LDS mean over queries with a 95 % bootstrap interval\n"
    )
    print(
        f"{'recipe':<10} {'method':<44} {'LDS':>7} {'interval':>17}  {'damping chosen (5 folds)':<32} {'time s':>7}"
    )
    for recipe, name, result, chosen, seconds, _ in rows:
        damping = ", ".join(f"{d:g}" for d in chosen) if chosen else "-"
        print(
            f"{recipe:<10} {name:<44} {result.mean:>+7.3f} [{result.confidence_interval[0]:+.3f}, {result.confidence_interval[1]:+.3f}]"
            f"  {damping:<32} {seconds:>7.1f}"
        )
    if correlations:
        print("\nper-query Pearson correlation with exact unrolling (mean over queries):")
        for recipe, values in correlations.items():
            for name, r in values.items():
                print(f"{recipe:<10} {name:<44} {r:+.3f}")
    print("\nground truth (retraining, cached after the first run):")
    for recipe in recipes:
        seconds = next(r[5] for r in rows if r[0] == recipe)
        print(f"  {recipe:<10} {seconds:6.1f} s")


if __name__ == "__main__":
    main()
