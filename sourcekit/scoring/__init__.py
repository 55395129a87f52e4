"""Scoring kernels: tensors in, tensors out."""

from ._unrolled import unrolled_scores

__all__ = ["unrolled_scores"]
