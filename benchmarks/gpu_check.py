"""One run on one GPU: CUDA scores against CPU scores, then SOURCE's speed on the GPU workloads.

Run:  python benchmarks/gpu_check.py [--device cuda] [--scale gpu] [--queries 100]
                                     [--skip-check] [--workloads conv transformer]
                                     [--gradient-dtypes None bfloat16] [--profile]
                                     [--threads N] [--memory-limit BYTES]

from the repository root, on a machine with one NVIDIA GPU. It is meant to finish in under
8 minutes on an H200; the two workloads are trained on the GPU too (``--threads``: torch's
CPU threads for the CPU side of the device check). ``--device cpu --scale tiny --queries 5``
is a dry run of every code path on a CPU, in seconds.

It prints, as plain-text tables ready to paste into the documentation:

(i)   the device check, on the tiny case of ``tests/test_common.py`` (a tanh MLP,
      12 training examples, 3 checkpoints, 6 queries): every attributor exported by
      ``sourcekit`` fitted with ``device="cpu"`` and with ``--device``, in float64
      where it has a ``dtype``; per class, max |τ_device − τ_cpu| / max |τ_cpu| and
      PASS or FAIL against 1e-8 (the test ``tests/test_devices.py``, as a report).
      Then SourceAttributor(gradient_dtype="bfloat16") on the device against float64
      on the CPU: their Pearson correlation, PASS above 0.995. In a CPU dry run both
      sides run on the CPU, which checks the code path only;
(ii)  for the conv net and the transformer of ``benchmarks/workloads.py`` at ``--scale``
      (trained on the device with ``workloads.build``), SourceAttributor(
      n_segments=3, modules=the attributed layers) on the device with gradient_dtype
      None (float32 passes) and "bfloat16": fit and transform seconds for ``--queries``
      queries, training examples attributed per second (n_train / (fit + transform)),
      peak GPU memory (torch.cuda.max_memory_allocated during fit + transform), the
      floor C x (one forward and backward pass of the mean training loss over the
      training set, batches of 256, as in ``benchmarks/scale.py``), SOURCE's time over
      the floor, and the Pearson correlation of the bfloat16 scores with the float32
      ones.

Progress goes to stderr, the tables to stdout. The exit status is 1 if a check fails or
a run raises (the error is printed in its row and the other runs go on).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import scale
import torch
import workloads

import sourcekit
from sourcekit.base import clear_state_cache

ROOT = Path(__file__).resolve().parent.parent
# The repository's own ``tests`` package, ahead of any installed package of that name.
sys.path.insert(0, str(ROOT))

# The device check's tolerance, relative to the largest CPU score (as in
# tests/test_devices.py). In float64 (eps = 1.1e-16) a reduction over the case's few
# hundred terms (38 parameters, 12 examples, 9 steps) rounds differently on another
# device by at most ~100 eps of its magnitude; an eigendecomposition moves its
# eigenvectors by eps over the relative eigenvalue gap (smallest gap of the case's
# covariances: 2.7e-4), so by at most ~4e3 eps; damped inverses amplify relative errors
# by their condition number, at most ~50 here. A dozen such steps: 12 x 4e3 x 50 eps ≈
# 3e-10. 1e-8 leaves a thirtyfold margin, yet a real defect (a tensor on the wrong device,
# other random draws) moves scores by O(1) of their scale.
RELATIVE_TOLERANCE = 1e-8

# bfloat16 gradients against float64 (PEARSON_BF16 in
# tests/estimators/test_gradient_dtype.py): bfloat16 keeps 8 significant bits, so a
# per-example gradient, and a score, is off by a few tenths of a percent; independent
# noise of 10 % of the scores' spread (five times the worst error seen) still gives a
# correlation of 1/√(1 + 0.1²) ≈ 0.995, while a real defect gives far less.
PEARSON_BF16 = 0.995

GRADIENT_DTYPES = (None, "bfloat16")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _error(err: BaseException) -> str:
    return f"ERROR {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


# --- (i) the device check ---------------------------------------------------------------------
def _check_setup() -> tuple[list[type], str, Any]:
    """The attributors, the case and the per-class settings of ``tests/test_common.py``
    (the test suite's own discovery: run from the repository root, with pytest and
    hypothesis installed)."""
    from tests.test_common import ATTRIBUTORS, CASE, _params

    return ATTRIBUTORS, CASE, _params


def _scores(cls: type, params: dict[str, Any], trajectory, queries) -> np.ndarray:  # type: ignore[no-untyped-def]
    clear_state_cache()  # every fit computes its state afresh, on its own device
    return cls(**params).fit(trajectory).transform(queries)


def device_check(device: torch.device) -> bool:
    from tests import _cases

    attributors, case, params_of = _check_setup()
    trajectory, queries = _cases.trajectory(case), _cases.queries(case, 6)
    dry = device.type == "cpu"
    side = "cpu (dry run: checks the code path only)" if dry else str(device)
    print(f"(i) device check: {side} against cpu, float64, tiny case {case!r}")
    print(f"{'attributor':<36}{'max |diff| / max |cpu|':>24}{'tolerance':>11}  result")
    ok = True
    for cls in attributors:
        log(f"device check: {cls.__name__}")
        params = params_of(cls)
        if "dtype" in cls().get_params(deep=False):
            params["dtype"] = "float64"
        try:
            cpu = _scores(cls, {**params, "device": "cpu"}, trajectory, queries)
            other = _scores(cls, {**params, "device": str(device)}, trajectory, queries)
        except Exception as err:  # report it and go on with the other classes
            traceback.print_exc(file=sys.stderr)
            print(f"{cls.__name__:<36}  {_error(err)}")
            ok = False
            continue
        scale_ = max(float(np.abs(cpu).max()), 1e-300)
        relative = float(np.abs(other - cpu).max()) / scale_
        passed = relative <= RELATIVE_TOLERANCE and other.dtype == cpu.dtype == np.float64
        ok &= passed
        verdict = "PASS" if passed else f"FAIL (dtypes {cpu.dtype}, {other.dtype})"
        print(f"{cls.__name__:<36}{relative:>24.2e}{RELATIVE_TOLERANCE:>11.0e}  {verdict}")

    log("device check: SourceAttributor, bfloat16 gradients")
    name = f"SourceAttributor bfloat16 ({device.type})"
    try:
        exact = _scores(
            sourcekit.SourceAttributor,
            {"device": "cpu", "dtype": "float64", "progress": False},
            trajectory,
            queries,
        )
        fast = _scores(
            sourcekit.SourceAttributor,
            {"device": str(device), "gradient_dtype": "bfloat16", "progress": False},
            trajectory,
            queries,
        )
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        print(f"\n{'':<36}{'Pearson vs cpu float64':>24}{'threshold':>11}  result")
        print(f"{name:<36}  {_error(err)}")
        return False
    pearson = _pearson(fast, exact)
    passed = bool(pearson > PEARSON_BF16)
    print(f"\n{'':<36}{'Pearson vs cpu float64':>24}{'threshold':>11}  result")
    print(f"{name:<36}{pearson:>24.6f}{PEARSON_BF16:>11}  {'PASS' if passed else 'FAIL'}")
    return ok and passed


# --- (ii) SOURCE on the workloads ---------------------------------------------------------------
def _warm_up(kind: str, device: torch.device) -> None:
    """First-call costs of the device libraries (kernel loading, solver handles), paid
    outside the timings by running the same code on the tiny size of the workload."""
    tiny = workloads.build(kind, "tiny", 2)
    for gradient_dtype in GRADIENT_DTYPES:
        time_source(tiny, device, gradient_dtype, None)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_source(
    w: workloads.Workload,
    device: torch.device,
    gradient_dtype: str | None,
    memory_limit: int | None,
) -> dict[str, Any]:
    extra = {} if memory_limit is None else {"memory_limit": memory_limit}
    source = sourcekit.SourceAttributor(
        n_segments=3,
        modules=w.modules,
        device=str(device),
        gradient_dtype=gradient_dtype,
        progress=False,
        **extra,
    )
    clear_state_cache()
    _release(device)
    _sync(device)
    start = time.perf_counter()
    source.fit(w.trajectory)
    _sync(device)
    fitted = time.perf_counter()
    scores = source.transform(w.queries)
    _sync(device)
    done = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    budget = source.memory_limit_
    del source
    _release(device)
    return {
        "fit_s": fitted - start,
        "transform_s": done - fitted,
        "total_s": done - start,
        "peak": peak,
        "memory_limit": budget,
        "scores": scores,
    }


def profile_source(w: workloads.Workload, device: torch.device, memory_limit: int | None) -> None:
    """One more SOURCE run (gradient_dtype None) under torch.profiler: the operators that
    take the most device time and the most host time, to say where the time goes. Its
    timings are not those of the table (the profiler adds its own cost)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    log(f"{w.name}: profiling one SOURCE run")
    with profile(activities=activities) as prof:
        time_source(w, device, None, memory_limit)
    averages = prof.key_averages()
    print(f"\n(iii) {w.name}: operators by self device time (one profiled SOURCE run)")
    if device.type == "cuda":
        print(
            averages.table(
                sort_by="self_device_time_total", row_limit=20, max_name_column_width=48
            )
        )
    print(f"\n(iii) {w.name}: operators by self host time")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=48))


def benchmark(args: argparse.Namespace, device: torch.device) -> bool:
    built = []
    kinds = tuple(args.workloads)
    for kind in kinds:
        log(f"training the {kind} workload at scale {args.scale!r} on {device}")
        start = time.perf_counter()
        w = workloads.build(kind, args.scale, args.queries, device=str(device))
        built.append((w, time.perf_counter() - start))
        log(f"trained in {built[-1][1]:.1f} s: {workloads.describe(w)}")

    ok = True
    rows = []
    for (w, _), kind in zip(built, kinds, strict=True):
        log(f"{w.name}: warming up")
        _warm_up(kind, device)
        log(f"{w.name}: floor")
        floor = scale.measure_floor(w.trajectory, device)
        reference = None
        for gradient_dtype in args.gradient_dtypes:
            log(f"{w.name}: SOURCE, gradient_dtype={gradient_dtype}")
            try:
                run = time_source(w, device, gradient_dtype, args.memory_limit)
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                rows.append((w, gradient_dtype, floor, _error(err)))
                ok = False
                continue
            finite = bool(np.isfinite(run["scores"]).all())
            ok &= finite
            if gradient_dtype is None:
                reference = run["scores"]
            elif reference is not None:
                run["pearson"] = _pearson(run["scores"], reference)
            run["finite"] = finite
            rows.append((w, gradient_dtype, floor, run))
            # The figures as soon as they exist: a run stopped at a time limit keeps them.
            peak = "n/a" if run["peak"] is None else f"{run['peak'] / 2**20:,.0f} MiB"
            log(
                f"{w.name}, gradient_dtype={gradient_dtype}: fit {run['fit_s']:.2f} s, "
                f"transform {run['transform_s']:.2f} s, peak {peak}, memory_limit_ "
                f"{run['memory_limit'] / 2**20:,.0f} MiB, floor "
                f"{floor['floor_s']:.3f} s, / floor {run['total_s'] / floor['floor_s']:.1f}, "
                f"r vs None {run.get('pearson', '-')}, finite {finite}"
            )

    limit = (
        "'auto' (the library's default)"
        if args.memory_limit is None
        else f"{args.memory_limit:,} bytes"
    )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n(ii) SOURCE (n_segments=3, EK-FAC, true Fisher) on {where}, scale {args.scale!r}, "
        f"{args.queries} queries, memory_limit {limit}"
    )
    for w, trained in built:
        print(f"  {workloads.describe(w)} (trained on {device} in {trained:.1f} s)")
    print(
        "  examples/s: training examples attributed per second, n_train / (fit + transform),\n"
        f"  for {args.queries} queries; peak: torch.cuda.max_memory_allocated during fit +"
        " transform;\n  floor: C x one forward and backward pass of the mean training loss"
        f" over the training set\n  (batches of {scale.BATCH_SIZE}); r vs None: Pearson"
        " correlation of the scores with gradient_dtype None's\n"
    )
    print(
        f"{'workload':<13}{'gradient_dtype':>15}{'fit s':>9}{'transform s':>13}{'total s':>9}"
        f"{'examples/s':>12}{'peak MiB':>10}{'floor s':>9}{'/ floor':>9}{'r vs None':>11}"
    )
    for w, gradient_dtype, floor, run in rows:
        head = f"{w.name:<13}{gradient_dtype!s:>15}"
        if isinstance(run, str):
            print(f"{head}  {run}")
            continue
        peak = "n/a" if run["peak"] is None else f"{run['peak'] / 2**20:,.0f}"
        pearson = f"{run['pearson']:.5f}" if "pearson" in run else "-"
        n_train = w.details["n_train"]
        print(
            f"{head}{run['fit_s']:>9.2f}{run['transform_s']:>13.2f}{run['total_s']:>9.2f}"
            f"{n_train / run['total_s']:>12,.0f}{peak:>10}{floor['floor_s']:>9.3f}"
            f"{run['total_s'] / floor['floor_s']:>9.1f}{pearson:>11}"
            + ("" if run["finite"] else "  NON-FINITE SCORES")
        )
    if args.profile:
        profile_source(built[0][0], device, args.memory_limit)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="'cuda' (default) or 'cpu' (dry run)")
    parser.add_argument("--scale", choices=sorted(workloads.SIZES), default="gpu")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--skip-check", action="store_true", help="skip the device check (i)")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=("conv", "transformer"),
        default=["conv", "transformer"],
        help="the workloads of (ii), in this order (default: conv transformer)",
    )
    parser.add_argument(
        "--gradient-dtypes",
        nargs="+",
        choices=("None", "bfloat16"),
        default=["None", "bfloat16"],
        help="the gradient_dtype values of (ii) (default: None bfloat16)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the table, profile one SOURCE run of the first workload (iii)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--memory-limit",
        type=int,
        default=None,
        help="SOURCE's memory_limit in bytes (default: the library's 'auto')",
    )
    args = parser.parse_args()
    args.gradient_dtypes = [None if d == "None" else d for d in args.gradient_dtypes]
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"CUDA was asked for (--device {args.device}) but torch {torch.__version__} sees "
            "no CUDA device. Run on a GPU machine, or pass --device cpu --scale tiny for a "
            "dry run."
        )
    if device.type not in ("cuda", "cpu"):
        sys.exit(f"--device must be 'cuda' (or 'cuda:N') or 'cpu'; got {args.device!r}.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        where = f"GPU {name} ({gib:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        where = "CPU only (dry run)"
    print(
        f"sourcekit {sourcekit.__version__}, torch {torch.__version__}, {where}, "
        f"torch CPU threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')})\n"
    )

    ok = True
    if not args.skip_check:
        ok &= device_check(device)
    ok &= benchmark(args, device)
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
