"""Attributors: thin scikit-learn estimators over the scoring functions."""

from ._influence import InfluenceAttributor
from ._source import SourceAttributor
from ._unrolled import UnrolledAttributor

__all__ = ["InfluenceAttributor", "SourceAttributor", "UnrolledAttributor"]
