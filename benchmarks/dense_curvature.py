"""The dense curvatures ("exact", "hessian"): the cost of each part, in both forms, side by side.

Run:  python benchmarks/dense_curvature.py [--checkpoints 12] [--repeats 3] [--queries 100] [--threads 1]

On the digits MLP (3,466 parameters, 1,437 training examples; the ``early`` recipe
recorded with ``--checkpoints`` checkpoints) it times, interleaved and repeated
``--repeats`` times (the median is printed):

- the Gauss-Newton sum of one checkpoint, formed from per-example Jacobians (the form
  sourcekit used for every block before) and by the form chosen per pair of blocks
  (Kronecker factors for these Linear layers: ten times less arithmetic);
- the Hessian sum of one checkpoint, differentiated with respect to one flat vector of
  the parameters (the form before) and to the parameter tensors themselves;
- the eigendecomposition of the 3,466 × 3,466 matrix, which each segment's curvature
  needs once;

then, once each and interleaved, ``SourceAttributor(curvature="exact", n_segments=3)``
and ``InfluenceAttributor(curvature="exact")`` fitted and scoring ``--queries`` test
queries, with the Jacobian form forced and with the form chosen. On the text task
(outputs with 12 positions, 132 expected-Fisher passes per batch) it times the
Gauss-Newton sum of one checkpoint in both forms: there T² = 144 ≥ V, so the Jacobian
form is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.func import functional_call, hessian

import sourcekit
from sourcekit.base import clear_state_cache
from sourcekit.curvature._dense import _block_params, _gauss_newton_sum, _hessian_sum
from sourcekit.curvature._gauss_newton import gauss_newton_path
from sourcekit.curvature._passes import CurvaturePasses, FitSettings
from sourcekit.gradients._layers import LayerBlock, find_blocks
from sourcekit.gradients._per_example import model_at

CPU = torch.device("cpu")


def flat_vector_hessian_sum(passes: CurvaturePasses, model: torch.nn.Module) -> torch.Tensor:
    """The Hessian sum as sourcekit formed it before: with respect to one flat vector."""
    blocks, trajectory, indices = passes.blocks, passes.trajectory, passes.indices
    params = _block_params(model, blocks)
    shapes = {k: v.shape for k, v in params.items()}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    fixed.update(dict(model.named_buffers()))
    flat0 = torch.cat(
        [b.matrix({k: v.detach() for k, v in params.items()}).reshape(-1) for b in blocks]
    )
    data = trajectory.train.to(CPU, torch.float64)

    def unflat(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for b in blocks:
            out.update(b.split(flat[start : start + b.n_params].reshape(b.d_out, b.d_in), shapes))
            start += b.n_params
        return out

    def batch_loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return trajectory.loss(functional_call(model, {**fixed, **unflat(flat)}, (x,)), y).sum()

    total = torch.zeros(flat0.numel(), flat0.numel(), dtype=torch.float64)
    for start in range(0, len(indices), passes.settings.batch_size):
        idx = torch.from_numpy(indices[start : start + passes.settings.batch_size])
        total += hessian(batch_loss)(flat0, data.inputs[idx], data.targets[idx])
    return total


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each case, the cases run in turn ``repeats`` times."""
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            seconds[name].append(timed(fn)[0])
    return {name: statistics.median(s) for name, s in seconds.items()}


def one_checkpoint(
    trajectory: sourcekit.Trajectory, blocks: list[LayerBlock]
) -> tuple[CurvaturePasses, torch.nn.Module, int]:
    step = trajectory.checkpoint_steps[-1]
    settings = FitSettings(fisher="expected", device=CPU, dtype=torch.float64)
    passes = CurvaturePasses(trajectory, blocks, [step], np.arange(trajectory.n_train), settings)
    model = model_at(trajectory, step, blocks, device=CPU, dtype=torch.float64)
    return passes, model, step


def gauss_newton(
    path: str, passes: CurvaturePasses, model: torch.nn.Module, step: int
) -> Callable[[], torch.Tensor]:
    """The Gauss-Newton sum of one checkpoint in the form ``path``."""

    def run() -> torch.Tensor:
        with gauss_newton_path(path):
            return _gauss_newton_sum(passes, model, step)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoints", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = sourcekit.datasets.load_digits_task()
    stages = [dataclasses.replace(s, n_checkpoints=args.checkpoints) for s in task.stages("early")]
    trajectory = sourcekit.train(
        task.architecture,
        task.train,
        stages,
        loss=task.loss,
        measurement=task.measurement,
        architecture_kwargs=task.architecture_kwargs,
        progress=False,
    )
    blocks = find_blocks(trajectory.build_model())
    n_params = sum(b.n_params for b in blocks)
    passes, model, step = one_checkpoint(trajectory, blocks)
    print(
        f"digits MLP: {n_params} parameters, {trajectory.n_train} training examples, "
        f"{len(trajectory.checkpoint_steps)} checkpoints; torch threads {torch.get_num_threads()}; "
        f"median of {args.repeats}\n"
    )

    matrix = _gauss_newton_sum(passes, model, step)
    with gauss_newton_path("jacobian"):
        reference = _gauss_newton_sum(passes, model, step)
    agreement = float((matrix - reference).abs().max() / reference.abs().max())
    hessian_now = _hessian_sum(passes, model, step)
    hessian_before = flat_vector_hessian_sum(passes, model)
    hessian_agreement = float(
        (hessian_now - hessian_before).abs().max() / hessian_before.abs().max()
    )
    parts = interleaved(
        {
            "Gauss-Newton sum, per-example Jacobians (before)": gauss_newton(
                "jacobian", passes, model, step
            ),
            "Gauss-Newton sum, form chosen per block pair (now)": gauss_newton(
                "auto", passes, model, step
            ),
            "Hessian sum, flat parameter vector (before)": lambda: flat_vector_hessian_sum(
                passes, model
            ),
            "Hessian sum, parameter tensors (now)": lambda: _hessian_sum(passes, model, step),
            "eigendecomposition (once per segment)": lambda: torch.linalg.eigh(
                matrix / trajectory.n_train
            ),
        },
        args.repeats,
    )
    print("one checkpoint                                          seconds")
    for name, seconds in parts.items():
        print(f"  {name:<52} {seconds:7.2f}")
    print(
        f"  Gauss-Newton: {parts['Gauss-Newton sum, per-example Jacobians (before)'] / parts['Gauss-Newton sum, form chosen per block pair (now)']:.1f} times faster, "
        f"largest difference {agreement:.1e} of the largest entry"
    )
    print(
        f"  Hessian: {parts['Hessian sum, flat parameter vector (before)'] / parts['Hessian sum, parameter tensors (now)']:.2f} times faster, "
        f"largest difference {hessian_agreement:.1e} of the largest entry\n"
    )

    queries = task.test[: args.queries]
    estimators = {
        "SOURCE (exact, 3 segments)": lambda: sourcekit.SourceAttributor(
            n_segments=3, curvature="exact", progress=False
        ),
        "influence (exact)": lambda: sourcekit.InfluenceAttributor(
            curvature="exact", progress=False
        ),
    }
    print(f"fit and transform of {args.queries} queries             before     now   ratio")
    for name, make in estimators.items():
        seconds = {}
        scores = {}
        for path in ("jacobian", "auto"):
            clear_state_cache()
            with gauss_newton_path(path):
                seconds[path], scores[path] = timed(
                    lambda make=make: make().fit(trajectory).transform(queries)
                )
        difference = float(
            np.abs(scores["auto"] - scores["jacobian"]).max() / np.abs(scores["jacobian"]).max()
        )
        print(
            f"  {name:<44} {seconds['jacobian']:7.1f} {seconds['auto']:7.1f} "
            f"{seconds['jacobian'] / seconds['auto']:6.1f}   (scores differ by {difference:.1e})"
        )

    text = sourcekit.datasets.load_text_task()
    run = text.record("early", progress=False)
    text_blocks = find_blocks(run.build_model())
    passes, model, step = one_checkpoint(run, text_blocks)
    parts = interleaved(
        {
            "jacobian": gauss_newton("jacobian", passes, model, step),
            "kronecker": gauss_newton("kronecker", passes, model, step),
            "auto": gauss_newton("auto", passes, model, step),
        },
        args.repeats,
    )
    print(
        f"\ntext task ({sum(b.n_params for b in text_blocks)} parameters, outputs with 12 positions): "
        "Gauss-Newton sum of one checkpoint, seconds"
    )
    print("  " + "   ".join(f"{name} {seconds:.2f}" for name, seconds in parts.items()))


if __name__ == "__main__":
    main()
