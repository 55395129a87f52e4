"""SOURCE spread over several processes with torch.distributed: one per GPU, or CPU processes.

The attributors need nothing new to run on several GPUs or machines: start the script
with ``torchrun`` and initialise the default process group. Every rank then streams its
own shard of the training examples (for this one-stage run, the examples m with
m % world_size == rank), the curvature sums are added up over the ranks, and the score
columns are exchanged, so that ``transform`` returns the whole (n_queries, n_train)
matrix on every rank.

    python examples/distributed_attribution.py                        # one process
    torchrun --nproc_per_node=2 examples/distributed_attribution.py   # 2 processes, this machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 examples/distributed_attribution.py

Without torchrun (no RANK or WORLD_SIZE in the environment) it runs in one process, the
same code path without communication, and gives the same scores up to rounding. With
CUDA each rank uses the GPU numbered by its LOCAL_RANK and the NCCL backend; without,
the CPU and gloo.

The trajectory must be readable by every rank. Here rank 0 records it and saves it to a
directory before the process group is set up, and every rank loads it: by default a
folder in the system's temporary directory, named after the launching process (the same
for every rank on this machine) and removed at the end; across machines, set
``SOURCEKIT_TRAJECTORY`` to a path on a shared filesystem (or copy the saved directory to
the same path on every node first), which is then kept.
Recording first also keeps the optimiser's lazy import of ``torch._dynamo`` out of the
process group's lifetime (with gloo, a group created before that import can outlive
``destroy_process_group`` and abort the process on exit).
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import sourcekit

launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
rank = int(os.environ.get("RANK", 0))

# 1. One rank records the run and saves it where every rank can read it.
task = sourcekit.datasets.load_digits_task()
given = os.environ.get("SOURCEKIT_TRAJECTORY")
# Without a path, a temporary folder shared by this machine's ranks (torchrun is their
# common parent process), removed at the end.
directory = (
    Path(given)
    if given
    else Path(tempfile.gettempdir())
    / f"sourcekit-distributed-{os.getppid() if launched else os.getpid()}"
)
if rank == 0 and not (directory / "manifest.json").exists():
    task.record("early", progress=False).save(directory)

if launched:
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per rank
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dist.barrier()  # the other ranks wait here until rank 0 has saved the trajectory
world = dist.get_world_size() if launched else 1

try:
    trajectory = sourcekit.Trajectory.load(directory)

    # 2. Fit and transform as in one process: each rank streams only its shard.
    source = sourcekit.SourceAttributor(n_segments=3, damping=1e-3).fit(trajectory)
    queries = task.test[:6]
    scores = source.transform(queries)  # (6, 1437) on every rank

    shard = len(range(rank, trajectory.n_train, world))  # the examples m with m % world == rank
    print(
        f"rank {rank} of {world}: streamed {shard} of {trajectory.n_train} training examples "
        f"per checkpoint, holds scores of shape {scores.shape}, sum {scores.sum():.6f}"
    )
    if rank == 0:
        labels = trajectory.train.targets.numpy()
        for q, row in enumerate(scores):
            top = row.argsort()[::-1][:5]
            print(
                f"test digit {q} (label {int(queries.targets[q])}): proponents {top.tolist()} "
                f"with labels {labels[top].tolist()}"
            )
finally:
    if launched:
        dist.barrier()  # nobody leaves while another rank still exchanges scores
        dist.destroy_process_group()
    if rank == 0 and not given:
        shutil.rmtree(directory, ignore_errors=True)
