"""Sharding the training set over ``torch.distributed`` ranks, and the few collectives it needs.

When a process group is initialised (``torchrun`` and ``dist.init_process_group``), the
attributors that stream the training set split it over the ranks: every training
example has one owning rank (:func:`owners`, balanced within every stage), which
streams it in every stage and at every checkpoint (:func:`shard`). The seams are:

- covariance sums and the counts that normalise them are summed over the ranks before
  they are divided or eigendecomposed (:func:`all_reduce_sum`), so every rank holds the
  same curvature;
- every rank scores its own columns of the (n_queries, n_train) matrix and the columns
  are exchanged (:func:`all_gather_columns`), so every rank returns the whole matrix.

Without a process group, or with a single rank, :func:`rank` is 0, :func:`world_size`
is 1, :func:`shard` returns every index and the collectives do nothing: the
single-process computation is the same code path with no communication.

Collectives run on the CPU for gloo (and MPI, UCC) and on the current CUDA device for
NCCL, whatever device the tensors live on; results are copied back in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "all_agree",
    "all_gather_columns",
    "all_reduce_sum",
    "broadcast_int",
    "is_distributed",
    "is_main",
    "local_examples",
    "owners",
    "rank",
    "shard",
    "smallest_int",
    "world_size",
]


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _group_size() -> int:
    return dist.get_world_size() if _initialised() else 1


def _group_rank() -> int:
    return dist.get_rank() if _initialised() else 0


def world_size() -> int:
    """The number of ranks of the default process group (1 without one).

    Examples
    --------
    >>> from sourcekit._distributed import world_size
    >>> world_size()  # no process group in this process
    1
    """
    return _group_size()


def rank() -> int:
    """This process's rank in the default process group (0 without one).

    Examples
    --------
    >>> from sourcekit._distributed import rank
    >>> rank()
    0
    """
    return _group_rank()


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised.

    Examples
    --------
    >>> from sourcekit._distributed import is_distributed
    >>> is_distributed()
    False
    """
    return world_size() > 1


def is_main() -> bool:
    """Whether this is rank 0 (the process that shows progress bars).

    Examples
    --------
    >>> from sourcekit._distributed import is_main
    >>> is_main()
    True
    """
    return rank() == 0


def owners(
    n_train: int, stages: Sequence[np.ndarray] = (), *, world_size: int | None = None
) -> np.ndarray:
    """The rank that streams each training example, balanced within every stage.

    The examples are grouped by the set of stages they belong to (for two stages: the
    first only, the second only, both, neither); taken group by group in index order,
    they are dealt to the ranks in turn. Every group, hence every stage (a union of
    groups), and the whole training set are split evenly up to one example per group,
    whatever the stages' index patterns (contiguous ranges, random subsets, every other
    example), and an example of several stages is owned by one rank in all of them, so
    its score column is computed in one place. With a single group the owner of
    example m is m % world_size.

    Parameters
    ----------
    n_train : int
        Number of training examples.
    stages : sequence of int arrays, optional
        The examples of each stage.
    world_size : int, optional
        Default: that of the initialised process group (1 without one).

    Returns
    -------
    ndarray of int, shape (n_train,)
        The owning rank of every example.

    Examples
    --------
    >>> import numpy as np
    >>> from sourcekit._distributed import owners
    >>> owners(6, world_size=4).tolist()
    [0, 1, 2, 3, 0, 1]
    >>> # stage 0: every example, stage 1: the even ones; both stay balanced over 2 ranks
    >>> owner = owners(8, [np.arange(8), np.arange(0, 8, 2)], world_size=2)
    >>> owner.tolist()
    [0, 0, 1, 1, 0, 0, 1, 1]
    >>> np.bincount(owner[::2]).tolist(), np.bincount(owner).tolist()
    ([2, 2], [4, 4])
    """
    w = _group_size() if world_size is None else int(world_size)
    if w < 1:
        raise ValueError(
            f"The 'world_size' must be at least 1; got {w}. Pass the process group's size, or "
            "nothing to read it from torch.distributed."
        )
    signature = np.zeros(n_train, dtype=object if len(stages) > 62 else np.int64)
    for s, examples in enumerate(stages):
        signature[np.asarray(examples, dtype=np.int64)] += 1 << s
    _, group = np.unique(signature, return_inverse=True)
    order = np.lexsort((np.arange(n_train), group.reshape(-1)))  # by group, then by index
    owner = np.empty(n_train, dtype=np.int64)
    owner[order] = np.arange(n_train) % w
    return owner


def shard(
    indices: np.ndarray,
    owner: np.ndarray | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> np.ndarray:
    """The examples of ``indices`` that this rank streams.

    Parameters
    ----------
    indices : ndarray of int
        Training-example indices (a stage's examples, or ``arange(n_train)``).
    owner : ndarray of int, optional
        The owning rank of every training example (:func:`owners`); default: example m
        belongs to rank m % world_size.
    rank, world_size : int, optional
        Default: those of the initialised process group (0 and 1 without one).

    Returns
    -------
    ndarray of int
        The entries of ``indices`` owned by ``rank``, in their order.

    Examples
    --------
    >>> import numpy as np
    >>> from sourcekit._distributed import owners, shard
    >>> shard(np.arange(7), rank=1, world_size=3)
    array([1, 4])
    >>> owner = owners(8, [np.arange(8), np.arange(0, 8, 2)], world_size=2)
    >>> shard(np.arange(0, 8, 2), owner, rank=1, world_size=2)  # the second stage, rank 1
    array([2, 6])
    >>> shard(np.arange(5)).tolist()  # one process: everything
    [0, 1, 2, 3, 4]
    """
    r = _group_rank() if rank is None else int(rank)
    w = _group_size() if world_size is None else int(world_size)
    if w < 1 or not 0 <= r < w:
        raise ValueError(
            f"A shard needs 0 <= rank < world_size; got rank={r}, world_size={w}. Pass the "
            "process group's rank and size (or neither, to read them from torch.distributed)."
        )
    indices = np.asarray(indices, dtype=np.int64)
    if w == 1:
        return indices
    mine = owner[indices] == r if owner is not None else indices % w == r
    return indices[mine]


class _Stage(Protocol):
    @property
    def examples(self) -> np.ndarray: ...


class _Run(Protocol):
    """What :func:`local_examples` reads of a trajectory."""

    @property
    def fingerprint(self) -> str: ...
    @property
    def n_train(self) -> int: ...
    @property
    def stages(self) -> Sequence[_Stage]: ...


# The owner of every training example, per (trajectory fingerprint, world size): the
# one table of this module that outlives a call (see docs/architecture.md).
_OWNERS: dict[tuple[str, int], np.ndarray] = {}


def local_examples(trajectory: _Run, indices: np.ndarray) -> np.ndarray:
    """The examples of ``indices`` that this rank streams (all of them in one process).

    Ownership is balanced within every stage of the trajectory (:func:`owners`) and is
    the same in all of them; it is computed once per trajectory and world size.

    Examples
    --------
    >>> import numpy as np
    >>> import sourcekit
    >>> from sourcekit._distributed import local_examples
    >>> task = sourcekit.datasets.load_digits_task()
    >>> trajectory = task.record("early", progress=False)
    >>> local_examples(trajectory, np.arange(5))  # one process: every example
    array([0, 1, 2, 3, 4])
    """
    w = world_size()
    if w == 1:
        return np.asarray(indices, dtype=np.int64)
    key = (trajectory.fingerprint, w)
    if key not in _OWNERS:
        if len(_OWNERS) >= 4:
            _OWNERS.pop(next(iter(_OWNERS)))
        _OWNERS[key] = owners(trajectory.n_train, [s.examples for s in trajectory.stages])
    return shard(indices, _OWNERS[key])


def _comm_device(device: torch.device) -> torch.device:
    """Where the default group's backend exchanges tensors that live on ``device``."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if "cuda:" in backend:  # a per-device mapping such as "cpu:gloo,cuda:nccl"
        return device
    return torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one collective per dtype).

    Every rank must pass tensors of the same shapes and dtypes, in the same order.
    Without a process group, or with one rank, nothing happens.

    Parameters
    ----------
    tensors : sequence of tensors
        Partial sums over this rank's shard (on any device); on return they hold the
        sums over all ranks.

    Examples
    --------
    >>> import torch
    >>> from sourcekit._distributed import all_reduce_sum
    >>> sums = [torch.ones(2, 2, dtype=torch.float64), torch.tensor([3])]
    >>> all_reduce_sum(sums)  # one process: unchanged
    >>> sums[1]
    tensor([3])
    """
    if not is_distributed() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        comm = _comm_device(group[0].device)
        flat = torch.cat([t.detach().reshape(-1).to(comm) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        start = 0
        for t in group:
            t.copy_(flat[start : start + t.numel()].view_as(t))
            start += t.numel()


def all_gather_columns(local: torch.Tensor, columns: np.ndarray) -> torch.Tensor:
    """Fill every rank's columns of a (rows, n) matrix from the rank that computed them.

    Each rank passes its matrix, correct in ``columns`` (its shard) and arbitrary
    elsewhere; the (rows, len(columns)) blocks and their column indices are exchanged
    and written into ``local``, which is returned holding every rank's columns (a column
    no rank owns is left as it was). With one rank, ``local`` is returned unchanged: it
    then holds every column already.

    Parameters
    ----------
    local : tensor of shape (rows, n)
        This rank's matrix (e.g. scores: queries by training examples).
    columns : ndarray of int
        The columns this rank computed; ranks must not overlap.

    Returns
    -------
    tensor of shape (rows, n)
        ``local``, filled in.

    Raises
    ------
    ValueError
        If the ranks' matrices differ in shape (for scores: the ranks transformed
        different numbers of queries); every rank raises it.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from sourcekit._distributed import all_gather_columns
    >>> all_gather_columns(torch.arange(6.0).reshape(2, 3), np.arange(3))
    tensor([[0., 1., 2.],
            [3., 4., 5.]])
    """
    if not is_distributed():
        return local
    w = world_size()
    comm = _comm_device(local.device)
    columns = np.asarray(columns, dtype=np.int64)
    shape = torch.tensor([local.shape[0], local.shape[1], len(columns)], device=comm)
    shapes = [torch.empty_like(shape) for _ in range(w)]
    dist.all_gather(shapes, shape)
    table = torch.stack(shapes).cpu().tolist()
    if any(tuple(s[:2]) != tuple(table[0][:2]) for s in table):
        raise ValueError(
            "Every rank must score the same queries against the same training set, but the "
            f"ranks' score matrices have shapes {[tuple(s[:2]) for s in table]} (by rank). "
            "Pass the same queries to transform on every rank."
        )
    width = max(s[2] for s in table)
    index = torch.full((width,), -1, dtype=torch.int64)
    index[: len(columns)] = torch.from_numpy(columns)
    block = torch.zeros(local.shape[0], width, dtype=local.dtype, device=comm)
    block[:, : len(columns)] = local[:, torch.from_numpy(columns).to(local.device)].to(comm)
    indices = [torch.empty_like(index.to(comm)) for _ in range(w)]
    blocks = [torch.empty_like(block) for _ in range(w)]
    dist.all_gather(indices, index.to(comm))
    dist.all_gather(blocks, block)
    for r, (idx, values) in enumerate(zip(indices, blocks, strict=True)):
        if r == rank():
            continue
        n = table[r][2]
        local[:, idx[:n].to(local.device)] = values[:, :n].to(local.device)
    return local


def _int_tensor(value: int) -> torch.Tensor:
    """``value`` as a one-element int64 tensor where the default group exchanges it."""
    return torch.tensor([int(value)], dtype=torch.int64, device=_comm_device(torch.device("cpu")))


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (e.g. a freshly drawn seed); ``value`` alone without a group.

    Examples
    --------
    >>> from sourcekit._distributed import broadcast_int
    >>> broadcast_int(7)
    7
    """
    if not is_distributed():
        return int(value)
    t = _int_tensor(value)
    dist.broadcast(t, src=src)
    return int(t.item())


def smallest_int(value: int) -> int:
    """The smallest of the ranks' ``value`` on every rank (``value`` alone without a group).

    Examples
    --------
    >>> from sourcekit._distributed import smallest_int
    >>> smallest_int(5)
    5
    """
    if not is_distributed():
        return int(value)
    t = _int_tensor(value)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank (``flag`` itself without a group).

    Ranks use it to take the same branch when a branch decides which collectives run
    (e.g. loading a cached state on every rank, or fitting it on every rank).

    Examples
    --------
    >>> from sourcekit._distributed import all_agree
    >>> all_agree(True)
    True
    """
    return bool(smallest_int(int(bool(flag))))
