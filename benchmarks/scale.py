"""SOURCE on larger workloads: its time against its floor, its memory against memory_limit.

Run:  python benchmarks/scale.py [--scale cpu|gpu] [--queries 100] [--threads 1]
                                 [--workloads conv transformer] [--device auto]

Two workloads are trained here on synthetic data (``benchmarks/workloads.py``): a
ResNet-9-style conv net on 32 x 32 x 3 images (SOURCE through its convolutions and its
Linear head, ``modules=``, since BatchNorm layers have parameters sourcekit does not
attribute through) and a decoder-only transformer language model (SOURCE through its
Linear layers; loss and measurement: the sequence's mean next-token cross-entropy on
(n, T, vocabulary) outputs). ``--scale cpu`` (the default) runs in a few minutes on a
CPU; ``--scale gpu`` uses the larger sizes meant for one GPU.

For each workload, measured in one run, every measurement in a fresh process:

(i)   SOURCE's total time, fit + transform of ``--queries`` queries (n_segments=3,
      EK-FAC, true Fisher: the defaults), against its floor C x (one forward and
      backward pass of the mean training loss over the training set at one checkpoint,
      batches of 256 as SOURCE streams them), and the ratio, for four settings: the
      defaults; random_state=1 (other sampled Fisher targets: the Pearson correlation
      of its scores with the defaults' is the method's own sampling noise);
      curvature_examples = N / 4 (curvature from a quarter of the examples; its Pearson
      correlation with the defaults' scores); average_checkpoints=True (the fast
      variant: one pass per segment at the mean of its checkpoints' weights), alone and
      with curvature_examples = N / 4 (their Pearson correlations with the defaults');
      and a memory_limit large enough to keep the factors of several checkpoints;
(ii)  where SOURCE's time goes, for the defaults, for curvature_examples = N / 4 and
      for the fast variant with curvature_examples = N / 4:
      covariances, eigendecompositions, the EK-FAC eigenvalue correction, query
      gradients, query preconditioning, the score contraction, and the rest (the
      forward and backward passes, unfolding convolution patches);
(iii) peak memory (resident set size on a CPU, torch.cuda.max_memory_allocated on a
      GPU) above the process's baseline after loading, against the bound the
      documentation states: ``memory_limit`` (the factor cache and the query blocks)
      plus the working set of the passes, which ``batch_size`` sets, plus the score
      matrix. The working set W is measured, not estimated: it is SOURCE's own peak
      when ``memory_limit`` allows nothing to be kept (1 byte, two queries, so every
      checkpoint is streamed again and each query is its own block). The bound is
      checked at two values of memory_limit, one that keeps nothing and one that
      keeps what fits, in runs of their own (the timed runs leave the allocator as
      it is).

Resident memory is measured with glibc's mmap threshold fixed at 64 KiB in the
measuring processes, so that freed tensors leave the resident set.

Times are single runs (a fit is long); the floor is the median of 3 passes after a
warm-up, measured before and after the timed runs of a workload, and the faster of the
two is used (the stricter floor).
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

import numpy as np
import torch
import workloads

import sourcekit
from sourcekit._denormals import flushing_denormals
from sourcekit._device import resolve_device
from sourcekit.estimators._gradient import GradientState

# memory_limit per scale: the default (timing (i) and (ii)), one large enough to keep
# the factor cache of every checkpoint the budget allows (a second row of (i)), and a
# small one for (iii).
MEMORY_LIMITS = {
    "cpu": {"default": 2**30, "large": 2**33, "small": 2**28},
    "gpu": {"default": 2**30, "large": 2**36, "small": 2**32},
    "tiny": {"default": 2**30, "large": 2**31, "small": 2**24},
}
BATCH_SIZE = 256


# --- measuring, in a child process ------------------------------------------------------------
def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds spent inside wrapped functions, by category (outermost calls only)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._depth = 0

    def wrap(self, module: object, name: str, category: str) -> None:
        fn = getattr(module, name)

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            _sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds[category] = (
                    self.seconds.get(category, 0.0) + time.perf_counter() - start
                )
                self._depth -= 1

        setattr(module, name, timed)


CATEGORIES = (
    "covariances",
    "eigendecompositions",
    "correction",
    "query gradients",
    "preconditioning",
    "contraction",
)


def instrument(device: torch.device) -> Clock:
    import sourcekit.curvature._ekfac as ekfac
    import sourcekit.curvature._kfac as kfac
    import sourcekit.estimators._gradient as gradient
    import sourcekit.scoring._source as kernel

    clock = Clock(device)
    clock.wrap(kfac, "_gram", "covariances")
    clock.wrap(kfac, "eigh", "eigendecompositions")
    clock.wrap(kfac, "squared_rotated", "correction")
    clock.wrap(ekfac, "squared_rotated", "correction")
    clock.wrap(gradient.QueryGradients, "at", "query gradients")
    clock.wrap(kernel, "precondition", "preconditioning")
    clock.wrap(kernel, "query_matrices", "preconditioning")
    clock.wrap(kernel, "gradient_dot", "contraction")
    return clock


def _load(path: str) -> tuple[sourcekit.Trajectory, sourcekit.Examples, list[str]]:
    trajectory = sourcekit.Trajectory.load(os.path.join(path, "trajectory"))
    saved = torch.load(os.path.join(path, "queries.pt"), weights_only=True)
    return trajectory, sourcekit.Examples(saved["inputs"], saved["targets"]), saved["modules"]


def measure_floor(trajectory: sourcekit.Trajectory, device: torch.device) -> dict:
    """C x one forward and backward pass of the mean training loss (median of 3).

    Measured with subnormal numbers flushed to zero, as sourcekit computes on a CPU
    (``sourcekit._denormals``), so that SOURCE is not credited with the mode's speed.
    """
    model = trajectory.build_model(trajectory.checkpoint_steps[-1]).to(device).eval()
    data = trajectory.train.to(device)

    def one_pass() -> float:
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(data), BATCH_SIZE):
            batch = data[i : i + BATCH_SIZE]
            model.zero_grad(set_to_none=True)
            trajectory.loss(model(batch.inputs), batch.targets).mean().backward()
        _sync(device)
        return time.perf_counter() - start

    with flushing_denormals():
        one_pass()
        seconds = float(np.median([one_pass() for _ in range(3)]))
    c = len(trajectory.checkpoint_steps)
    return {"pass_s": seconds, "floor_s": c * seconds, "C": c}


def _factor_bytes(state: GradientState) -> int:
    return sum(b.nbytes() for batches in state.cache.values() for b in batches)


def measure_source(
    trajectory: sourcekit.Trajectory,
    queries: sourcekit.Examples,
    modules: list[str],
    device: torch.device,
    settings: dict,
) -> dict:
    from sourcekit.estimators._gradient import query_slices

    clock = instrument(device) if settings["profile"] else None
    queries = queries[: settings["queries"]]
    # Warm up the libraries (first-call costs) on a throwaway model pass.
    model = trajectory.build_model().to(device).eval()
    with torch.no_grad():
        model(trajectory.train[:2].to(device).inputs)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _peak_bytes(device)
    source = sourcekit.SourceAttributor(
        n_segments=3,
        modules=modules,
        memory_limit=settings["memory_limit"],
        batch_size=settings["batch_size"],
        curvature_examples=settings.get("curvature_examples"),
        average_checkpoints=settings.get("average_checkpoints", False),
        random_state=settings.get("random_state", 0),
        device=device,
    )
    _sync(device)
    start = time.perf_counter()
    source.fit(trajectory)
    _sync(device)
    fitted = time.perf_counter()
    scores = source.transform(queries)
    _sync(device)
    done = time.perf_counter()
    peak = _peak_bytes(device)
    if settings.get("save"):
        np.save(settings["save"], scores)
    blocks = source.state_.blocks
    return {
        "fit_s": fitted - start,
        "transform_s": done - fitted,
        "total_s": done - start,
        "baseline": baseline,
        "peak": peak,
        "cache": _factor_bytes(source.state_),
        "cached_checkpoints": len(source.state_.cache),
        "query_blocks": len(query_slices(len(queries), blocks, settings["memory_limit"])),
        "scores": int(scores.nbytes),
        "breakdown": {} if clock is None else clock.seconds,
        "finite": bool(np.isfinite(scores).all()),
    }


def child(kind: str, path: str, device_name: str, settings: dict) -> None:
    device = resolve_device(device_name)
    trajectory, queries, modules = _load(path)
    if kind == "floor":
        report = measure_floor(trajectory, device)
    else:
        report = measure_source(trajectory, queries, modules, device, settings)
    print("RESULT " + json.dumps(report))


# --- orchestrating ----------------------------------------------------------------------------
def run_child(
    args: argparse.Namespace, kind: str, path: str, memory: bool = False, **settings: object
) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
    }
    if memory:
        # glibc serves large blocks from fresh mappings, returned when freed, so that the
        # resident set follows what is allocated instead of the heap's fragmentation
        # (it slows the run down: these runs are not timed).
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    settings = {"queries": args.queries, "batch_size": BATCH_SIZE, "profile": False, **settings}
    command = [sys.executable, __file__, "--child", kind, path, args.device, json.dumps(settings)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"The measurement {kind!r} failed:\n{done.stderr}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(workloads.SIZES), default="cpu")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--workloads", nargs="+", choices=["conv", "transformer"], default=["conv", "transformer"]
    )
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default auto)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", args.threads)))
    if args.child:
        kind, path, device, settings = args.child
        child(kind, path, device, json.loads(settings))
        return

    device = resolve_device(args.device)
    limits = MEMORY_LIMITS[args.scale]
    workdir = tempfile.mkdtemp(prefix="sourcekit-scale-")
    rows = []
    for kind in args.workloads:
        start = time.perf_counter()
        workload = workloads.build(kind, args.scale, args.queries)
        trained = time.perf_counter() - start
        path = os.path.join(workdir, kind)
        workload.trajectory.save(os.path.join(path, "trajectory"))
        torch.save(
            {
                "inputs": workload.queries.inputs,
                "targets": workload.queries.targets,
                "modules": workload.modules,
            },
            os.path.join(path, "queries.pt"),
        )
        subset = workload.details["n_train"] // 4
        compared = ("seed", "subset", "fast", "fast subset")
        saved = {name: os.path.join(path, f"{name}.npy") for name in ("default", *compared)}
        # The timed settings whose scores are kept (and compared with the defaults'),
        # each at the default memory_limit; ``profile`` adds the breakdown of (ii).
        timed = {
            "default": {"profile": True},
            "seed": {"random_state": 1},
            "subset": {"curvature_examples": subset, "profile": True},
            "fast": {"average_checkpoints": True},
            "fast subset": {
                "average_checkpoints": True,
                "curvature_examples": subset,
                "profile": True,
            },
        }
        floors = [run_child(args, "floor", path)]
        runs: dict[str, dict] = {}
        for name, setting in timed.items():
            runs[name] = run_child(
                args,
                "source",
                path,
                memory_limit=limits["default"],
                save=saved[name],
                **setting,
            )
        # The floor again after the timed runs: the faster of the two measurements is
        # kept, so that a machine slower while one of them ran does not flatter SOURCE.
        floors.append(run_child(args, "floor", path))
        runs["floor"] = min(floors, key=lambda f: f["pass_s"])
        runs |= {
            "large": run_child(args, "source", path, memory_limit=limits["large"]),
            "small memory": run_child(args, "source", path, True, memory_limit=limits["small"]),
            "large memory": run_child(args, "source", path, True, memory_limit=limits["large"]),
            "working set": run_child(args, "source", path, True, memory_limit=1, queries=2),
        }
        scores = {name: np.load(file) for name, file in saved.items()}
        for name in compared:
            runs[name]["pearson"] = float(
                np.corrcoef(scores[name].ravel(), scores["default"].ravel())[0, 1]
            )
        runs["subset"]["n"] = runs["fast subset"]["n"] = subset
        rows.append((workload, trained, runs))

    where = "GPU" if device.type == "cuda" else f"CPU, torch threads {args.threads}"
    print(
        f"SOURCE (n_segments=3, EK-FAC, true Fisher) at scale {args.scale!r}, {where}, "
        f"{args.queries} queries, batches of {BATCH_SIZE}\n"
    )
    for workload, trained, _ in rows:
        print(f"  {workloads.describe(workload)} (trained in {trained:.1f} s)")
    print("\n(i) SOURCE's total time against its floor")
    print(
        f"{'workload':<13}{'setting':<30}{'cached':>7}{'pass s':>8}{'floor s':>9}"
        f"{'fit s':>8}{'transform s':>13}{'SOURCE s':>10}{'/ floor':>9}{'Pearson':>9}"
    )
    for workload, _, runs in rows:
        floor = runs["floor"]
        settings = {
            "default": f"memory_limit {_mb(limits['default'])} MiB",
            "seed": "random_state=1",
            "subset": f"curvature_examples={runs['subset']['n']}",
            "fast": "average_checkpoints=True",
            "fast subset": f"average_checkpoints, c_e={runs['subset']['n']}",
            "large": f"memory_limit {_mb(limits['large'])} MiB",
        }
        for name, setting in settings.items():
            r = runs[name]
            pearson = f"{r['pearson']:.4f}" if "pearson" in r else "-"
            print(
                f"{workload.name:<13}{setting:<30}"
                f"{r['cached_checkpoints']:>3}/{floor['C']:<3}{floor['pass_s']:>8.2f}"
                f"{floor['floor_s']:>9.2f}{r['fit_s']:>8.2f}{r['transform_s']:>13.2f}"
                f"{r['total_s']:>10.2f}{r['total_s'] / floor['floor_s']:>9.2f}{pearson:>9}"
            )
    print("\n(ii) where SOURCE's time goes, in multiples of the floor")
    print(
        f"{'workload':<13}{'setting':<24}"
        + "".join(f"{c:>16}" for c in (*CATEGORIES, "passes, rest"))
    )
    for workload, _, runs in rows:
        for name in ("default", "subset", "fast subset"):
            r, floor_s = runs[name], runs["floor"]["floor_s"]
            rest = r["total_s"] - sum(r["breakdown"].values())
            parts = [r["breakdown"].get(c, 0.0) for c in CATEGORIES] + [rest]
            setting = {
                "default": "default",
                "subset": f"curvature_examples={runs['subset']['n']}",
                "fast subset": f"average, c_e={runs['subset']['n']}",
            }[name]
            print(
                f"{workload.name:<13}{setting:<24}"
                + "".join(f"{p / floor_s:>16.2f}" for p in parts)
            )
    unit = "GPU allocated" if device.type == "cuda" else "resident"
    print(
        f"\n(iii) peak memory ({unit}, MiB above the baseline after loading) against "
        "memory_limit + working set W + scores"
    )
    print(
        f"{'workload':<13}{'memory_limit':>13}{'cache kept':>11}{'query blocks':>13}"
        f"{'W':>7}{'scores':>8}{'peak':>8}{'bound':>8}{'within':>8}"
    )
    for workload, _, runs in rows:
        w = runs["working set"]["peak"] - runs["working set"]["baseline"]
        for name in ("small", "large"):
            r = runs[f"{name} memory"]
            used, bound = r["peak"] - r["baseline"], limits[name] + w + r["scores"]
            print(
                f"{workload.name:<13}{_mb(limits[name]):>13}{_mb(r['cache']):>11}"
                f"{r['query_blocks']:>13}{_mb(w):>7}{_mb(r['scores']):>8}{_mb(used):>8}"
                f"{_mb(bound):>8}{'yes' if used <= bound else 'NO':>8}"
            )


if __name__ == "__main__":
    main()
