"""Scores from low-precision gradient passes (``gradient_dtype``) against float64 scores.

Run:  python benchmarks/precision.py [--queries 20] [--n-train 512] [--threads 1]
                                     [--workloads digits conv transformer] [--device auto]

For the digits MLP (``standard`` recipe) and the two workloads of ``benchmarks/scale.py``
(a ResNet-9-style conv net and a small transformer language model, CPU sizes with
``--n-train`` training examples), SOURCE (n_segments=3, EK-FAC) and EK-FAC influence are
fitted with every pass in float64 (``dtype="float64"``: the reference), then with the
default float32 and with ``gradient_dtype`` "bfloat16" and "float16" (curvature,
preconditioning and scores in float32). For each it prints the Pearson correlation of
all scores with the reference and the largest error relative to the score scale,
max |τ − τ₆₄| / max |τ₆₄|, and the time of fit + transform. The row "64, seed 1" is
float64 passes with other sampled Fisher targets (``random_state=1``): the method's own
noise, the scale against which to read the others (a pass in another precision moves
the logits, and with them some of the sampled targets).

On a CPU, bfloat16 and float16 save memory (the passes and the factor cache take half)
but little time: the speed comes from GPUs' half-precision matrix units.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import workloads

import sourcekit
from sourcekit._device import resolve_device
from sourcekit.base import clear_state_cache

PRECISIONS = ("float32", "bfloat16", "float16")


def cases(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """(name, trajectory, queries, modules) of each workload asked for."""
    for kind in args.workloads:
        if kind == "digits":
            task = sourcekit.datasets.load_digits_task()
            yield (
                "digits MLP",
                task.record("standard", progress=False),
                task.test[: args.queries],
                None,
            )
        else:
            w = workloads.build(kind, "cpu", args.queries, n_train=args.n_train)
            yield w.name, w.trajectory, w.queries, w.modules


def scores(cls: type, trajectory, queries, device, **params) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    clear_state_cache()
    start = time.perf_counter()
    attributor = cls(device=device, **params).fit(trajectory)
    out = attributor.transform(queries)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=["digits", "conv", "transformer"],
        default=["digits", "conv", "transformer"],
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    methods = {
        "SOURCE": (sourcekit.SourceAttributor, {"n_segments": 3, "damping": 1e-3}),
        "influence": (sourcekit.InfluenceAttributor, {"damping": 1e-3}),
    }
    print(
        f"Agreement with float64 passes, {args.queries} queries, {device}, torch threads "
        f"{args.threads}; max err = max |τ − τ64| / max |τ64|\n"
    )
    print(
        f"{'workload':<13}{'method':<11}{'gradient_dtype':<16}{'Pearson':>10}{'max err':>10}"
        f"{'time s':>8}{'float64 s':>11}"
    )
    for name, trajectory, queries, modules in cases(args):
        for method, (cls, params) in methods.items():
            params = {**params, "modules": modules}
            reference, ref_s = scores(cls, trajectory, queries, device, dtype="float64", **params)
            scale = float(np.abs(reference).max())
            # The method's own noise, for scale: float64 passes with other sampled Fisher
            # targets (random_state=1). The sampled targets follow the logits, so passes
            # in another precision also draw some targets differently.
            other, other_s = scores(
                cls, trajectory, queries, device, dtype="float64", random_state=1, **params
            )
            pearson = np.corrcoef(other.ravel(), reference.ravel())[0, 1]
            error = float(np.abs(other - reference).max()) / scale
            print(
                f"{name:<13}{method:<11}{'64, seed 1':<16}{pearson:>10.6f}{error:>10.2e}"
                f"{other_s:>8.1f}{ref_s:>11.1f}"
            )
            for precision in PRECISIONS:
                gradient_dtype = None if precision == "float32" else precision
                got, seconds = scores(
                    cls, trajectory, queries, device, gradient_dtype=gradient_dtype, **params
                )
                pearson = np.corrcoef(got.ravel(), reference.ravel())[0, 1]
                error = float(np.abs(got - reference).max()) / scale
                print(
                    f"{name:<13}{method:<11}{precision:<16}{pearson:>10.6f}{error:>10.2e}"
                    f"{seconds:>8.1f}{ref_s:>11.1f}"
                )


if __name__ == "__main__":
    main()
