"""Attributors: thin scikit-learn estimators over the scoring functions."""

from ._ensemble import EnsembleAttributor
from ._influence import InfluenceAttributor
from ._similarity import GradientSimilarityAttributor, RepresentationSimilarityAttributor
from ._source import SourceAttributor
from ._tracin import TracInAttributor
from ._trak import TRAKAttributor
from ._unrolled import UnrolledAttributor

__all__ = [
    "EnsembleAttributor",
    "GradientSimilarityAttributor",
    "InfluenceAttributor",
    "RepresentationSimilarityAttributor",
    "SourceAttributor",
    "TRAKAttributor",
    "TracInAttributor",
    "UnrolledAttributor",
]
