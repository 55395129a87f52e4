"""Sharding over ``torch.distributed`` ranks (sourcekit/_distributed.py).

Two CPU processes with the gloo backend, launched the way ``torchrun`` launches workers
(MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE in the environment), fit every attributor
that shards the training set and must both return the scores of one process.

Tolerance. Sharding changes only the order of floating-point summation: the covariance
sums (A, S, the corrected eigenvalues, ΦᵀΦ, the dense Gauss-Newton matrix) are summed
per rank and then over the ranks, and each training example's gradients are computed
in a batch of other examples (matrix products whose blocking may change with the
batch). Recursive summation of n terms in precision u errs by at most (n − 1)·u times
the sum of the terms' magnitudes. A score of a case with N examples, C checkpoints and
P attributed parameters is built from sums of at most N·C terms (the curvature) and P
terms (the contraction), so each sum moves by at most ε = (N·C + P)·u relative to the
magnitudes of its terms. The curvature then enters through a function of its
eigenvalues: a damped inverse (H + λ)⁻¹ turns an absolute change ε·σ_max of the
eigenvalues into a relative change of at most κ·ε with κ = (σ_max + λ)/λ (influence
functions, TRAK, SOURCE's inverse under Adam); SOURCE's (1 − e^{−sσ})/σ behaves like
an inverse with the extra damping 1/s (METHOD.md section 4), so κ = (σ_max + λ + 1/s)/
(λ + 1/s); methods without curvature have κ = 1. The eigendecompositions are backward
stable in float64 (a few ulps of the matrix norm); EK-FAC's eigenbasis turns by ε over
the relative eigengaps of A and S (Davis-Kahan), gaps that in these tiny cases are far
above rounding level and are absorbed by the constant. With the largest score standing
for the magnitude of the largest term, the bound is c·ε·κ·max|τ| with a few ulps,
c = 8 (the differences seen are 400 to 30,000 times smaller).

Two runs of the registry's recipe with a second stage split unevenly by m % 2 (every
other example; a single example, which leaves one rank's shard of it empty) check the
ownership of examples across stages.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit._distributed import (
    all_agree,
    all_gather_columns,
    all_reduce_sum,
    owners,
    shard,
)
from sourcekit.base import clear_state_cache
from sourcekit.curvature import DenseCurvature
from sourcekit.gradients._layers import find_blocks

from . import _cases

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
TIMEOUT_S = 90  # generous: the run takes a few seconds; a hang must not stall the suite
ULPS = 8  # the constant c of the bound in the module docstring

COMMON = {"device": "cpu", "dtype": "float64", "batch_size": 4}


def _stages(second: np.ndarray, batch_size: int) -> list[sourcekit.TrainingStage]:
    return [
        sourcekit.TrainingStage(
            sourcekit.OptimizerSpec("sgd", lr=0.2, momentum=0.5),
            epochs=3,
            batch_size=4,
            name="pretrain",
            n_checkpoints=3,
        ),
        sourcekit.TrainingStage(
            sourcekit.OptimizerSpec("sgd", lr=0.1),
            epochs=2,
            batch_size=batch_size,
            name="finetune",
            examples=second,
            n_checkpoints=2,
        ),
    ]


# Runs whose second stage is split unevenly by m % 2: every other example (each rank
# must still get half of it), and a single example (one rank's shard of it is empty).
LOCAL_CASES = {
    "every_other": lambda: _stages(np.arange(0, 12, 2), 2),
    "one_example": lambda: _stages(np.array([3]), 1),
}


@functools.cache
def trajectory_of(case: str) -> sourcekit.Trajectory:
    if case not in LOCAL_CASES:
        return _cases.trajectory(case)
    return sourcekit.train(
        "tests._cases:make_tanh_mlp",
        _cases.train_examples("mlp_sgd"),
        LOCAL_CASES[case](),
        loss="cross_entropy",
        measurement="margin",
        progress=False,
    )


def queries_of(case: str) -> sourcekit.Examples:
    return _cases.queries("mlp_sgd" if case in LOCAL_CASES else case)


def attributors() -> dict[str, tuple[str, Any]]:
    """name -> (case, attributor): what both the ranks and the single process compute."""
    return {
        "source_ekfac_true_fisher": ("mlp_momentum", sourcekit.SourceAttributor(**COMMON)),
        "source_two_stages": (
            "mlp_two_stage",
            sourcekit.SourceAttributor(n_segments=2, **COMMON),
        ),
        "source_every_other": ("every_other", sourcekit.SourceAttributor(n_segments=2, **COMMON)),
        "tracin_every_other": ("every_other", sourcekit.TracInAttributor(**COMMON)),
        "source_one_example": ("one_example", sourcekit.SourceAttributor(n_segments=2, **COMMON)),
        "tracin_one_example": ("one_example", sourcekit.TracInAttributor(**COMMON)),
        "source_streamed": (  # nothing cached: second EK-FAC pass, scoring streams again
            "mlp_momentum",
            sourcekit.SourceAttributor(memory_limit=1, **COMMON),
        ),
        "source_diagonal": (
            "mlp_adam",
            sourcekit.SourceAttributor(curvature="diagonal", **COMMON),
        ),
        "source_float32": (
            "mlp_momentum",
            sourcekit.SourceAttributor(device="cpu", batch_size=4),
        ),
        "influence_ekfac": ("mlp_sgd", sourcekit.InfluenceAttributor(damping=1e-3, **COMMON)),
        "influence_exact": (
            "mlp_sgd",
            sourcekit.InfluenceAttributor(damping=1e-3, curvature="exact", **COMMON),
        ),
        "tracin": ("mlp_two_stage", sourcekit.TracInAttributor(**COMMON)),
        "trak": (
            "mlp_sgd",
            sourcekit.TRAKAttributor(projection_dim=16, checkpoints="all", **COMMON),
        ),
        "gradient_similarity": (
            "mlp_sgd",
            sourcekit.GradientSimilarityAttributor("cosine", **COMMON),
        ),
        "representation_similarity": (
            "mlp_sgd",
            sourcekit.RepresentationSimilarityAttributor(device="cpu", dtype="float64"),
        ),
        "unrolled": ("mlp_sgd", sourcekit.UnrolledAttributor(device="cpu")),
    }


def fitted(name: str) -> Any:
    case, attributor = attributors()[name]
    return attributor.fit(trajectory_of(case))


def scores_of(name: str) -> np.ndarray:
    return fitted(name).transform(queries_of(attributors()[name][0]))


def helper_checks(rank: int) -> dict[str, Any]:
    """The collectives on their own, with shards of unequal sizes."""
    found: dict[str, Any] = {}
    columns = np.array([0, 2, 3]) if rank == 0 else np.array([1, 4])
    local = torch.full((2, 5), float("nan"), dtype=torch.float64)
    local[:, columns] = torch.from_numpy(10.0 * np.arange(2)[:, None] + columns + 100 * rank)
    found["gathered"] = all_gather_columns(local, columns).tolist()
    sums = [torch.full((3,), float(rank + 1), dtype=torch.float64), torch.tensor([rank, 1])]
    all_reduce_sum(sums)
    found["sums"] = [t.tolist() for t in sums]
    found["agree"] = all_agree(rank == 0)
    try:  # ranks that transform different numbers of queries: every rank raises
        all_gather_columns(torch.zeros(2 + rank, 4), shard(np.arange(4)))
        found["shape_error"] = None
    except ValueError as error:
        found["shape_error"] = str(error)
    return found


def worker(out_dir: str) -> None:
    """One rank: the environment says which (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    # Imported after the group is created, torch._dynamo keeps gloo's threads alive past
    # destroy_process_group and the exit aborts (docs/cost.md, "Rules and pitfalls").
    import torch._dynamo
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    try:
        rank = dist.get_rank()
        results = {name: scores_of(name) for name in attributors() if name != "unrolled"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results["unrolled"] = scores_of("unrolled")
        fresh = sourcekit.SourceAttributor(random_state=None, **COMMON)
        results["fresh_seed"] = fresh.fit(_cases.trajectory("mlp_momentum")).transform(
            _cases.queries("mlp_momentum")
        )
        # A state cached on disk (memory=) by one rank only: the ranks agree to fit it.
        trajectory, queries = _cases.trajectory("mlp_momentum"), _cases.queries("mlp_momentum")
        memory = Path(out_dir) / "memory"
        results["memory_stored"] = (
            sourcekit.SourceAttributor(memory=memory, **COMMON).fit(trajectory).transform(queries)
        )
        clear_state_cache()
        where = memory if rank == 0 else Path(out_dir) / f"empty{rank}"
        results["memory_one_rank"] = (
            sourcekit.SourceAttributor(memory=where, **COMMON).fit(trajectory).transform(queries)
        )
        np.savez(Path(out_dir) / f"rank{rank}.npz", **results)
        checks = helper_checks(rank)
        checks["unrolled_warning"] = [str(w.message) for w in caught]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(checks))
        dist.barrier()  # no rank leaves while another is still exchanging
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


def launch(world: int, out_dir: Path) -> None:
    """Run :func:`worker` in ``world`` processes; fail with every rank's output if one fails."""
    port = _free_port()
    code = "import sys; from tests.test_distributed import worker; worker(sys.argv[1])"
    procs, logs = [], []
    try:
        for rank in range(world):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            }
            log = out_dir / f"rank{rank}.log"
            logs.append(log)
            with log.open("w") as handle:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", code, str(out_dir)],
                        cwd=ROOT,
                        env=env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break  # a rank died (the others would wait for it) or the run hangs
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if any(code != 0 for code in codes):
        report = "\n".join(
            f"--- rank {r} (exit {c}) ---\n{_tail(logs[r])}" for r, c in enumerate(codes)
        )
        pytest.fail(
            f"a rank failed or timed out after {TIMEOUT_S} s: exit codes {codes}\n{report}"
        )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[dict, dict]]:
    out = tmp_path_factory.mktemp("distributed")
    launch(WORLD, out)
    return [
        (dict(np.load(out / f"rank{r}.npz")), json.loads((out / f"rank{r}.json").read_text()))
        for r in range(WORLD)
    ]


def largest_eigenvalue(curvature: Any) -> float:
    if isinstance(curvature, DenseCurvature):
        return float(curvature.eigenvalues.max())
    return max(float(f.eigenvalues.max()) for f in curvature.factors.values())


def condition(attributor: Any) -> float:
    """κ of the module docstring: the amplification of a relative change of the curvature."""
    if isinstance(attributor, sourcekit.InfluenceAttributor):
        shift = attributor.damping + min(attributor._weight_decay().values())  # per block
        return 1 + largest_eigenvalue(attributor.state_.curvature) / shift
    if isinstance(attributor, sourcekit.TRAKAttributor):
        return max(
            1 + float(c.eigenvalues.max()) / attributor.damping_[c.step]
            for c in attributor.state_.checkpoints
        )
    if isinstance(attributor, sourcekit.SourceAttributor):
        kappas = []
        for segment in attributor.state_.segments:
            shift = attributor.damping + segment.weight_decay
            if segment.preconditioner is None:  # the residual (1 − e^{−sσ})/σ
                shift += 1 / segment.lr_sum
            kappas.append(1 + largest_eigenvalue(segment.curvature) / shift)
        return max(kappas)
    return 1.0


def bound(name: str) -> tuple[np.ndarray, float]:
    """The single-process scores and c·ε·κ·max|τ| (module docstring)."""
    case = attributors()[name][0]
    attributor = fitted(name)
    expected = attributor.transform(queries_of(case))
    trajectory = trajectory_of(case)
    n_params = sum(b.n_params for b in find_blocks(trajectory.build_model()))
    n_terms = trajectory.n_train * len(trajectory.checkpoint_steps) + n_params
    u = float(np.finfo(expected.dtype).eps)
    return expected, ULPS * n_terms * u * condition(attributor) * float(np.abs(expected).max())


# source_streamed's memory_limit=1 streams the training data once per query, as meant
@pytest.mark.filterwarnings("ignore::sourcekit.exceptions.PerformanceWarning")
@pytest.mark.parametrize("name", list(attributors()))
def test_every_rank_returns_the_scores_of_one_process(ranks, name):
    expected, tolerance = bound(name)
    for r, (scores, _) in enumerate(ranks):
        got = scores[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype
        worst = float(np.abs(got - expected).max())
        assert worst <= tolerance, f"rank {r}: max difference {worst:.3g} > bound {tolerance:.3g}"


def test_the_ranks_agree_exactly_and_draw_one_fresh_seed(ranks):
    (first, _), (second, _) = ranks
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_a_state_on_disk_is_reused_only_when_every_rank_has_it(ranks):
    for scores, _ in ranks:
        for name in ("memory_stored", "memory_one_rank"):
            np.testing.assert_array_equal(scores[name], scores["source_ekfac_true_fisher"])


def test_the_collectives_exchange_what_each_rank_holds(ranks):
    for rank, (_, checks) in enumerate(ranks):
        assert checks["gathered"] == [[0, 101, 2, 3, 104], [10, 111, 12, 13, 114]]
        assert checks["sums"] == [[3.0, 3.0, 3.0], [1, 2]]
        assert checks["agree"] is False
        assert "ranks' score matrices have shapes [(2, 4), (3, 4)]" in checks["shape_error"]
        assert len(checks["unrolled_warning"]) == 1, f"rank {rank}"
        assert "does not shard across the 2 ranks" in checks["unrolled_warning"][0]


@pytest.mark.parametrize("world", [2, 3, 5])
def test_every_stage_is_split_evenly_and_each_example_has_one_owner(world):
    stages = [np.arange(12), np.arange(0, 12, 2), np.array([3]), np.arange(4, 10)]
    owner = owners(12, stages, world_size=world)
    for stage in stages:
        parts = [shard(stage, owner, rank=r, world_size=world) for r in range(world)]
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), stage)
        sizes = [len(p) for p in parts]
        # one example of imbalance per group of examples sharing the same stages (here 4)
        assert max(sizes) - min(sizes) <= 4, sizes
        assert all((owner[p] == r).all() for r, p in enumerate(parts))
    assert max(np.bincount(owner, minlength=world)) - min(np.bincount(owner, minlength=world)) <= 1
    np.testing.assert_array_equal(shard(stages[1], owner), stages[1])  # no group: everything


def test_without_stages_the_owner_is_the_index_modulo_the_world_size():
    np.testing.assert_array_equal(owners(10, world_size=3), np.arange(10) % 3)
    np.testing.assert_array_equal(shard(np.arange(4, 12), rank=0, world_size=3), [6, 9])


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (-1, 2), (0, 0)])
def test_a_shard_of_an_impossible_rank_is_refused(rank, world):
    with pytest.raises(ValueError, match=rf"rank={rank}, world_size={world}"):
        shard(np.arange(4), rank=rank, world_size=world)
