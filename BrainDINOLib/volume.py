"""`Volume`: a 3-D MRI (or a map computed from one) with its physical geometry, read and written through SimpleITK.

Canonical orientation. Every volume is reoriented on reading so that its voxel axes point towards patient
Left, Posterior and Superior ("LPS", the DICOM/ITK world convention; the orientation code is SimpleITK's,
naming where each index axis points). The array is indexed `array[k, j, i]` (SimpleITK's numpy order), so
`array[k]` is one anatomical axial slice with the patient's right on the image's left and anterior at the
top: the radiological view of Slicer's red slice. Reorientation only permutes and flips axes, so it is
exact and reversible, and `write_volume` puts any map back on the file's own grid, bit for bit the
stored spacing, origin and direction.

Physical points are LPS millimetres (ITK's world); Slicer's RAS is `(-x, -y, z)` of it (`ras_to_lps`).
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .errors import BrainDINOError

log = logging.getLogger(__name__)

CANONICAL_ORIENTATION = "LPS"
# Single-file formats only: a header + raw pair (.mhd/.nhdr) cannot be renamed into place atomically.
WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in LPS space. Sizes and spacings are in SimpleITK's (i, j, k) order."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major; column c is the LPS direction of index axis c

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @property
    def orientation(self) -> str:
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.direction)

    def index_to_lps(self, index_kji: np.ndarray) -> np.ndarray:
        """Continuous voxel indices [N, 3] in array (k, j, i) order -> LPS mm [N, 3]."""
        ijk = np.asarray(index_kji, dtype=np.float64)[..., ::-1]
        matrix = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)
        return ijk @ matrix.T + np.asarray(self.origin)

    def lps_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS mm [N, 3] -> continuous voxel indices [N, 3] in array (k, j, i) order."""
        matrix = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)
        ijk = (np.asarray(points_lps, dtype=np.float64) - np.asarray(self.origin)) @ np.linalg.inv(matrix).T
        return ijk[..., ::-1]


def ras_to_lps(point: np.ndarray | tuple[float, ...]) -> np.ndarray:
    """Slicer RAS mm <-> ITK LPS mm (the map is its own inverse)."""
    p = np.array(point, dtype=np.float64)
    p[..., :2] *= -1
    return p


lps_to_ras = ras_to_lps


@dataclass(frozen=True)
class Volume:
    """A 3-D array in canonical LPS orientation, `array[k, j, i]` (or `[k, j, i, c]` for RGB maps).

    `stored` is the geometry of the file it came from, so maps derived with `with_array` are written
    back on exactly that grid.
    """

    array: np.ndarray
    geometry: Geometry
    stored: Geometry
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[:3])

    def with_array(self, array: np.ndarray) -> Volume:
        """A new volume on the same grid (a map, a label volume): only the voxels differ."""
        if tuple(array.shape[:3]) != self.shape:
            raise ValueError(f"array shape {array.shape[:3]} does not match the volume grid {self.shape}")
        return replace(self, array=array)

    def to_image(self) -> sitk.Image:
        """The canonical SimpleITK image (LPS axes)."""
        is_vector = self.array.ndim == 4
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array), isVector=is_vector)
        return self.geometry.apply_to(image)

    def to_stored_image(self) -> sitk.Image:
        """The image on the file's own grid: axes permuted back and the stored geometry set exactly."""
        image = sitk.DICOMOrient(self.to_image(), self.stored.orientation)
        if tuple(image.GetSize()) != self.stored.size:
            raise AssertionError("reorientation changed the grid size")  # cannot happen: a permutation
        return self.stored.apply_to(image)

    @classmethod
    def from_image(cls, image: sitk.Image, source: str = "") -> Volume:
        """Reorient a 3-D SimpleITK image to canonical LPS and wrap it (any pixel type, kept as is)."""
        stored = Geometry.of(image)
        canonical = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
        return cls(sitk.GetArrayFromImage(canonical), Geometry.of(canonical), stored, source)


def _itk_reason(error: Exception) -> str:
    """The telling part of an ITK exception (they span lines and quote C++ source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        for marker in ("Description:", "sitk::ERROR:", "itk::ERROR:"):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return lines[-1] if lines else "unreadable"


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's own warnings on stderr while reading: problems reach the user as one BrainDINOError."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_series(folder: Path) -> sitk.Image:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as error:
        raise BrainDINOError(folder, f"cannot scan for DICOM: {_itk_reason(error)}") from None
    if not series:
        raise BrainDINOError(folder, "no DICOM series found in this folder")
    files_per_series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    uid = max(files_per_series, key=lambda u: len(files_per_series[u]))
    if len(series) > 1:
        log.warning("%s holds %d DICOM series; using %s (%d files), the largest",
                    folder, len(series), uid, len(files_per_series[uid]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_per_series[uid])
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise BrainDINOError(folder, f"unreadable DICOM series: {_itk_reason(error)}") from None


def _nifti_bytes(path: Path) -> tuple[bytes, bool]:
    """The (decompressed) bytes of a NIfTI file and whether the gzip stream, if any, was complete."""
    if not path.name.endswith(".gz"):
        return path.read_bytes(), True
    chunks, complete = [], True
    with gzip.open(path, "rb") as stream:
        try:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                chunks.append(chunk)
        except (EOFError, OSError, zlib.error):
            complete = False
    return b"".join(chunks), complete


def _check_nifti_complete(path: Path) -> None:
    """ITK zero-fills a truncated NIfTI without complaint; refuse one whose voxel data is cut short."""
    data, complete = _nifti_bytes(path)
    if not complete:
        raise BrainDINOError(path, "truncated or corrupt gzip stream")
    for order in "<>":
        if len(data) >= 4 and struct.unpack(order + "i", data[:4])[0] in (348, 540):
            break
    else:
        raise BrainDINOError(path, "not a NIfTI file (bad header size)")
    if struct.unpack(order + "i", data[:4])[0] == 348:
        dims = struct.unpack(order + "8h", data[40:56])
        bitpix = struct.unpack(order + "h", data[72:74])[0]
        offset = int(struct.unpack(order + "f", data[108:112])[0])
    else:
        bitpix = struct.unpack(order + "h", data[14:16])[0]
        dims = struct.unpack(order + "8q", data[16:80])
        offset = struct.unpack(order + "q", data[168:176])[0]
    expected = offset + int(np.prod([max(1, d) for d in dims[1:1 + dims[0]]], dtype=np.int64)) * bitpix // 8
    if len(data) < expected:
        raise BrainDINOError(path, f"truncated: {len(data)} bytes of voxel data and header, {expected} expected")


def _read_image(path: Path) -> sitk.Image:
    if not path.exists():
        raise BrainDINOError(path, "no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path)
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise BrainDINOError(path, f"cannot read as an image ({_itk_reason(error)})") from None


def _to_3d(image: sitk.Image, path: Path, frame: int) -> sitk.Image:
    """Accept 3-D scalar images; take one frame of a 4-D series; refuse 2-D and multi-component images."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise BrainDINOError(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                                   "(RGB or vector data); BrainDINO needs a grayscale MRI volume")
    size = image.GetSize()
    if image.GetDimension() == 4:
        if not 0 <= frame < size[3]:
            raise BrainDINOError(path, f"is a 4-D series of {size[3]} volumes; frame {frame} does not exist")
        if size[3] > 1:
            log.warning("%s is a 4-D series of %d volumes; using volume %d", path, size[3], frame)
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, frame])
    elif image.GetDimension() != 3:
        raise BrainDINOError(path, f"is a {image.GetDimension()}-D image; BrainDINO needs a 3-D volume")
    if min(image.GetSize()) < 2:
        raise BrainDINOError(path, f"is a single slice (size {image.GetSize()}); BrainDINO needs a 3-D volume")
    return image


def read_volume(path: str | Path, frame: int = 0) -> Volume:
    """Read a NIfTI/NRRD/MHA/MHD file or a DICOM series folder as a float32 canonical `Volume`.

    Raises `BrainDINOError` (one line: the file and the problem) for missing, corrupt, 2-D, vector,
    non-finite or constant inputs. For a 4-D series, volume `frame` is used (and logged).
    """
    path = Path(path)
    with _quiet_itk():
        image = _to_3d(_read_image(path), path, frame)
    volume = Volume.from_image(sitk.Cast(image, sitk.sitkFloat32), source=str(path))
    array = volume.array
    finite = np.isfinite(array)
    if not finite.all():
        raise BrainDINOError(path, f"contains {int((~finite).sum())} NaN or infinite voxels")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise BrainDINOError(path, f"is constant (every voxel is {low:g}); there is no image to analyse")
    return volume


def read_label_volume(path: str | Path) -> Volume:
    """Read a label volume (whole numbers, 0 = background) as a canonical int64 `Volume`.

    Unlike `read_volume`, an empty (all-zero) label volume is not an error here; its caller decides."""
    path = Path(path)
    with _quiet_itk():
        image = _to_3d(_read_image(path), path, 0)
    volume = Volume.from_image(image, source=str(path))
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer) and (not np.isfinite(array).all() or (array != np.round(array)).any()):
        raise BrainDINOError(path, "is not a label volume (its values are not whole numbers)")
    return volume.with_array(array.astype(np.int64))


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write `volume` atomically on the grid of the file it came from (NIfTI, NRRD, MHA: by suffix)."""
    path = Path(path)
    if not str(path).endswith(WRITABLE_SUFFIXES):
        raise BrainDINOError(path, f"unknown output format; use one of {', '.join(WRITABLE_SUFFIXES)}")
    with atomic_path(path) as tmp:
        sitk.WriteImage(volume.to_stored_image(), str(tmp), useCompression=True)
    return path
