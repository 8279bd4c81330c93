"""How a volume is prepared for the encoder (`PreprocessConfig`): a model's card, a head's card and every
feature-cache key carry it. Torch- and SimpleITK-free, so cards are read without them (`slices.py` applies it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PreprocessConfig:
    """How a volume's intensities and in-plane crop are prepared. Part of every feature-cache key.

    (How finely it is embedded is the `ResolutionPolicy`'s business.)"""

    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    margin_mm: float = 8.0
    min_slice_foreground: float = 0.05  # skip slices whose foreground area is below this fraction of the largest
    min_foreground_voxels: int = 512  # less than this is noise, not a head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        """Read a config; `image_size`, part of it in cards written before the resolution policy, is ignored."""
        data = {k: v for k, v in data.items() if k != "image_size"}
        if "clip_percentiles" in data:
            data["clip_percentiles"] = tuple(data["clip_percentiles"])
        return cls(**data)
