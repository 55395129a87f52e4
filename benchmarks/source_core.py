"""SOURCE's cost against its floor, and EK-FAC influence against kronfluence's.

Run:  python benchmarks/source_core.py [--queries 100] [--repeats 3] [--threads 1]

For the digits ``standard`` and ``early`` recipes, with 100 test queries, it prints:

(i)   SOURCE's total time (fit + transform) against its floor, C x (one forward and
      backward pass over the training set at one checkpoint), and against a second
      floor that adds the unavoidable score contraction, n_queries x n_train x
      n_params x C multiply-adds at the machine's measured matrix-multiply speed;
(ii)  sourcekit's InfluenceAttributor(curvature="ekfac", fisher="empirical") against
      kronfluence's EK-FAC influence on the same final model, data and damping (time
      ratio and Pearson correlation of the score matrices, after converting
      kronfluence's convention to sourcekit's: scores = −(1/N) x kronfluence's);
(iii) the peak resident memory of each, measured in a fresh process per method.

kronfluence is a peer for this benchmark only, never a dependency of sourcekit:
    pip install --no-deps kronfluence accelerate einconv einops opt-einsum safetensors pyyaml
Every method runs in its own subprocess, in the same order for each recipe; times are
the median of ``--repeats`` runs inside that process, after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

DAMPING = 1e-3


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_time(fn, repeats: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def child(method: str, recipe: str, n_queries: int, repeats: int, out: str) -> None:
    import torch

    import sourcekit
    from sourcekit._denormals import flushing_denormals
    from sourcekit.base import clear_state_cache

    task = sourcekit.datasets.load_digits_task()
    trajectory = task.record(recipe, progress=False)
    queries = task.test[:n_queries]
    baseline = _rss_mb()
    report: dict[str, object] = {"baseline_mb": baseline}

    if method == "floor":
        model = trajectory.build_model(trajectory.checkpoint_steps[0])

        def one_pass() -> None:
            for start in range(0, trajectory.n_train, 256):
                batch = trajectory.train[start : start + 256]
                model.zero_grad(set_to_none=True)
                trajectory.loss(model(batch.inputs), batch.targets).mean().backward()

        with flushing_denormals():  # as sourcekit computes (sourcekit._denormals)
            seconds, _ = _median_time(one_pass, max(repeats, 10))
        n_params = sum(p.numel() for p in model.parameters())
        a = torch.randn(n_queries, n_params)
        b = torch.randn(n_params, trajectory.n_train)
        gemm, _ = _median_time(lambda: a @ b, max(repeats, 10))
        report.update(
            seconds=seconds * len(trajectory.checkpoint_steps),
            contraction_seconds=gemm * len(trajectory.checkpoint_steps),
            n_checkpoints=len(trajectory.checkpoint_steps),
            n_params=n_params,
        )
    elif method in ("source", "influence"):

        def run() -> np.ndarray:
            clear_state_cache()
            if method == "source":
                attributor = sourcekit.SourceAttributor(
                    n_segments=3, damping=DAMPING, device="cpu"
                )
            else:
                attributor = sourcekit.InfluenceAttributor(
                    damping=DAMPING, curvature="ekfac", fisher="empirical", device="cpu"
                )
            return attributor.fit(trajectory).transform(queries)

        seconds, scores = _median_time(run, repeats)
        report["seconds"] = seconds
        np.save(out + ".npy", scores)
    elif method == "kronfluence":
        import logging

        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        logging.disable(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)
        wd = trajectory.stages[-1].optimizer.weight_decay

        class DigitsTask(Task):
            def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
                inputs, targets = batch
                logits = model(inputs)
                if sample:
                    with torch.no_grad():
                        targets = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)
                return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

            def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
                inputs, targets = batch
                return sourcekit.gradients.margin(model(inputs), targets).sum()

        train_set = torch.utils.data.TensorDataset(
            trajectory.train.inputs, trajectory.train.targets
        )
        query_set = torch.utils.data.TensorDataset(queries.inputs, queries.targets)
        workdir = tempfile.mkdtemp(prefix="kronfluence-")

        def run() -> np.ndarray:
            model = prepare_model(trajectory.build_model().eval(), DigitsTask())
            analyzer = Analyzer(
                "digits", model, DigitsTask(), cpu=True, disable_tqdm=True, output_dir=workdir
            )
            factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
            analyzer.fit_all_factors(
                "ekfac",
                train_set,
                per_device_batch_size=256,
                factor_args=factor_args,
                overwrite_output_dir=True,
            )
            # sourcekit adds the recorded weight decay to the eigenvalues; give kronfluence
            # the same total shift.
            score_args = ScoreArguments(damping_factor=DAMPING + wd)
            analyzer.compute_pairwise_scores(
                "scores",
                "ekfac",
                query_set,
                train_set,
                per_device_query_batch_size=n_queries,
                per_device_train_batch_size=256,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            scores = analyzer.load_pairwise_scores("scores")["all_modules"].numpy()
            return -scores / trajectory.n_train  # to sourcekit's sign and scale

        seconds, scores = _median_time(run, repeats)
        report["seconds"] = seconds
        np.save(out + ".npy", scores)
    report["peak_mb"] = _rss_mb()
    with open(out + ".json", "w") as fh:
        json.dump(report, fh)


def measure(method: str, recipe: str, args: argparse.Namespace, workdir: str) -> dict:
    out = os.path.join(workdir, f"{method}-{recipe}")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            method,
            recipe,
            str(args.queries),
            str(args.repeats),
            out,
        ],
        check=True,
        env=env,
    )
    with open(out + ".json") as fh:
        report = json.load(fh)
    if os.path.exists(out + ".npy"):
        report["scores"] = np.load(out + ".npy")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in every process (default 1)"
    )
    parser.add_argument("--recipes", nargs="+", default=["standard", "early"])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, recipe, n_queries, repeats, out = args.child
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        child(method, recipe, int(n_queries), int(repeats), out)
        return
    try:
        import kronfluence  # noqa: F401

        peers = ["kronfluence"]
    except ImportError:
        peers = []
        print("kronfluence is not installed: the peer comparison (ii) is skipped.\n")
    workdir = tempfile.mkdtemp(prefix="sourcekit-bench-")
    rows = []
    for recipe in args.recipes:
        results = {
            m: measure(m, recipe, args, workdir) for m in ["floor", "source", "influence", *peers]
        }
        rows.append((recipe, results))
    print(
        f"digits task, {args.queries} queries, torch threads {args.threads}, median of {args.repeats} runs\n"
    )
    print("(i) SOURCE (n_segments=3, EK-FAC, true Fisher) against its floor")
    print(
        f"{'recipe':<10}{'C':>3}{'floor s':>10}{'+contract s':>13}{'SOURCE s':>10}{'/floor':>8}{'/(floor+contract)':>19}"
    )
    for recipe, r in rows:
        floor, source = r["floor"], r["source"]
        both = floor["seconds"] + floor["contraction_seconds"]
        print(
            f"{recipe:<10}{floor['n_checkpoints']:>3}{floor['seconds']:>10.4f}{both:>13.4f}"
            f"{source['seconds']:>10.4f}{source['seconds'] / floor['seconds']:>8.1f}{source['seconds'] / both:>19.2f}"
        )
    if peers:
        print(
            "\n(ii) EK-FAC influence (empirical Fisher, damping 1e-3 + weight decay): sourcekit vs kronfluence"
        )
        print(
            f"{'recipe':<10}{'sourcekit s':>12}{'kronfluence s':>15}{'time ratio':>12}{'Pearson':>9}"
        )
        for recipe, r in rows:
            ours, peer = r["influence"], r["kronfluence"]
            pearson = np.corrcoef(ours["scores"].ravel(), peer["scores"].ravel())[0, 1]
            print(
                f"{recipe:<10}{ours['seconds']:>12.4f}{peer['seconds']:>15.4f}"
                f"{ours['seconds'] / peer['seconds']:>12.2f}{pearson:>9.4f}"
            )
    print(
        "\n(iii) peak resident memory of the measuring process, MB (baseline: after loading and recording)"
    )
    methods = ["floor", "source", "influence", *peers]
    print(f"{'recipe':<10}" + "".join(f"{m:>14}" for m in methods))
    for recipe, r in rows:
        print(
            f"{recipe:<10}"
            + "".join(
                f"{r[m]['peak_mb']:>8.0f} ({r[m]['peak_mb'] - r[m]['baseline_mb']:+.0f})"
                for m in methods
            )
        )


if __name__ == "__main__":
    main()
