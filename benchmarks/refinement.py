"""Refining EK-FAC with exact Gauss-Newton products (``refine_steps``): LDS, agreement, time.

Run:  python benchmarks/refinement.py lds [--recipes standard early two_stage] [--queries 100]
                                          [--settings 2:512 3:512 2:512:0.25:32 2:512:0.25:all
                                                      3:512:1 4:all:1:all]
                                          [--repeats 3] [--random-state 0] [--runs 1]
      python benchmarks/refinement.py blend [--recipes standard two_stage] [--examples 128 256]
                                            [--weights 1 0.75 0.5 0.25]
      python benchmarks/refinement.py scale [--scale cpu] [--queries 100]
                                            [--workloads conv transformer]
                                            [--settings 2:N/8 4:N/8] [--reference 16]

``lds``: on the digits recipes, SOURCE (3 segments, damping 1e-3, the defaults
otherwise) with EK-FAC (the default), with ``curvature="exact"`` (the dense
Gauss-Newton matrix) and refined (``refine_steps=k``, ``refine_examples=m``,
``refine_weight=w``, ``refine_rank=r``, written ``k:m:w:r``, ``k:m:w`` or ``k:m`` for
the defaults; m = ``all`` takes every example at every checkpoint, r = ``all`` starts
from every query, and ``k:all:1:all`` is the plain refinement towards exact curvature; ``--random-state`` seeds the refined settings: their
EK-FAC fit's Fisher targets and their draw of pairs). For each it prints the LDS against
retraining on ``--subsets`` random halves with ``--seeds`` seeds (the ground truth of
``benchmarks/evaluate_lds.py``, read from the same cache), the fraction of the LDS gap
between EK-FAC and exact curvature that it closes, (LDS − LDS_EK-FAC) / (LDS_exact −
LDS_EK-FAC), the mean over queries of the Pearson correlation of its scores with those
of exact curvature, and its time (fit + transform from an empty state cache) and the
ratio to the default's. The damping is fixed at 1e-3 rather than chosen per
fold, so that every row is one fit and one transform. The times of EK-FAC and of the
refined settings are the best of ``--repeats`` runs, interleaved; exact curvature is
timed once, and its scores and time are kept under ``--cache`` (a rerun reads them). With ``--influence`` the same rows for ``InfluenceAttributor``
(damping 1e-3). With ``--runs R`` every method scores the mean of its scores on R runs
of the recipe (run r trained with ``random_state=r``, the runs of
``benchmarks/evaluate_lds.py --table ensembles``, what ``EnsembleAttributor`` averages)
and its time is the sum over the runs.

``blend``: what the blend A = (1 − w) B + w H̃ of ``refine_weight`` is worth without
the Krylov error: on the digits recipes, SOURCE (3 segments, damping 1e-3) with each
segment's curvature replaced by the dense matrix A, B the EK-FAC fit on all examples and
H̃ the dense exact Gauss-Newton matrix of ``--examples`` m examples at every checkpoint
of the segment (``curvature="exact"`` with ``curvature_examples=m``); the LDS and the
gap closed as in ``lds``, for each weight w (w = 1 is H̃ alone). Each row
eigendecomposes three P × P matrices (about a minute on the digits MLP).

``scale``: on the conv net and the transformer of ``benchmarks/scale.py`` (the same
training recipes and sizes), SOURCE's time with the defaults and refined at ``--settings``
(``k:m``, m a number of examples or N/d, a fraction of the training set), against the
floor of ``benchmarks/scale.py`` (C forward and backward passes over the training set),
and the Pearson correlation (mean over queries) of each one's scores with those of a
long refinement (``--reference`` steps over the same curvature subset as the first
setting, with the same pairs and weight); the transformer, trained with AdamW, takes the
refinement of SOURCE's Adam form. Everything runs in this one process, one setting after
the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from typing import Any

import numpy as np
import torch

import sourcekit
from sourcekit.evaluation import linear_datamodeling_score


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over queries (rows) of the Pearson correlation of two score matrices."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return float(np.mean(num / np.where(den == 0, 1.0, den)))


def parse_setting(text: str, n_train: int) -> dict[str, Any]:
    """``k:m``, ``k:m:w`` or ``k:m:w:r`` -> the refinement's parameters; m is a number,
    ``N/d`` or ``all``, r a number or ``all`` (every query)."""
    steps, examples, *weight = text.split(":")
    settings: dict[str, Any] = {"refine_steps": int(steps)}
    if examples == "all":
        settings["refine_examples"] = None
    elif examples.startswith("N/"):
        settings["refine_examples"] = n_train // int(examples[2:])
    else:
        settings["refine_examples"] = int(examples)
    if weight:
        settings["refine_weight"] = float(weight[0])
    if len(weight) > 1:
        settings["refine_rank"] = None if weight[1] == "all" else int(weight[1])
    return settings


def setting_name(settings: dict[str, Any]) -> str:
    m = settings["refine_examples"]
    w = settings.get("refine_weight")
    name = f"refined k={settings['refine_steps']}, m={'all' if m is None else m}" + (
        "" if w is None else f", w={w:g}"
    )
    if "refine_rank" in settings:
        r = settings["refine_rank"]
        name += f", r={'all' if r is None else r}"
    return name


def timed(make: Any, trajectory: sourcekit.Trajectory, queries: Any) -> tuple[np.ndarray, float]:
    """Scores and seconds of fit + transform from an empty state cache."""
    sourcekit.base.clear_state_cache()
    start = time.perf_counter()
    scores = make().fit(trajectory).transform(queries)
    return scores, time.perf_counter() - start


def exact_scores(
    cache: str, key: str, make: Any, trajectory: sourcekit.Trajectory, queries: Any
) -> tuple[np.ndarray, float]:
    """Scores and seconds of ``curvature="exact"``, kept under ``cache`` (minutes each)."""
    path = os.path.join(cache, f"exact-curvature-{key}.npz")
    if os.path.exists(path):
        saved = np.load(path)
        return saved["scores"], float(saved["seconds"])
    scores, seconds = timed(lambda: make(curvature="exact"), trajectory, queries)
    os.makedirs(cache, exist_ok=True)
    np.savez(path, scores=scores, seconds=seconds)
    return scores, seconds


def digits_recipe(
    task: Any, recipe: str, args: argparse.Namespace
) -> tuple[sourcekit.Trajectory, Any, np.ndarray, np.ndarray]:
    """A digits recipe's run, its queries, and the LDS ground truth (masks, retrained
    outputs) of ``benchmarks/evaluate_lds.py``, read from its cache."""
    import evaluate_lds

    trajectory, queries, masks, truth, _ = evaluate_lds.ground_truth(
        task, recipe, args, progress=False
    )
    return trajectory, queries, masks, truth


def run_lds(args: argparse.Namespace) -> None:
    import evaluate_lds

    task = sourcekit.datasets.load_digits_task()
    families = {
        "SOURCE": lambda **kw: sourcekit.SourceAttributor(n_segments=3, damping=1e-3, **kw)
    }
    if args.influence:
        families["influence"] = lambda **kw: sourcekit.InfluenceAttributor(damping=1e-3, **kw)
    rows = []
    for recipe in args.recipes:
        trajectory, queries, masks, truth = digits_recipe(task, recipe, args)
        runs = [trajectory, *evaluate_lds.record_runs(task, recipe, range(1, args.runs))]
        for family, make in families.items():
            settings = {"EK-FAC": {}}
            for text in args.settings:
                refine = parse_setting(text, trajectory.n_train)
                settings[setting_name(refine)] = {**refine, "random_state": args.random_state}
            # each run's scores and best time; a row scores their mean and sums the times
            per_run: dict[str, list[np.ndarray]] = {name: [] for name in [*settings, "exact"]}
            run_seconds: dict[str, list[float]] = {name: [] for name in per_run}
            for r, run in enumerate(runs):
                best = {name: np.inf for name in settings}
                latest: dict[str, np.ndarray] = {}
                for _ in range(args.repeats):  # interleaved, best of the repeats
                    for name, kw in settings.items():
                        latest[name], t = timed(functools.partial(make, **kw), run, queries)
                        best[name] = min(best[name], t)
                for name in settings:
                    per_run[name].append(latest[name])
                    run_seconds[name].append(best[name])
                key = f"{family}-{recipe}-{args.queries}" + (f"-run{r}" if r else "")
                exact, t = exact_scores(args.cache, key, make, run, queries)
                per_run["exact"].append(exact)
                run_seconds["exact"].append(t)
            scores = {name: np.mean(s, axis=0) for name, s in per_run.items()}
            seconds = {name: float(sum(t)) for name, t in run_seconds.items()}
            lds = {
                name: linear_datamodeling_score(s, masks, truth, random_state=0)
                for name, s in scores.items()
            }
            base, top = lds["EK-FAC"].mean, lds["exact"].mean
            for name in ["EK-FAC", "exact", *[n for n in settings if n != "EK-FAC"]]:
                result = lds[name]
                closed = (result.mean - base) / (top - base) if top != base else float("nan")
                rows.append(
                    (
                        recipe,
                        f"{family} {name}",
                        result,
                        closed,
                        pearson(scores[name], scores["exact"]),
                        seconds[name],
                        seconds[name] / seconds["EK-FAC"],
                    )
                )
                print(f"{recipe:<10} {family} {name:<26} LDS {result.mean:+.3f}", flush=True)
    print(
        f"\ndigits, {args.queries} test queries, {args.subsets} subsets, {args.seeds} seeds; "
        f"damping 1e-3; {args.runs} run(s) per recipe, scores averaged; times: fit + "
        f"transform, best of {args.repeats}, summed over the runs (exact: one run each)\n"
    )
    print(
        f"{'recipe':<10} {'method':<38} {'LDS':>7} {'interval':>17} {'gap closed':>11}"
        f" {'Pearson w/ exact':>17} {'time s':>8} {'x default':>10}"
    )
    for recipe, name, result, closed, corr, secs, ratio in rows:
        low, high = result.confidence_interval
        print(
            f"{recipe:<10} {name:<38} {result.mean:>+7.3f} [{low:+.3f}, {high:+.3f}]"
            f" {closed:>11.2f} {corr:>17.3f} {secs:>8.2f} {ratio:>10.2f}"
        )


def dense_fitted(curvature: Any) -> torch.Tensor:
    """A fitted eigenbasis curvature's matrix, block-diagonal, in the flat block layout."""
    blocks = []
    for b in curvature.blocks:
        f = curvature.factors[b.name]
        q = torch.kron(
            torch.eye(b.d_out, dtype=torch.float64) if f.q_s is None else f.q_s,
            torch.eye(b.d_in, dtype=torch.float64) if f.q_a is None else f.q_a,
        )
        blocks.append((q * f.eigenvalues.reshape(-1)) @ q.T)
    return torch.block_diag(*blocks)


def run_blend(args: argparse.Namespace) -> None:
    from sourcekit.curvature import DenseCurvature

    task = sourcekit.datasets.load_digits_task()
    print(f"{'recipe':<10} {'H~ examples':>11} {'w':>5} {'LDS':>7} {'gap closed':>11}")
    for recipe in args.recipes:
        trajectory, queries, masks, truth = digits_recipe(task, recipe, args)
        make = functools.partial(sourcekit.SourceAttributor, n_segments=3, damping=1e-3)
        fitted = make().fit(trajectory)
        base = linear_datamodeling_score(fitted.transform(queries), masks, truth, random_state=0)
        exact, _ = exact_scores(
            args.cache, f"SOURCE-{recipe}-{args.queries}", make, trajectory, queries
        )
        top = linear_datamodeling_score(exact, masks, truth, random_state=0).mean
        print(f"{recipe:<10} {'EK-FAC':>11} {'':>5} {base.mean:>+7.3f}; exact {top:+.3f}")
        fitted_b = [dense_fitted(m.curvature) for m in fitted.state_.segments]
        for m in args.examples:
            subset = make(curvature="exact", curvature_examples=m).fit(trajectory)
            for w in args.weights:
                blended = make().fit(trajectory)
                blended.state_.segments[:] = [
                    dataclasses.replace(
                        seg,
                        curvature=DenseCurvature(
                            "exact", seg.curvature.blocks, (1 - w) * b + w * h.curvature.matrix
                        ),
                    )
                    for seg, b, h in zip(
                        blended.state_.segments, fitted_b, subset.state_.segments, strict=True
                    )
                ]
                lds = linear_datamodeling_score(
                    blended.transform(queries), masks, truth, random_state=0
                ).mean
                closed = (lds - base.mean) / (top - base.mean)
                print(f"{recipe:<10} {m:>11} {w:>5g} {lds:>+7.3f} {closed:>11.2f}", flush=True)


def run_scale(args: argparse.Namespace) -> None:
    import scale
    import workloads

    torch.set_num_threads(args.threads)
    print(
        f"{'workload':<13} {'setting':<24} {'time s':>8} {'/ floor':>8} {'/ default':>10}"
        f" {'Pearson w/ long':>16}"
    )
    for kind in args.workloads:
        workload = workloads.build(kind, args.scale, args.queries)
        trajectory, queries = workload.trajectory, workload.queries[: args.queries]
        floor = scale.measure_floor(trajectory, torch.device("cpu"))
        n = trajectory.n_train
        settings = [parse_setting(text, n) for text in args.settings]

        make = functools.partial(
            sourcekit.SourceAttributor, n_segments=3, modules=workload.modules
        )

        results: dict[str, tuple[np.ndarray, float]] = {
            "default": timed(make, trajectory, queries)
        }
        for refine in settings:
            results[setting_name(refine)] = timed(
                functools.partial(make, **refine), trajectory, queries
            )
        reference = {**settings[0], "refine_steps": args.reference}
        name = "long: " + setting_name(reference).removeprefix("refined ")
        results[name] = timed(functools.partial(make, **reference), trajectory, queries)
        long = results[name][0]
        print(
            workloads.describe(workload),
            f"; floor {floor['floor_s']:.2f} s",
            flush=True,
        )
        for name, (scores, secs) in results.items():
            print(
                f"{workload.name:<13} {name:<24} {secs:>8.2f} {secs / floor['floor_s']:>8.2f}"
                f" {secs / results['default'][1]:>10.2f} {pearson(scores, long):>16.4f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    lds = sub.add_parser("lds")
    lds.add_argument("--recipes", nargs="+", default=["standard", "early", "two_stage"])
    lds.add_argument("--queries", type=int, default=100)
    lds.add_argument("--subsets", type=int, default=100)
    lds.add_argument("--seeds", type=int, default=3)
    lds.add_argument("--n-jobs", type=int, default=2)
    lds.add_argument("--cache", default=".cache/sourcekit-lds")
    lds.add_argument(
        "--settings",
        nargs="+",
        default=["2:512", "3:512", "2:512:0.25:32", "2:512:0.25:all", "3:512:1", "4:all:1:all"],
    )
    lds.add_argument(
        "--random-state", type=int, default=0, help="seed of the refined settings' pairs"
    )
    lds.add_argument("--repeats", type=int, default=3)
    lds.add_argument("--influence", action="store_true")
    lds.add_argument(
        "--runs", type=int, default=1, help="score the mean over this many runs of each recipe"
    )
    blend = sub.add_parser("blend")
    blend.add_argument("--recipes", nargs="+", default=["standard", "two_stage"])
    blend.add_argument("--examples", type=int, nargs="+", default=[128, 256])
    blend.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    for name, default in [("--queries", 100), ("--subsets", 100), ("--seeds", 3), ("--n-jobs", 2)]:
        blend.add_argument(name, type=int, default=default)
    blend.add_argument("--cache", default=".cache/sourcekit-lds")
    big = sub.add_parser("scale")
    big.add_argument("--scale", default="cpu")
    big.add_argument("--queries", type=int, default=100)
    big.add_argument("--workloads", nargs="+", default=["conv", "transformer"])
    big.add_argument("--settings", nargs="+", default=["2:N/8", "4:N/8"])
    big.add_argument("--reference", type=int, default=16)
    big.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.part == "lds":
        torch.set_num_threads(1)
        run_lds(args)
    elif args.part == "blend":
        torch.set_num_threads(1)
        run_blend(args)
    else:
        run_scale(args)


if __name__ == "__main__":
    main()
