"""`VolumeFeatures`: per-slice tokens of one volume under one model, savable, and mappable back to voxels.

Tokens exist for the embedded axial slices only (every n-th slice, as the `ResolutionPolicy` chose); every
slice between two embedded ones has features too, interpolated linearly between them (`tokens_at`). A map
is computed from those features at grid resolution, a few channels at a time, and only then upsampled to
the voxels (`map_volume`), guided by the image when the policy says so.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .atomic import atomic_path
from .errors import BrainDINOError, CancelledError
from .resolution import ResolutionPolicy
from .slices import PreprocessConfig, SliceGeometry, SliceStack, crop_box
from .upsample import InplaneUpsampler, cell_means, interpolate_slices
from .volume import Geometry, Volume

FORMAT_VERSION = 2
CHECKSUM_KEY = "braindino_content_sha256"
# Voxel slices whose cell maps are computed and upsampled at once (bounds memory for large volumes).
MAP_CHUNK = 16

CellMaps = Callable[[Sequence[int]], Tensor]  # voxel slices -> per-cell maps [n, K, gh, gw]


@dataclass(frozen=True)
class Planes:
    """Planes of a volume's canonical voxel grid: axial slices k, coronal rows j, sagittal columns i (what
    the three slice views of a viewer show)."""

    axial: tuple[int, ...] = ()
    coronal: tuple[int, ...] = ()
    sagittal: tuple[int, ...] = ()


@dataclass(frozen=True)
class VoxelMapping:
    """How per-cell maps of a volume's embedded slices land on its voxels: the slice geometry, the upsampling
    guide and method, and the volume's own geometry (so results are `Volume`s on the input grid)."""

    slices: SliceGeometry
    guide: np.ndarray  # uint8 [Z, box rows, box cols], see slices.quantise_guide
    upsampling: str
    geometry: Geometry
    stored: Geometry
    source: str = ""

    @classmethod
    def of_stack(cls, stack: SliceStack, volume: Volume, upsampling: str) -> VoxelMapping:
        """How maps of `volume`'s model-ready slices `stack` land on its voxels, with or without features."""
        return cls(stack.geometry, stack.guide, upsampling, volume.geometry, volume.stored, volume.source)

    @property
    def covered(self) -> range:
        return self.slices.covered

    def upsampler(self, upscale: int = 1, keep_weights_mib: float = 0.0) -> InplaneUpsampler:
        """The in-plane upsampler of these features' policy (bilinear or guided by the image); one that maps
        many maps of these features keeps its guided weights up to `keep_weights_mib` (see `InplaneUpsampler`)."""
        return InplaneUpsampler(self.slices, self.guide, self.upsampling, upscale, keep_weights_mib=keep_weights_mib)

    def map_volume(self, cell_maps: CellMaps, upscale: int = 1, fill: float = 0.0,
                   reduce: Callable[[Tensor], Tensor] | None = None, squeeze: bool = False,
                   upsampler: InplaneUpsampler | None = None, cancel: Callable[[], bool] | None = None) -> Volume:
        """Compute a map slice by slice: `cell_maps(voxel slices)` gives [n, K, gh * upscale, gw * upscale] per
        voxel slice of `covered`; each is upsampled to the voxels (by `upsampler`, else a new one of the policy)
        and, if given, `reduce`d ([n, K, rows, cols] -> [n, rows, cols], e.g. an arg-max). A float32 (or
        `reduce`'s dtype) `Volume` [Z, Y, X, K] ([Z, Y, X] with `reduce` or `squeeze` of a one-channel map) on the
        input grid; voxels without features (slices outside `covered`, outside the box) hold `fill`.
        `CancelledError` as soon as `cancel()` says so (checked between chunks of slices)."""
        upsample = upsampler or self.upsampler(upscale)
        _, _, rows, cols = self.slices.window()
        covered = list(self.covered)
        out = None
        for start in range(0, len(covered), MAP_CHUNK):
            if cancel is not None and cancel():
                raise CancelledError(self.source or "map")
            chunk = covered[start:start + MAP_CHUNK]
            voxels = upsample(cell_maps(chunk), chunk)
            voxels = reduce(voxels) if reduce is not None else voxels.permute(0, 2, 3, 1)
            if out is None:
                shape = (*self.slices.volume_shape, *voxels.shape[3:])
                out = np.full(shape, fill, dtype=voxels.numpy().dtype)
            out[chunk[0]:chunk[-1] + 1, rows, cols] = voxels.numpy()
        if squeeze:
            out = out[..., 0]
        return Volume(out, self.geometry, self.stored, self.source)

    def map_planes(self, cell_maps: CellMaps, planes: Planes, upsampler: InplaneUpsampler | None = None,
                   fill: float = 0.0) -> Volume:
        """A one-channel map on some planes only: the voxels of `map_volume(cell_maps, squeeze=True)` on `planes`
        (equal to them), `fill` everywhere else. A viewer's three planes cost a small part of the whole volume."""
        upsample = upsampler or self.upsampler()
        _, _, rows, cols = self.slices.window()
        out = np.full(self.slices.volume_shape, fill, dtype=np.float32)
        axial = [k for k in planes.axial if k in self.covered]
        if axial:
            out[axial, rows, cols] = upsample(cell_maps(axial), axial)[:, 0].numpy()
        lines = [(j - rows.start, None) for j in planes.coronal if rows.start <= j < rows.stop] + \
                [(None, i - cols.start) for i in planes.sagittal if cols.start <= i < cols.stop]
        if not lines:
            return Volume(out, self.geometry, self.stored, self.source)
        covered = list(self.covered)
        cells = cell_maps(covered)
        for row, col in lines:
            if row is not None:
                values = upsample(cells, covered, rows=slice(row, row + 1))[:, 0, 0]
                out[covered[0]:covered[-1] + 1, rows.start + row, cols] = values.numpy()
            else:
                values = upsample(cells, covered, cols=slice(col, col + 1))[:, 0, :, 0]
                out[covered[0]:covered[-1] + 1, rows, cols.start + col] = values.numpy()
        return Volume(out, self.geometry, self.stored, self.source)

    def to_volume(self, per_slice: Tensor | np.ndarray, fill: float = 0.0) -> Volume:
        """A map of the embedded slices [S, h, w(, K)] -> float32 `Volume` [Z, Y, X(, K)]: interpolated across
        slices, then upsampled in-plane by the policy's method."""
        maps = per_slice if isinstance(per_slice, Tensor) else torch.from_numpy(np.asarray(per_slice, np.float32))
        squeeze = maps.ndim == 3
        maps = (maps[..., None] if squeeze else maps).permute(0, 3, 1, 2).float()
        if maps.shape[0] != len(self.slices.slice_indices) or tuple(maps.shape[2:]) != self.slices.grid:
            raise ValueError(f"per-slice map of shape {tuple(per_slice.shape)} does not match "
                             f"{len(self.slices.slice_indices)} slices of grid {self.slices.grid}")
        return self.map_volume(lambda ks: interpolate_slices(maps, self.slices, ks), fill=fill, squeeze=squeeze)


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
    the slice geometry, the volume's geometry, the resolution policy and the upsampling guide, so maps
    become `Volume`s on the input grid without the original file.
    """

    cls: Tensor
    patches: Tensor
    slices: SliceGeometry
    geometry: Geometry
    stored: Geometry
    model_id: str
    preprocessing: PreprocessConfig
    foreground: np.ndarray  # bool [Z, Y, X], canonical grid
    guide: np.ndarray  # uint8 [Z, box rows, box cols], see slices.quantise_guide
    policy: ResolutionPolicy = field(default_factory=ResolutionPolicy)
    layers: dict[int, Tensor] = field(default_factory=dict)
    source: str = ""

    @property
    def num_slices(self) -> int:
        return self.cls.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.slices.grid

    @property
    def covered(self) -> range:
        """Voxel slices that have features (embedded or interpolated)."""
        return self.slices.covered

    def token_maps(self, layers: Sequence[int] = ()) -> Tensor:
        """Tokens of the embedded slices [S, h, w, C]: blocks `layers` concatenated, or the final patch tokens."""
        missing = [i for i in layers if i not in self.layers]
        if missing:
            have = sorted(self.layers) or "none"
            raise BrainDINOError(self.source or "features", f"lack encoder block(s) {missing} (features hold "
                                                            f"blocks {have}); embed with layers={list(layers)}")
        maps = [self.layers[i] for i in layers] if layers else [self.patches]
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=-1)

    def tokens_at(self, slice_indices: Sequence[int], layers: Sequence[int] = ()) -> Tensor:
        """Features [n, h, w, C] float32 at any voxel slices inside `covered`, interpolated between embedded
        slices (exactly the embedded tokens on embedded slices)."""
        return interpolate_slices(self.token_maps(layers), self.slices, slice_indices)

    def patch_foreground(self) -> Tensor:
        """Fraction of each grid cell's voxels inside the foreground mask on the embedded slices, [S, h, w]."""
        return self.foreground_fraction(self.slices.slice_indices)

    def foreground_fraction(self, slice_indices: Sequence[int]) -> Tensor:
        """Fraction of each grid cell's voxels inside the foreground mask on voxel slices `slice_indices`,
        [n, h, w] float32."""
        mask = self.foreground[np.asarray(slice_indices)].astype(np.float32)
        box = torch.from_numpy(crop_box(mask, self.slices.box))[:, None]
        return cell_means(box, self.slices)[:, 0]

    @property
    def mapping(self) -> VoxelMapping:
        return VoxelMapping(self.slices, self.guide, self.policy.upsampling, self.geometry, self.stored, self.source)

    def map_volume(self, cell_maps: CellMaps, upscale: int = 1, fill: float = 0.0,
                   reduce: Callable[[Tensor], Tensor] | None = None, squeeze: bool = False,
                   upsampler: InplaneUpsampler | None = None, cancel: Callable[[], bool] | None = None) -> Volume:
        """See `VoxelMapping.map_volume`."""
        return self.mapping.map_volume(cell_maps, upscale, fill, reduce, squeeze, upsampler, cancel)

    def map_planes(self, cell_maps: CellMaps, planes: Planes, upsampler: InplaneUpsampler | None = None,
                   fill: float = 0.0) -> Volume:
        """See `VoxelMapping.map_planes`."""
        return self.mapping.map_planes(cell_maps, planes, upsampler, fill)

    def to_volume(self, per_slice: Tensor | np.ndarray, fill: float = 0.0) -> Volume:
        """See `VoxelMapping.to_volume`."""
        return self.mapping.to_volume(per_slice, fill)

    def empty_volume(self, dtype: np.dtype = np.float32) -> Volume:
        """A zero volume on the input's grid (for label maps assembled voxel-wise)."""
        return Volume(np.zeros(self.slices.volume_shape, dtype), self.geometry, self.stored, self.source)

    def describe(self) -> str:
        h, w = self.grid
        return (f"{self.num_slices} slices x {h}x{w} tokens x {self.patches.shape[-1]} dims "
                f"({self.policy.describe()})")

    # ---- persistence -------------------------------------------------------------------------------------

    def metadata(self) -> dict:
        """Everything but the tensors, as JSON-ready data (also what the cache matches entries on)."""
        return {"format_version": FORMAT_VERSION, "model_id": self.model_id, "source": self.source,
                "slices": self.slices.to_dict(), "geometry": asdict(self.geometry), "stored": asdict(self.stored),
                "preprocessing": self.preprocessing.to_dict(), "policy": self.policy.to_dict(),
                "foreground_shape": list(self.foreground.shape), "layers": sorted(self.layers)}

    def save(self, path: str | Path) -> Path:
        """Write atomically as one safetensors file (tensors + JSON metadata in its header)."""
        tensors = {"cls": self.cls, "patches": self.patches, "guide": torch.from_numpy(self.guide),
                   "foreground": torch.from_numpy(np.packbits(self.foreground.ravel()))}
        tensors.update({f"layer.{i}": t for i, t in self.layers.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"braindino_features": json.dumps(self.metadata()),
                                                   CHECKSUM_KEY: content_checksum(tensors)})
        return Path(path)

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        """The metadata of a features file, without reading its tensors."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = (handle.metadata() or {}).get("braindino_features")
        except (SafetensorError, OSError) as error:
            raise BrainDINOError(path, f"not a readable features file ({error})") from None
        if metadata is None:
            raise BrainDINOError(path, "not a BrainDINO features file (no feature metadata)")
        info = json.loads(metadata)
        if info.get("format_version") != FORMAT_VERSION:
            raise BrainDINOError(path, f"features format {info.get('format_version')} is not {FORMAT_VERSION}")
        return info

    @classmethod
    def load(cls, path: str | Path) -> VolumeFeatures:
        path = Path(path)
        info = cls.read_metadata(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise BrainDINOError(path, f"not a readable features file ({error})") from None
        verify_checksum(path, tensors, header)
        shape = tuple(info["foreground_shape"])
        foreground = np.unpackbits(tensors["foreground"].numpy(), count=int(np.prod(shape))).reshape(shape).astype(bool)
        geometry = {k: Geometry(**{f: tuple(v) for f, v in info[k].items()}) for k in ("geometry", "stored")}
        return cls(cls=tensors["cls"], patches=tensors["patches"],
                   slices=SliceGeometry.from_dict(info["slices"]), geometry=geometry["geometry"],
                   stored=geometry["stored"], model_id=info["model_id"],
                   preprocessing=PreprocessConfig.from_dict(info["preprocessing"]), foreground=foreground,
                   guide=tensors["guide"].numpy(), policy=ResolutionPolicy.from_dict(info["policy"]),
                   layers={int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("layer.")},
                   source=info.get("source", ""))
