"""Defaults of the feature maps, declared once and torch-free, so the command line, the demo and the web page
state them without loading the engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MapDefaults:
    components: int = 3  # principal components of a PCA map; the first three are its colours
    clusters: int = 8  # k-means regions of a cluster map
    seed: int = 0  # seeds the token subsample of PCA and k-means, and k-means itself
    sample: int = 20000  # at most this many patch tokens fit PCA and k-means


MAP_DEFAULTS = MapDefaults()
