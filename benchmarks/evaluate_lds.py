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

``--table ensembles`` prints instead the LDS of SOURCE and of exact unrolling averaged
over 1, 3 and 5 runs of each recipe (``--runs``), the scores ``EnsembleAttributor``
returns (the mean of each run's score matrix; each run is fitted and scored once and the
rows average the first R, each row's times the sums over its runs): run r is the recipe
trained with ``random_state=r`` (run 0 is the run of the main table; the two-stage
recipe keeps the split of run 0 in every run, the split the ground truth retrains
with). The damping of an ensemble is chosen on its averaged scores. ``--table fisher`` prints the LDS of SOURCE and of EK-FAC influence with
each Fisher (``fisher="true"``, with two seeds of its sampled targets, ``"expected"``,
``"empirical"``) and the time of fitting each one's state (the Fisher's cost) beside the
time of the damping search; ``--table fisher-cost`` times those fits alone, interleaved
and repeated (``--repeats``), without the ground truth. ``--table damping`` prints, for
SOURCE with 3 segments and each curvature of ``--curvatures`` (EK-FAC and the dense
Gauss-Newton matrix), the LDS at every damping of a grid from 0 to 10, the best of them
(chosen on the queries it is scored on), the LDS of ``damping="auto"`` and its gap to the
best, and per segment the learning-rate sum s, the spectrum of the matrix the damping
shifts (mean m, median, largest eigenvalue, effective rank tr²/‖·‖²) and the damping
``"auto"`` took (docs/source.md, "Damping").

Damped methods choose their damping by ``GridSearchCV`` with ``LDSScorer`` on held-out
query folds: the queries are split into 5 outer folds, and each fold's scores come from
an estimator whose damping was chosen by an inner 4-fold search on the other queries,
so no query's LDS is measured with a damping chosen on that query. The table lists the
dampings chosen in the outer folds. SOURCE also runs with its default damping
(``damping="auto"``, 0.01/s per segment for EK-FAC), which needs no search; and where exact unrolling
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
from sklearn.model_selection import KFold

import sourcekit
from sourcekit.evaluation import (
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

# ``--table damping``: SOURCE over this grid, against its default ``damping="auto"``.
DAMPING_GRID = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0]


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


def held_out_damping(
    per_damping: list[np.ndarray], grid: list[float], masks: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, list[float]]:
    """Scores of every query at a damping chosen without it, from each damping's scores.

    The choice of ``GridSearchCV(..., scoring=LDSScorer(masks), cv=KFold(4))`` on the
    other queries of each of 5 outer folds, made from the score matrices of all queries
    at every damping of ``grid`` (``per_damping``): a query's LDS depends on its own
    scores only, and a fitted attributor scores a subset of queries as it scores them
    all, so each damping needs one scoring instead of one per fold and candidate.
    """
    per_query = [linear_datamodeling_score(s, masks, y).per_query for s in per_damping]
    n_queries = len(per_damping[0])
    scores = np.zeros_like(per_damping[0], dtype=np.float64)
    chosen = []
    for train_rows, test_rows in KFold(5, shuffle=True, random_state=0).split(
        np.arange(n_queries)
    ):
        inner = KFold(4, shuffle=True, random_state=1).split(train_rows)
        folds = [train_rows[rows] for _, rows in inner]
        # GridSearchCV's mean test score: the mean over folds of each fold's mean LDS
        # (undefined queries left out), the first of equal means winning.
        means = [np.mean([np.nanmean(lds[fold]) for fold in folds]) for lds in per_query]
        best = int(np.nanargmax(means))
        chosen.append(grid[best])
        scores[test_rows] = per_damping[best][test_rows]
    return scores, chosen


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def scores_at(fitted: Any, grid: list[float] | None, parameter: str, X: Any) -> list[np.ndarray]:
    """The fitted attributor's scores of ``X`` at every damping of ``grid`` (or once)."""
    if grid is None:
        return [fitted.transform(X)]
    return [fitted.set_params(**{parameter: d}).transform(X) for d in grid]


def choose(
    per_damping: list[np.ndarray], grid: list[float] | None, masks: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, list[float]]:
    if grid is None:
        return per_damping[0], []
    return held_out_damping(per_damping, grid, masks, y)


def ground_truth(
    task: Any, recipe: str, args: argparse.Namespace, progress: bool = True
) -> tuple[sourcekit.Trajectory, Any, np.ndarray, np.ndarray, float]:
    """A recipe's run, its first ``args.queries`` test queries, the random subsets
    (``args.subsets`` of ``args.alpha`` of the training set, or half where ``args`` has
    no ``alpha``) and the outputs of retraining on them with ``args.seeds`` seeds (cached
    under ``args.cache``, shared by every benchmark that reads this ground truth), and
    the seconds the retraining took."""
    trajectory = task.record(recipe, progress=False)
    queries = task.test[: args.queries]
    alpha = getattr(args, "alpha", 0.5)
    masks = make_subset_masks(trajectory.n_train, alpha, args.subsets, random_state=0)
    started = time.perf_counter()
    truth = retrain_measurements(
        trajectory,
        queries,
        masks,
        seeds=range(args.seeds),
        n_jobs=args.n_jobs,
        cache_dir=args.cache,
        progress=progress,
    )
    return trajectory, queries, masks, truth.outputs, time.perf_counter() - started


def record_runs(task: Any, recipe: str, seeds: range) -> list[sourcekit.Trajectory]:
    """The recipe trained with each seed; the stages (a two-stage split) are run 0's."""
    if isinstance(task, sourcekit.datasets.DigitsTask):
        stages = task.stages(recipe, random_state=0)
    else:
        stages = task.stages(recipe)
    return [
        sourcekit.train(
            task.architecture,
            task.train,
            stages,
            loss=task.loss,
            measurement=task.measurement,
            architecture_kwargs=task.architecture_kwargs,
            random_state=seed,
            progress=False,
        )
        for seed in seeds
    ]


# A row of a table: (name, scores, dampings chosen, fit seconds, total seconds)
Result = tuple[str, np.ndarray, list[float], float, float]


def evaluate(
    name: str, make: Callable[[], Any], grid: list[float] | None, X: Any, masks: Any, y: Any
) -> Result:
    """Fit once (from an empty state cache), score at every damping, choose held out."""
    sourcekit.base.clear_state_cache()
    fitted, fit_seconds = timed(lambda: clone(make()).fit(X))
    per_damping, score_seconds = timed(lambda: scores_at(fitted, grid, "damping", X))
    scores, chosen = choose(per_damping, grid, masks, y)
    return name, scores, chosen, fit_seconds, fit_seconds + score_seconds


def ensemble_results(
    task: Any, recipe: str, queries: Any, counts: list[int], masks: Any, y: Any
) -> list[Result]:
    """SOURCE and exact unrolling averaged over the first R runs, for R in ``counts``.

    The score matrix of ``EnsembleAttributor`` over R runs is the mean of its R fitted
    clones' (tests/estimators/test_ensemble.py): each run is fitted and scored once
    here, and the rows average the first R of them; a row's times are the sums over its
    runs.
    """
    runs = record_runs(task, recipe, range(max(counts)))
    results: list[Result] = []
    for name, make, grid in (
        ("SOURCE (L=3, EK-FAC)", lambda: sourcekit.SourceAttributor(n_segments=3), SOURCE_GRID),
        ("exact unrolling", lambda: sourcekit.UnrolledAttributor(), None),
    ):
        sourcekit.base.clear_state_cache()
        members = []
        for run in runs:
            fitted, fit_seconds = timed(lambda run=run, make=make: make().fit(run))
            per_damping, seconds = timed(
                lambda fitted=fitted, grid=grid: scores_at(fitted, grid, "damping", queries)
            )
            members.append((per_damping, fit_seconds, seconds))
        for count in counts:
            chosen_members = members[:count]
            per_damping = [
                np.mean([m[0][i].astype(np.float64) for m in chosen_members], axis=0)
                for i in range(len(chosen_members[0][0]))
            ]
            scores, chosen = choose(per_damping, grid, masks, y)
            fit_seconds = sum(m[1] for m in chosen_members)
            total = fit_seconds + sum(m[2] for m in chosen_members)
            label = f"{name}, {count} run{'s' if count > 1 else ''}"
            results.append((label, scores, chosen, fit_seconds, total))
    return results


def fisher_rows() -> list[tuple[str, Callable[[], Any], list[float]]]:
    """SOURCE and EK-FAC influence with each Fisher (two seeds of the sampled one)."""
    rows = []
    for name, cls, grid, extra in (
        ("SOURCE (L=3, EK-FAC)", sourcekit.SourceAttributor, SOURCE_GRID, {"n_segments": 3}),
        ("influence (EK-FAC)", sourcekit.InfluenceAttributor, GRID, {}),
    ):
        for fisher, seed in (("true", 0), ("true", 1), ("expected", 0), ("empirical", 0)):
            label = f"{fisher}, seed {seed}" if fisher == "true" else fisher

            def make(
                cls: Any = cls, fisher: str = fisher, seed: int = seed, extra: dict = extra
            ) -> Any:
                return cls(fisher=fisher, random_state=seed, **extra)

            rows.append((f"{name}, fisher {label}", make, grid))
    return rows


def fisher_costs(task: Any, recipes: list[str], repeats: int) -> None:
    """The time of fitting each Fisher's state, interleaved, median of ``repeats``."""
    import statistics

    entries = [(name, make) for name, make, _ in fisher_rows() if "seed 1" not in name]
    print(f"fit seconds from an empty state cache, median of {repeats} interleaved repeats")
    for recipe in recipes:
        trajectory = task.record(recipe, progress=False)
        seconds: dict[str, list[float]] = {name: [] for name, _ in entries}
        for _ in range(repeats):
            for name, make in entries:
                sourcekit.base.clear_state_cache()
                seconds[name].append(timed(lambda make=make, run=trajectory: make().fit(run))[1])
        for name, _ in entries:
            median = statistics.median(seconds[name])
            true = statistics.median(seconds[name.split(", fisher")[0] + ", fisher true, seed 0"])
            print(f"{recipe:<10} {name:<44} {median:7.2f} s  {median / true:5.1f} x true")


def shifted_spectrum(model: Any) -> np.ndarray:
    """The eigenvalues of the matrix a segment's damping shifts: H̄ + λ_c under SGD (its
    coupled decay), the preconditioned K̄ under Adam and AdamW."""
    if model.adam is not None:
        curvature, decay = model.adam.curvature, 0.0
    else:
        curvature, decay = model.curvature, model.weight_decay
    if isinstance(curvature, sourcekit.curvature.DenseCurvature):
        values = curvature.eigenvalues
    else:
        values = torch.cat(
            [curvature.factors[b.name].eigenvalues.reshape(-1) for b in curvature.blocks]
        )
    return values.double().cpu().numpy() + decay


def damping_table(
    recipe: str, curvatures: list[str], trajectory: Any, queries: Any, masks: Any, y: Any
) -> None:
    """SOURCE's LDS over ``DAMPING_GRID`` and at ``damping="auto"``, per curvature kind."""
    for kind in curvatures:
        sourcekit.base.clear_state_cache()
        source, seconds = timed(
            lambda kind=kind: sourcekit.SourceAttributor(n_segments=3, curvature=kind).fit(
                trajectory
            )
        )
        values = [
            linear_datamodeling_score(scores, masks, y, random_state=0).mean
            for scores in scores_at(source, DAMPING_GRID, "damping", queries)
        ]
        automatic = linear_datamodeling_score(
            source.set_params(damping="auto").transform(queries), masks, y, random_state=0
        ).mean
        best = max(values)
        at = [f"{d:g}" for d, v in zip(DAMPING_GRID, values, strict=True) if v >= best - 5e-4]
        print(f"{recipe:<10} {kind:<6} fit {seconds:6.1f} s")
        print("  damping " + " ".join(f"{d:>6g}" for d in DAMPING_GRID))
        print("  LDS     " + " ".join(f"{v:>6.3f}" for v in values))
        print(
            f"  best {best:.3f} (at {', '.join(at)})   auto {automatic:.3f}   gap {best - automatic:.3f}"
        )
        for index, (model, used) in enumerate(
            zip(source.state_.segments, source.damping_, strict=True)
        ):
            ev = shifted_spectrum(model)
            rank = ev.sum() ** 2 / (ev**2).sum()
            print(
                f"  segment {index + 1}: s {model.lr_sum:8.3g}  m {ev.mean():8.3g}  median {np.median(ev):8.3g}"
                f"  largest {ev.max():8.3g}  effective rank {rank:6.1f} of {ev.size}   auto {used:8.3g}"
            )
        print(flush=True)


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
    parser.add_argument(
        "--table",
        choices=["methods", "ensembles", "fisher", "fisher-cost", "damping"],
        default="methods",
        help="every method (default), ensembles over runs, the Fisher of SOURCE and influence, "
        "the time of fitting each Fisher, or SOURCE's LDS over a grid of dampings against "
        '"auto"',
    )
    parser.add_argument(
        "--curvatures",
        nargs="+",
        default=["ekfac", "exact"],
        help="the curvatures of SOURCE (--table damping)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats (--table fisher-cost)"
    )
    parser.add_argument(
        "--runs", type=int, nargs="+", default=[1, 3, 5], help="ensemble sizes (--table ensembles)"
    )
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
    if args.table == "fisher-cost":
        fisher_costs(task, recipes, args.repeats)
        return
    rows = []
    correlations: dict[str, dict[str, float]] = {}
    scratch = tempfile.TemporaryDirectory()
    for recipe in recipes:
        trajectory, queries, masks, y, truth_seconds = ground_truth(task, recipe, args)
        if args.table == "damping":
            bound = trajectory.bind(queries)
            damping_table(recipe, args.curvatures, bound, bound, masks, y)
            continue
        if args.table == "ensembles":
            results = ensemble_results(task, recipe, queries, sorted(args.runs), masks, y)
        else:
            if args.table == "fisher":
                entries = fisher_rows()
            else:
                entries = [(name, make, grid) for name, (make, grid) in table.items()]
            variants = {None: trajectory.bind(queries)}
            results = []
            for name, make, grid in entries:
                if args.methods and not any(m in name for m in args.methods):
                    continue
                variant = WHOLE_EXAMPLE if name.endswith(WHOLE_EXAMPLE) else None
                if variant not in variants:
                    run = with_whole_example_fisher(trajectory, f"{scratch.name}/{recipe}")
                    variants[variant] = run.bind(queries)
                results.append(evaluate(name, make, grid, variants[variant], masks, y))
        recipe_scores = {name: scores for name, scores, *_ in results}
        for name, scores, chosen, fit_seconds, seconds in results:
            if args.methods and not any(m in name for m in args.methods):
                continue
            result = linear_datamodeling_score(scores, masks, y, random_state=0)
            rows.append((recipe, name, result, chosen, fit_seconds, seconds, truth_seconds))
            print(
                f"{recipe:<10} {name:<44} LDS {result.mean:+.3f} [{result.confidence_interval[0]:+.3f}, {result.confidence_interval[1]:+.3f}]  {seconds:6.1f} s",
                flush=True,
            )
        if args.table == "methods" and "exact unrolling" in recipe_scores:
            exact = recipe_scores["exact unrolling"]
            correlations[recipe] = {
                name: pearson_per_query(scores, exact)
                for name, scores in recipe_scores.items()
                if name != "exact unrolling"
            }

    if args.table == "damping":
        return
    print(
        f"\n{args.task} task, {args.queries} test queries, {args.subsets} subsets of {args.alpha:.0%} of the "
        f"training set, {args.seeds} seeds per subset; LDS mean over queries with a 95 % bootstrap interval\n"
    )
    print(
        f"{'recipe':<10} {'method':<44} {'LDS':>7} {'interval':>17}  {'damping chosen (5 folds)':<32} {'fit s':>7} {'time s':>7}"
    )
    for recipe, name, result, chosen, fit_seconds, seconds, _ in rows:
        damping = ", ".join(f"{d:g}" for d in chosen) if chosen else "-"
        print(
            f"{recipe:<10} {name:<44} {result.mean:>+7.3f} [{result.confidence_interval[0]:+.3f}, {result.confidence_interval[1]:+.3f}]"
            f"  {damping:<32} {fit_seconds:>7.1f} {seconds:>7.1f}"
        )
    if correlations:
        print("\nper-query Pearson correlation with exact unrolling (mean over queries):")
        for recipe, values in correlations.items():
            for name, r in values.items():
                print(f"{recipe:<10} {name:<44} {r:+.3f}")
    print("\nground truth (retraining, cached after the first run):")
    for recipe in recipes:
        seconds = next(r[6] for r in rows if r[0] == recipe)
        print(f"  {recipe:<10} {seconds:6.1f} s")


if __name__ == "__main__":
    main()
