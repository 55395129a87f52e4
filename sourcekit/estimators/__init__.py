"""Attributors: thin scikit-learn estimators over the scoring functions."""

from ._unrolled import UnrolledAttributor

__all__ = ["UnrolledAttributor"]
