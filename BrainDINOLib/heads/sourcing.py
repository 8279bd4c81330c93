"""The features heads are fitted and evaluated on, from the one feature owner: a `FeatureSession` embeds (with its
caches), or a cohort `FeatureStore` made by `embed-cohort` serves what it holds. Subjects become bags of slice
tokens, one per modality (`SubjectData`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..features import VolumeFeatures
from ..manifest import Manifest
from ..session import FeatureSession
from ..volume import read_volume
from .head import Head
from .subject import Bag, slice_tokens

if TYPE_CHECKING:  # the cohort package imports its torch data loading; heads need the store's type only
    from ..cohort.store import FeatureStore


@dataclass
class FeatureSource:
    """Features of manifest images from one `FeatureSession`, with the encoder blocks a head reads; with `store`
    (made by `embed-cohort`), read from it instead of embedded (it must hold the session's model, preprocessing,
    resolution and those blocks)."""

    session: FeatureSession
    layers: tuple[int, ...] = ()
    progress: Callable[[int, int], None] | None = None
    cancel: Callable[[], bool] | None = None
    store: FeatureStore | None = None

    def __post_init__(self) -> None:
        if self.store is not None:
            self.store.check_serves(self.session, self.layers)

    @classmethod
    def for_head(cls, head: Head, session: FeatureSession, **kwargs) -> FeatureSource:
        """The features a saved head reads: its encoder (checked) and blocks."""
        head.card.check_encoder(session.encoder.model_id, session.encoder.checkpoint.path)
        return cls(session, tuple(head.card.layers), **kwargs)

    def __call__(self, path: str | Path) -> VolumeFeatures:
        if self.store is not None:
            return self.store.features(path, self.layers)
        return self.session.features(read_volume(path), self.layers, cancel=self.cancel)


@dataclass
class SubjectData:
    """Subjects ready for fitting or evaluation: bags of slice tokens and the encoded targets."""

    bags: list[Bag]
    y: np.ndarray  # class index / target / time
    event: np.ndarray | None = None

    def take(self, index: np.ndarray) -> SubjectData:
        return SubjectData([self.bags[i] for i in index], self.y[index],
                           None if self.event is None else self.event[index])


def subject_bags(manifest: Manifest, rows: Sequence[int], columns: Sequence[str], source: FeatureSource) -> list[Bag]:
    """One bag per manifest row: the slice tokens of its image in each of `columns` (progress per row)."""
    bags = []
    for n, i in enumerate(rows):
        bags.append([slice_tokens(source(manifest.resolve(manifest.rows[i][c]))) for c in columns])
        if source.progress:
            source.progress(n + 1, len(rows))
    return bags
