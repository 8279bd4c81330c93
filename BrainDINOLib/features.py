"""`VolumeFeatures`: per-slice tokens of one volume under one model, savable, and mappable back to voxels."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .atomic import atomic_path
from .errors import BrainDINOError
from .slices import PreprocessConfig, SliceGeometry, crop_box
from .volume import Geometry, Volume

FORMAT_VERSION = 1
CHECKSUM_KEY = "braindino_content_sha256"


def content_checksum(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes: a damaged features file or cache entry whose
    header still parses is caught on reading (about 0.1 s per 150 MB)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def verify_checksum(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Raise `BrainDINOError` unless `tensors` match the checksum stored in the file's metadata."""
    stored = metadata.get(CHECKSUM_KEY)
    if stored is None:
        raise BrainDINOError(path, "has no content checksum (written by an older BrainDINO); compute it again")
    if content_checksum(tensors) != stored:
        raise BrainDINOError(path, "is damaged: its tensor data do not match the checksum stored with them")


@dataclass
class VolumeFeatures:
    """Tokens of every embedded slice: cls [S, D], patches [S, h, w, D], layers {i: [S, h, w, D]}.

    Stored in fp16 (halves disk and memory; cosine similarities and heads are insensitive to it). Carries
    the slice geometry and the volume's geometry, so per-patch maps become `Volume`s on the input grid
    without the original file.
    """

    cls: Tensor
    patches: Tensor
    slices: SliceGeometry
    geometry: Geometry
    stored: Geometry
    model_id: str
    preprocessing: PreprocessConfig
    foreground: np.ndarray  # bool [Z, Y, X], canonical grid
    layers: dict[int, Tensor] = field(default_factory=dict)
    source: str = ""

    @property
    def num_slices(self) -> int:
        return self.cls.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.slices.grid

    def patch_foreground(self) -> Tensor:
        """Fraction of each patch's voxels inside the foreground mask, [S, h, w] float32."""
        mask = self.foreground[np.asarray(self.slices.slice_indices)].astype(np.float32)
        box = torch.from_numpy(crop_box(mask, self.slices.box))[:, None]
        return torch.nn.functional.adaptive_avg_pool2d(box, self.grid)[:, 0]

    def to_volume(self, per_patch: Tensor | np.ndarray, mode: str = "bilinear", fill: float = 0.0) -> Volume:
        """Upsample a per-patch map [S, h, w(, K)] to a float32 `Volume` on the input's grid."""
        array = self.slices.upsample(per_patch, mode=mode, fill=fill)
        return Volume(array, self.geometry, self.stored, self.source)

    def empty_volume(self, dtype: np.dtype = np.float32) -> Volume:
        """A zero volume on the input's grid (for label maps assembled voxel-wise)."""
        return Volume(np.zeros(self.slices.volume_shape, dtype), self.geometry, self.stored, self.source)

    # ---- persistence -------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, str]:
        info = {"format_version": FORMAT_VERSION, "model_id": self.model_id, "source": self.source,
                "slices": self.slices.to_dict(), "geometry": asdict(self.geometry), "stored": asdict(self.stored),
                "preprocessing": self.preprocessing.to_dict(), "foreground_shape": list(self.foreground.shape)}
        return {"braindino_features": json.dumps(info)}

    def save(self, path: str | Path) -> Path:
        """Write atomically as one safetensors file (tensors + JSON metadata in its header)."""
        tensors = {"cls": self.cls, "patches": self.patches,
                   "foreground": torch.from_numpy(np.packbits(self.foreground.ravel()))}
        tensors.update({f"layer.{i}": t for i, t in self.layers.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={**self._metadata(), CHECKSUM_KEY: content_checksum(tensors)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> VolumeFeatures:
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                metadata = header.get("braindino_features")
                if metadata is None:
                    raise BrainDINOError(path, "not a BrainDINO features file (no feature metadata)")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise BrainDINOError(path, f"not a readable features file ({error})") from None
        verify_checksum(path, tensors, header)
        info = json.loads(metadata)
        if info.get("format_version") != FORMAT_VERSION:
            raise BrainDINOError(path, f"features format {info.get('format_version')} is not {FORMAT_VERSION}")
        shape = tuple(info["foreground_shape"])
        foreground = np.unpackbits(tensors["foreground"].numpy(), count=int(np.prod(shape))).reshape(shape).astype(bool)
        geometry = {k: Geometry(**{f: tuple(v) for f, v in info[k].items()}) for k in ("geometry", "stored")}
        return cls(cls=tensors["cls"], patches=tensors["patches"],
                   slices=SliceGeometry.from_dict(info["slices"]), geometry=geometry["geometry"],
                   stored=geometry["stored"], model_id=info["model_id"],
                   preprocessing=PreprocessConfig.from_dict(info["preprocessing"]), foreground=foreground,
                   layers={int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("layer.")},
                   source=info.get("source", ""))
