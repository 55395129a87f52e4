"""Subnormal floating-point numbers, flushed to zero while sourcekit computes on a CPU.

A trained model's gradients hold subnormal numbers (below 1.2e-38 in float32): output
gradients of confident softmax predictions underflow into that range, and so do products
of small curvature eigenvalues and rotations. x86 CPUs handle arithmetic on them in
microcode, tens of times slower than on normal numbers; measured on the benchmark conv
net (``benchmarks/scale.py``), the 1 % of subnormal entries in its output gradients and
preconditioned queries made the score contraction 4 times slower and the Fisher passes'
backward pass 4 times slower. GPUs handle them at full speed.

``flushing_denormals()`` sets the CPU's flush-to-zero and denormals-are-zero modes
(``torch.set_flush_denormal``) for the duration of a block and restores the previous
mode afterwards. A flushed number is replaced by zero, so every result moves by at most
the smallest normal number (1.2e-38 in float32, 2.2e-308 in float64) per term of a sum,
far below the rounding of any score.

The mode belongs to a thread. PyTorch sets it on the calling thread, and new threads
(its pool of intra-op worker threads among them) start with their creator's mode: when a
program sets ``torch.set_flush_denormal(True)`` before its first parallel torch
operation, all of torch's CPU threads flush; otherwise only the calling thread does, and
with several intra-op threads (``torch.set_num_threads``) the others keep the slow path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["flushes_denormals", "flushing_denormals"]

# The smallest positive float64: subnormal, so it reads as zero in the flushing modes.
_SUBNORMAL = 5e-324


def flushes_denormals() -> bool:
    """Whether the calling thread flushes subnormal numbers to zero now."""
    return float(torch.tensor(_SUBNORMAL, dtype=torch.float64) * 1.0) == 0.0


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """Flush subnormal numbers to zero on the calling thread inside the block.

    Does nothing where the CPU has no such mode (``torch.set_flush_denormal`` returns
    False) or where the thread flushes already; otherwise the previous mode is restored
    on exit, even on error.
    """
    if flushes_denormals() or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
