"""Checksums of every attributor's scores, to show that a change of the code moves no score.

Run:  python benchmarks/score_checksums.py [--quick] [--threads 1] > checksums.txt

For every attributor and setting below (SOURCE with every curvature kind and Fisher
option, both matrix functions, ``average_checkpoints`` and ``query_rank``; influence
functions; TracIn; TRAK; gradient and representation similarity; exact unrolling), on
tiny recorded runs of the shared test cases (SGD, momentum, Adam, AdamW, two stages)
and on the digits task's ``early`` recipe with a few test queries, it prints one line:
the case, the setting, and of the score matrix taken in float64 the sum, the sum of
squares, a sha256 of its exact bytes and a sha256 of the scores rounded to 9
significant digits of the matrix's largest magnitude.

Run it before and after a change and compare the two outputs with ``diff``: identical
exact hashes mean bit-identical scores; where only the exact hash differs, the scores
moved by rounding alone (less than 5e-10 of the score scale); the sums then say by how
much. Every run is seeded and uses the CPU with a fixed number of threads (``--threads``,
default 1), so two runs of the same code print the same lines. ``--quick`` leaves out
the digits task (about a minute instead of several).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

import sourcekit
from sourcekit.base import clear_state_cache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import _cases  # the shared tiny runs (the repository root is on the path)

TINY_CASES = ("mlp_sgd", "mlp_momentum", "mlp_adam", "mlp_adamw", "mlp_two_stage")
KINDS = ("ekfac", "kfac", "diagonal", "identity", "exact", "hessian")
FISHERS = ("true", "empirical", "expected")


def settings(digits: bool) -> Iterator[tuple[type, dict[str, Any]]]:
    """(attributor class, parameters) of every setting checked on one case."""
    source = sourcekit.SourceAttributor
    # The dense Hessian of the digits MLP (3.5k parameters) takes minutes: tiny cases only.
    kinds = [k for k in KINDS if not (digits and k == "hessian")]
    for kind in kinds:
        fishers = FISHERS if kind not in ("exact", "hessian") else ("true",)
        for fisher in fishers:
            yield source, {"curvature": kind, "fisher": fisher}
    yield source, {"matrix_function": "discrete"}
    yield source, {"matrix_function": "discrete", "curvature": "exact"}
    yield source, {"average_checkpoints": True}
    yield source, {"query_rank": 1}
    yield source, {"n_segments": 2, "damping": 1e-2}
    yield source, {"dtype": "float64"}
    yield source, {"curvature_examples": 5}
    for kind in kinds:
        yield sourcekit.InfluenceAttributor, {"curvature": kind}
    yield sourcekit.InfluenceAttributor, {"damping": 1e-2, "fisher": "empirical"}
    yield sourcekit.InfluenceAttributor, {"query_rank": 1, "dtype": "float64"}
    yield sourcekit.TracInAttributor, {}
    yield sourcekit.TracInAttributor, {"momentum_correction": False}
    yield sourcekit.TRAKAttributor, {"projection_dim": 16}
    yield sourcekit.TRAKAttributor, {"projection_dim": 16, "checkpoints": "all"}
    yield sourcekit.TRAKAttributor, {"projection": "rademacher", "damping": 0.1}
    yield sourcekit.GradientSimilarityAttributor, {}
    yield sourcekit.GradientSimilarityAttributor, {"similarity": "cosine"}
    yield sourcekit.RepresentationSimilarityAttributor, {}
    yield sourcekit.RepresentationSimilarityAttributor, {"similarity": "dot"}
    yield sourcekit.UnrolledAttributor, {}


def checksum(scores: np.ndarray) -> str:
    values = np.ascontiguousarray(scores, dtype=np.float64)
    scale = float(np.abs(values).max()) if values.size else 0.0
    quantum = scale * 1e-9 if scale > 0 else 1.0
    rounded = np.round(values / quantum).astype(np.int64)
    return (
        f"sum {values.sum():+.17e}  sumsq {(values**2).sum():.17e}  "
        f"exact {hashlib.sha256(values.tobytes()).hexdigest()[:16]}  "
        f"rounded {hashlib.sha256(rounded.tobytes()).hexdigest()[:16]}"
    )


def describe(cls: type, params: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
    return f"{cls.__name__}({shown})"


def cases(quick: bool) -> Iterator[tuple[str, sourcekit.Trajectory, sourcekit.Examples, bool]]:
    for name in TINY_CASES:
        yield name, _cases.trajectory(name), _cases.queries(name, 5), False
    if not quick:
        task = sourcekit.datasets.load_digits_task()
        yield "digits early", task.record("early", progress=False), task.test[:4], True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny cases only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    for name, trajectory, queries, digits in cases(args.quick):
        for cls, params in settings(digits):
            clear_state_cache()
            options = {"device": "cpu", **params}
            if "progress" in cls().get_params():
                options["progress"] = False
            scores = cls(**options).fit(trajectory).transform(queries)
            print(f"{name:<14} {describe(cls, params):<78} {checksum(scores)}", flush=True)
    print(f"# {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
