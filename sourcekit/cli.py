"""The ``sourcekit`` command (also ``python -m sourcekit``).

- ``sourcekit demo``: train the embedded digits task, record it, attribute a few test
  digits with SOURCE, the influence function and exact unrolling, draw a figure, and
  (``--evaluate``) compare methods by their linear datamodeling score.
- ``sourcekit attribute DIR --queries FILE --method ...``: score queries against a saved
  trajectory and write the (n_queries, n_train) matrix to a ``.npy`` file.
- ``sourcekit info DIR``: summarise a saved trajectory, after verifying its files.

Each command is a thin layer over the library; errors from it are printed as one line
and the command exits with status 2. The options of ``attribute`` that set an
attributor's parameters are derived from the attributors themselves (:data:`METHODS`,
:data:`OPTIONS`): which methods take an option, its type, its choices and its defaults
come from their parameters and constraint tables, and an option the chosen method does
not take is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._validation import InstanceOf, Interval, Options, validate_parameters
from .base import BaseAttributor
from .estimators import (
    InfluenceAttributor,
    SourceAttributor,
    TracInAttributor,
    TRAKAttributor,
    UnrolledAttributor,
)
from .estimators._source import DEFAULT_SEGMENTS

__all__ = ["METHODS", "OPTIONS", "build_parser", "main"]

METHODS: dict[str, type[BaseAttributor]] = {
    "source": SourceAttributor,
    "influence": InfluenceAttributor,
    "tracin": TracInAttributor,
    "trak": TRAKAttributor,
    "unrolled": UnrolledAttributor,
}
"""The methods of ``sourcekit attribute``, by the name ``--method`` takes."""

OPTIONS: dict[str, tuple[str, str]] = {
    "damping": ("damping added to the curvature's eigenvalues", "the method's heuristic"),
    "n_segments": ("number of segments of the run", str(DEFAULT_SEGMENTS)),
    "curvature": ("the curvature approximation", ""),
    "fisher": ("targets of the curvature's output gradients", ""),
    "curvature_examples": (
        "estimate the curvature from this many training examples per stage, a seeded "
        "random subset",
        "all of them",
    ),
    "refine_steps": (
        "refine the fitted curvature with this many Krylov steps of exact Gauss-Newton "
        "products (0: off)",
        "",
    ),
    "refine_examples": (
        "(checkpoint, example) pairs the refinement's exact products average over",
        "every example at every checkpoint",
    ),
    "refine_weight": ("the exact matrix's share of the refined curvature, in (0, 1]", ""),
    "refine_rank": (
        "query combinations that start the refinement's shared Krylov spaces",
        "every query",
    ),
    "average_checkpoints": (
        "SOURCE's fast variant: curvature and gradients once per segment, at the mean of "
        "its checkpoints' weights",
        "",
    ),
    "gradient_dtype": ("precision of the per-example gradient passes", "that of the scores"),
    "batch_size": ("training examples per batch while streaming the data", ""),
    "device": ("auto (CUDA when present), cpu or cuda", ""),
}
"""The attributor parameters ``sourcekit attribute`` exposes as options
(``--name-with-dashes``): what each means, and what its None default stands for. The
methods that take each, its type, its choices and its defaults come from the
attributors."""

# The size of ``demo --evaluate``'s ground truth: test queries, random halves, seeds.
QUICK_EVALUATION: dict[str, Any] = {"queries": 40, "subsets": 60, "seeds": (0, 1)}


def _top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")
    return order[:k], order[::-1][:k]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --- demo ------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    import sourcekit
    from sourcekit.datasets import RECIPES, load_digits_task

    if args.recipe not in RECIPES:
        print(
            f"sourcekit demo: unknown recipe {args.recipe!r}; choose from {', '.join(RECIPES)}.",
            file=sys.stderr,
        )
        return 2
    progress = not args.quiet
    started = time.perf_counter()
    task = load_digits_task()
    trajectory = task.record(args.recipe, random_state=args.seed, progress=progress)
    print(trajectory.summary())
    queries = task.test[: args.queries]
    predictions = trajectory.build_model().eval()(queries.inputs).argmax(dim=1).tolist()
    methods = {
        "SOURCE": sourcekit.SourceAttributor(n_segments=3, progress=progress),
        "influence": sourcekit.InfluenceAttributor(progress=progress),
        "exact unrolling": sourcekit.UnrolledAttributor(progress=progress),
    }
    scores = {name: est.fit(trajectory).transform(queries) for name, est in methods.items()}
    labels = task.train.targets.numpy()
    print(
        "\nscores[q, m]: first-order change of the query's margin caused by including training "
        "example m (positive: a proponent). Listed: SOURCE's strongest proponents and opponents."
    )
    for q in range(len(queries)):
        print(
            f"\nTest digit {q}: label {int(queries.targets[q])}, predicted {predictions[q]}, margin "
            f"change from all training examples {scores['SOURCE'][q].sum():+.4f}"
        )
        proponents, opponents = _top(scores["SOURCE"][q], args.top)
        for title, rows in (("proponents", proponents), ("opponents", opponents)):
            items = ", ".join(
                f"#{m} (label {labels[m]}) {scores['SOURCE'][q, m]:+.2e}" for m in rows
            )
            print(f"  top {args.top} {title}: {items}")
        agreement = ", ".join(
            f"{name} {_pearson(scores[name][q], scores['exact unrolling'][q]):.2f}"
            for name in ("SOURCE", "influence")
        )
        print(f"  agreement with exact unrolling (Pearson over training examples): {agreement}")
    out = Path(args.out)
    if not args.no_figure:
        try:
            from .plotting import proponents_figure

            path = proponents_figure(
                task.test_images[: args.queries],
                task.train_images,
                scores["SOURCE"],
                out / "proponents.png",
                k=args.top,
                query_titles=[
                    f"label {int(queries.targets[q])}, pred {predictions[q]}"
                    for q in range(len(queries))
                ],
                train_labels=labels,
            )
            print(f"\nFigure: {path}")
        except ImportError as err:
            print(f"\nNo figure: {err}")
    if args.evaluate:
        _quick_evaluation(trajectory, task, out / "cache", progress)
    print(f"\nDone in {time.perf_counter() - started:.1f} s.")
    return 0


def _quick_evaluation(trajectory: Any, task: Any, cache: Path, progress: bool) -> None:
    import sourcekit
    from sourcekit.evaluation import (
        linear_datamodeling_score,
        make_subset_masks,
        retrain_measurements,
    )

    size = QUICK_EVALUATION
    queries = task.test[: size["queries"]]
    masks = make_subset_masks(trajectory.n_train, 0.5, size["subsets"], random_state=0)
    described = f"{size['queries']} queries, {size['subsets']} subsets, {len(size['seeds'])} seeds"
    print(
        f"\nQuick evaluation: retraining the recipe on random halves of the training set ({described})..."
    )
    truth = retrain_measurements(
        trajectory,
        queries,
        masks,
        seeds=size["seeds"],
        n_jobs=1,
        cache_dir=cache,
        progress=progress,
    )
    methods = {
        "SOURCE (default damping)": sourcekit.SourceAttributor(),
        "influence (heuristic damping)": sourcekit.InfluenceAttributor(),
        "TracIn": sourcekit.TracInAttributor(),
        "TRAK (k=512)": sourcekit.TRAKAttributor(),
        "gradient similarity": sourcekit.GradientSimilarityAttributor(),
        "exact unrolling": sourcekit.UnrolledAttributor(),
    }
    print(f"\n{'method':<30}{'LDS':>8}   95% interval")
    for name, attributor in methods.items():
        result = linear_datamodeling_score(
            attributor.fit(trajectory).transform(queries), masks, truth.outputs
        )
        low, high = result.confidence_interval or (float("nan"), float("nan"))
        print(f"{name:<30}{result.mean:>+8.3f}   [{low:+.3f}, {high:+.3f}]")
    print(f"(retrainings cached in {cache}; docs/benchmarks.md has the full comparison)")


# --- attribute and info ------------------------------------------------------------------
def _load_queries(path: Path) -> Any:
    import torch

    from sourcekit import Examples

    if not path.is_file():
        raise FileNotFoundError(f"The queries file {str(path)!r} does not exist.")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            missing = {"inputs", "targets"} - set(data.files)
            if missing:
                raise ValueError(
                    f"The queries file {str(path)!r} lacks the array(s) {sorted(missing)}; save it with "
                    "np.savez(path, inputs=..., targets=...)."
                )
            return Examples(data["inputs"], data["targets"])
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or not {"inputs", "targets"} <= set(data):
            raise ValueError(
                f"The queries file {str(path)!r} must hold a dict with 'inputs' and 'targets' tensors; "
                "save it with torch.save({'inputs': x, 'targets': y}, path)."
            )
        return Examples(data["inputs"], data["targets"])
    raise ValueError(
        f"The queries file {str(path)!r} must be a .npz (arrays 'inputs' and 'targets') or a .pt "
        "(a dict of those two tensors)."
    )


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _takes(name: str) -> list[str]:
    """The methods whose attributor has the parameter ``name``."""
    return [m for m, cls in METHODS.items() if name in cls._parameter_constraints]


def _argument(name: str) -> dict[str, Any]:
    """``add_argument`` keywords for parameter ``name``, from the attributors' constraints
    and defaults."""
    meaning, none = OPTIONS[name]
    methods = _takes(name)
    constraints = [c for m in methods for c in METHODS[m]._parameter_constraints[name]]
    groups: dict[str, list[str]] = {}
    for m in methods:
        value = METHODS[m]().get_params()[name]
        groups.setdefault(none if value is None else str(value), []).append(m)
    if len(groups) == 1:
        default = next(iter(groups))
    else:
        default = "; ".join(f"{v} for {', '.join(ms)}" for v, ms in groups.items())
    text = f"{meaning}; --method {', '.join(methods)}"
    if any(isinstance(c, InstanceOf) and c.types == (bool,) for c in constraints):
        return {"action": "store_true", "default": None, "help": text}
    text += f" (default: {default})"
    choices = [v for c in constraints if isinstance(c, Options) for v in c.values]
    intervals = [c for c in constraints if isinstance(c, Interval)]
    if choices and intervals:  # a number or a named value (SOURCE's damping="auto")
        kind, named = intervals[0].kind, list(dict.fromkeys(choices))

        def number_or_named(value: str) -> Any:
            return value if value in named else kind(value)

        number_or_named.__name__ = kind.__name__
        metavar = f"{kind.__name__.upper()}|{'|'.join(named)}"
        return {"type": number_or_named, "metavar": metavar, "default": None, "help": text}
    if choices:
        return {"choices": list(dict.fromkeys(choices)), "default": None, "help": text}
    return {"type": intervals[0].kind if intervals else str, "default": None, "help": text}


def _attributor(args: argparse.Namespace) -> BaseAttributor:
    """The attributor of ``--method`` with the options given (the others keep the
    attributor's defaults); an option the method does not take is an error."""
    cls = METHODS[args.method]
    params: dict[str, Any] = {}
    for name in OPTIONS:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in cls._parameter_constraints:
            raise ValueError(
                f"{_option(name)} does not apply to --method {args.method}; it applies to "
                f"--method {', '.join(_takes(name))}."
            )
        params[name] = value
    if "progress" in cls._parameter_constraints:
        params["progress"] = not args.quiet
    attributor = cls(**params)
    validate_parameters(attributor, cls._parameter_constraints)
    return attributor


def _output_path(out: str, overwrite: bool) -> Path:
    """The file ``np.save`` writes for ``out`` (it adds ``.npy``), refused if it exists."""
    path = Path(out)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"The output file {str(path)!r} already exists; sourcekit attribute never replaces "
            "it silently. Choose another --out, or pass --overwrite to replace it."
        )
    return path


def _attribute(args: argparse.Namespace) -> int:
    from sourcekit import Trajectory

    attributor = _attributor(args)
    out = _output_path(args.out, args.overwrite)
    trajectory = Trajectory.load(args.trajectory)
    queries = _load_queries(Path(args.queries))
    scores = attributor.fit(trajectory).transform(queries)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, scores)
    print(
        f"Wrote {out}: scores of shape {scores.shape} (queries x training examples), {args.method}. "
        "scores[q, m] is the first-order effect of including training example m on query q's "
        "measurement."
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from sourcekit import Trajectory

    trajectory = Trajectory.load(args.trajectory)
    if args.verify:
        trajectory.verify()  # a missing or altered checkpoint is an error, not a summary
    print(trajectory.summary())
    n_checkpoints = len(trajectory.checkpoint_steps)
    n_segments = args.segments or max(len(trajectory.stages), min(3, n_checkpoints))
    try:
        segments = trajectory.segments(n_segments)
    except ValueError as err:
        print(f"  segments: {err}")
    else:
        print(f"  with n_segments={n_segments}:")
        for s in segments:
            print(
                f"    segment {s.index}: stage {trajectory.stages[s.stage].name!r}, steps "
                f"{s.start}..{s.end - 1}, checkpoints {list(s.checkpoints)}, learning-rate sum "
                f"{trajectory.learning_rates[s.start : s.end].sum():.4g}"
            )
    files = [p for p in Path(args.trajectory).rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    verified = "every checkpoint verified" if args.verify else "checkpoints not verified"
    print(
        f"  {len(files)} files, {size / 1e6:.1f} MB on disk ({verified}); fingerprint "
        f"{trajectory.fingerprint[:16]}"
    )
    return 0


# --- the parser ----------------------------------------------------------------------------
def _formatter(prog: str) -> argparse.HelpFormatter:
    # Help text starts in column 32, so that the longest option keeps it on its own line.
    return argparse.HelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sourcekit",
        description="Training data attribution for PyTorch: which training examples pushed a prediction up or down.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        formatter_class=_formatter,
        help="train a digits classifier, record it, and attribute a few test predictions",
        description=(
            "Train the embedded digits task (scikit-learn's 8x8 digits, a small MLP) with a recipe, "
            "record the run, and attribute a few test digits to the training digits with SOURCE, the "
            "influence function and exact unrolling. Prints each query's strongest proponents and "
            "opponents and writes a figure of them."
        ),
    )
    demo.add_argument(
        "--recipe",
        default="early",
        help="training recipe: early (stopped at a quarter of its schedule; default), standard, two_stage or adamw",
    )
    demo.add_argument(
        "--queries", type=int, default=3, help="number of test digits to attribute (default: 3)"
    )
    demo.add_argument(
        "--top",
        type=int,
        default=5,
        help="proponents and opponents to show per query (default: 5)",
    )
    demo.add_argument(
        "--out",
        default="sourcekit-demo",
        help="folder for the figure and the evaluation cache (default: ./sourcekit-demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the training run (default: 0)")
    demo.add_argument(
        "--evaluate",
        action="store_true",
        help="also compare the methods by their linear datamodeling score on a small retraining ground truth (about a minute; cached in the output folder)",
    )
    demo.add_argument("--no-figure", action="store_true", help="skip the figure")
    demo.add_argument("--quiet", action="store_true", help="hide progress bars")
    demo.set_defaults(handler=_demo)

    attribute = sub.add_parser(
        "attribute",
        formatter_class=_formatter,
        help="score queries against a saved trajectory and write the score matrix",
        description=(
            "Load a trajectory saved with Trajectory.save (its manifest names the model factory, "
            "'package.module:factory', which must be importable here), score the queries with the "
            "chosen method, and write the (n_queries, n_train) matrix to a .npy file."
        ),
    )
    attribute.add_argument("trajectory", help="directory written by Trajectory.save")
    attribute.add_argument(
        "--queries",
        required=True,
        help="a .npz with arrays 'inputs' and 'targets', or a .pt holding a dict of those two tensors",
    )
    attribute.add_argument(
        "--method",
        choices=list(METHODS),
        default="source",
        help="attribution method (default: source)",
    )
    for name in OPTIONS:
        attribute.add_argument(_option(name), **_argument(name))
    attribute.add_argument(
        "--out",
        default="scores.npy",
        help="output .npy file (.npy is added to a name without it; default: scores.npy)",
    )
    attribute.add_argument(
        "--overwrite", action="store_true", help="replace the output file if it exists"
    )
    attribute.add_argument("--quiet", action="store_true", help="hide progress bars")
    attribute.set_defaults(handler=_attribute)

    info = sub.add_parser(
        "info",
        formatter_class=_formatter,
        help="summarise a saved trajectory",
        description="Print the stages, steps, checkpoints and segments of a trajectory saved with Trajectory.save.",
    )
    info.add_argument("trajectory", help="directory written by Trajectory.save")
    info.add_argument(
        "--segments",
        type=int,
        default=None,
        help="show the split into this many segments (default: up to 3)",
    )
    info.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking every checkpoint file against its recorded sha256 (done by default)",
    )
    info.set_defaults(handler=_info)
    return parser


@contextlib.contextmanager
def _importable_from_here() -> Iterator[None]:
    """Modules of the working directory importable, as under ``python -m sourcekit``.

    A saved trajectory names its model factory by module; the console script, unlike
    ``python -m``, does not put the working directory on ``sys.path``, so it is added
    (first, as ``python -m`` does) for the command's duration.
    """
    here = os.getcwd()
    if "" in sys.path or here in sys.path:
        yield
        return
    sys.path.insert(0, here)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(here)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    for name in ("queries", "top", "segments"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {value}")
    from .exceptions import NonFiniteError, TrajectoryError, UnsupportedModuleError

    try:
        with _importable_from_here():
            return int(args.handler(args))
    except (
        TrajectoryError,
        UnsupportedModuleError,
        NonFiniteError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as err:
        print(f"sourcekit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
