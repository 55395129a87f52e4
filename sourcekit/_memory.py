"""``memory_limit="auto"``: a byte budget from the memory the device has free now.

The attributors that keep factors and query blocks (SOURCE, influence functions, TracIn,
TRAK, gradient similarity) take ``memory_limit`` as a number of bytes or as ``"auto"``,
the default, which :func:`resolve_memory_limit` turns into bytes when ``fit`` runs:

- on a GPU, half of the device's free memory (``torch.cuda.mem_get_info``): the other
  half is left to the working set of the passes, the score matrix and the curvature,
  which ``memory_limit`` does not bound;
- on a CPU, a quarter of the memory the operating system reports available
  (``MemAvailable`` in ``/proc/meminfo`` on Linux, free pages elsewhere), at most 1 GiB.
  The cap is measured, not cautious: on a CPU, keeping more factors made a single fit
  and transform slower in ``benchmarks/scale.py`` (docs/cost.md gives the figures),
  since writing them to fresh memory costs about as much as the passes they save. A
  larger budget pays when ``transform`` is repeated (a damping search) or when the
  queries would not fit in one block, and ``PerformanceWarning`` names the budget that
  would;
- 1 GiB where neither can be read.

Under ``torch.distributed`` every rank takes the smallest of the ranks' budgets, so that
all of them split their queries into the same blocks and run the same collectives.
The fitted attributor records the bytes it used as ``memory_limit_``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ._distributed import smallest_int

__all__ = ["AUTO", "FALLBACK_BYTES", "available_bytes", "resolve_memory_limit"]

AUTO = "auto"
FALLBACK_BYTES = 2**30
_CPU_CAP = 2**30
# The share of the free memory "auto" takes: device memory is the attributor's own,
# host memory is shared with the rest of the process and with other programs.
_CUDA_SHARE = 2
_CPU_SHARE = 4


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (None where it cannot be read)."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except (RuntimeError, AssertionError):
            return None
        return int(free)
    if device.type != "cpu":
        return None
    available = _meminfo_available()
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return int(available)


def resolve_memory_limit(memory_limit: Any, device: torch.device) -> int:
    """The byte budget that ``memory_limit`` (an int, or ``"auto"``) means on ``device``.

    Examples
    --------
    >>> import torch
    >>> from sourcekit._memory import resolve_memory_limit
    >>> resolve_memory_limit(2**20, torch.device("cpu"))
    1048576
    >>> resolve_memory_limit("auto", torch.device("cpu")) > 0
    True
    """
    if memory_limit != AUTO:
        return int(memory_limit)
    free = available_bytes(device)
    if free is None:
        budget = FALLBACK_BYTES
    elif device.type == "cuda":
        budget = max(1, free // _CUDA_SHARE)
    else:
        budget = max(1, min(_CPU_CAP, free // _CPU_SHARE))
    return smallest_int(budget)
