"""The ``sourcekit`` command (also ``python -m sourcekit``).

``sourcekit demo`` trains a recipe of the embedded digits task, records it, and prints
the strongest proponents and opponents of a few test digits by exact unrolling.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

__all__ = ["main"]


def _top_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(scores, kind="stable")
    return order[::-1][:k], order[:k]


def _demo(args: argparse.Namespace) -> int:
    from .datasets import RECIPES, load_digits_task
    from .estimators import UnrolledAttributor

    if args.recipe not in RECIPES:
        print(
            f"sourcekit demo: unknown recipe {args.recipe!r}; choose from {', '.join(RECIPES)}.",
            file=sys.stderr,
        )
        return 2
    task = load_digits_task()
    progress = not args.quiet
    started = time.perf_counter()
    trajectory = task.record(args.recipe, random_state=args.seed, progress=progress)
    print(trajectory.summary())
    model = trajectory.build_model().eval()
    queries = task.test[: args.queries]
    predictions = model(queries.inputs).argmax(dim=1).tolist()
    attributor = UnrolledAttributor(progress=progress).fit(trajectory)
    scores = attributor.transform(queries)
    labels = task.train.targets.numpy()
    print(
        "\nScores: exact unrolling. scores[q, m] is the first-order change of the query's margin "
        "caused by including training example m (positive: a proponent)."
    )
    for q in range(len(queries)):
        true = int(queries.targets[q])
        print(
            f"\nTest digit {q}: label {true}, predicted {predictions[q]}, margin change from all training "
            f"examples {scores[q].sum():+.4f}"
        )
        proponents, opponents = _top_rows(scores[q], args.top)
        for title, rows in (("proponents", proponents), ("opponents", opponents)):
            items = ", ".join(f"#{m} (label {labels[m]}) {scores[q, m]:+.2e}" for m in rows)
            print(f"  top {args.top} {title}: {items}")
    print(f"\nDone in {time.perf_counter() - started:.1f} s.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sourcekit",
        description="Training data attribution for PyTorch: which training examples pushed a prediction up or down.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a digits classifier, record it, and attribute a few test predictions",
        description=(
            "Train the embedded digits task (scikit-learn's 8x8 digits, a small MLP) with a recipe, "
            "record the run, and print each query digit's strongest proponents and opponents among "
            "the training digits, computed exactly by differentiating through the recorded run."
        ),
    )
    demo.add_argument(
        "--recipe",
        default="standard",
        help="training recipe: standard, early or two_stage (default: standard)",
    )
    demo.add_argument(
        "--queries", type=int, default=3, help="number of test digits to attribute (default: 3)"
    )
    demo.add_argument(
        "--top",
        type=int,
        default=5,
        help="proponents and opponents to list per query (default: 5)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the training run (default: 0)")
    demo.add_argument("--quiet", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    for name in ("queries", "top"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be at least 1; got {getattr(args, name)}")
    return int(args.handler(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
