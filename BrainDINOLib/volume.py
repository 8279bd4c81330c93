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
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import IncompleteWriteError, atomic_path, register_input
from .errors import BrainDINOError

log = logging.getLogger(__name__)

CANONICAL_ORIENTATION = "LPS"
# Single-file formats only: a header + raw pair (.mhd/.nhdr) cannot be renamed into place atomically.
WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
# What `read_volume` takes as a file (a DICOM series is a folder). ".nii.gz" before ".nii", so a name's stem is
# found by removing the first suffix it ends with.
READABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


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


# One thread at a time moves the process's stderr (the Slicer module and the web page read volumes on a worker
# thread while the main thread may read too): two overlapping redirects would restore each other's capture file
# and leave stderr pointing into a deleted temporary file.
_STDERR_REDIRECT = threading.RLock()


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Keep ITK's own messages off stderr while it reads or writes: problems reach the user as one
    BrainDINOError. Its warnings are switched off; what its C libraries print straight to the stderr file
    descriptor (nifticlib's "wrote only N of M bytes", MetaIO's stream errors) is captured and logged at debug
    level."""
    with _STDERR_REDIRECT, tempfile.TemporaryFile() as captured:
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)
            captured.seek(0)
            text = captured.read().decode(errors="replace").strip()
            if text:
                log.debug("ITK said: %s", text)


# ---- DICOM series -------------------------------------------------------------------------------------------

# Slices further from the regular grid than this (mm, or this share of the slice spacing) are irregular.
SLICE_TOLERANCE_MM = 0.01
SLICE_TOLERANCE_FRACTION = 0.01
MAX_MISSING_IN_A_ROW = 3  # wider gaps are refused: interpolating across them would invent anatomy


def _read_dicom_series(folder: Path) -> sitk.Image:
    try:
        with _quiet_itk():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as error:
        raise BrainDINOError(folder, f"cannot scan for DICOM: {_itk_reason(error)}") from None
    if not series:
        raise BrainDINOError(folder, "no DICOM series found in this folder")
    with _quiet_itk():
        files_per_series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    uid = max(files_per_series, key=lambda u: len(files_per_series[u]))
    if len(series) > 1:
        log.warning("%s holds %d DICOM series; using %s (%d files), the largest",
                    folder, len(series), uid, len(files_per_series[uid]))
    files = files_per_series[uid]
    for name in files:
        register_input(name)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetMetaDataDictionaryArrayUpdate(True)
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as error:
        raise BrainDINOError(folder, f"unreadable DICOM series: {_itk_reason(error)}") from None
    if len(files) < 2:
        return image
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(len(files))])
    except (RuntimeError, ValueError):
        raise BrainDINOError(folder, "DICOM slices without a readable Image Position (Patient); cannot place "
                                     "them in space") from None
    return _on_regular_slices(image, positions, [Path(f).name for f in files], folder)


def _on_regular_slices(image: sitk.Image, positions: np.ndarray, names: list[str], folder: Path) -> sitk.Image:
    """`image` if its slices lie on a regular grid; else resampled onto one (with a warning that says where),
    or refused when no regular grid can honestly be made from it.

    ITK stacks a series' slices at their average spacing, so a missing slice would silently stretch every
    slice after it. Like Slicer's acquisition-geometry check, compare each slice's position along the slice
    axis with a regular grid; unlike ITK, put the slices where they were acquired.
    """
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    offsets = positions - positions[0]
    along = offsets @ normal
    sheared = np.linalg.norm(offsets - np.outer(along, normal), axis=1).max()
    steps = np.diff(along)
    step = float(np.median(steps))
    tolerance = max(SLICE_TOLERANCE_MM, SLICE_TOLERANCE_FRACTION * abs(step))
    if sheared > tolerance:
        raise BrainDINOError(folder, f"the slices are shifted sideways by up to {sheared:.3g} mm along the series "
                                     "(gantry tilt or a sheared acquisition); resample the series onto a regular "
                                     "grid first (e.g. Slicer's acquisition geometry regularization)")
    if (steps < tolerance).any():
        i = int(np.argmax(steps < tolerance))
        raise BrainDINOError(folder, f"slices {names[i]} and {names[i + 1]} lie at the same position "
                                     f"({along[i]:.3g} mm along the slice axis): several images per position "
                                     "(multi-echo, multi-phase or repeated slices); split the series")
    if np.abs(steps - step).max() <= tolerance:
        return image
    slots = steps / step
    if (np.abs(slots - np.round(slots)) > 0.1).any():
        raise BrainDINOError(folder, f"the slice spacing varies from {steps.min():.3g} to {steps.max():.3g} mm "
                                     "(not a regular series with a few missing slices); BrainDINO cannot place "
                                     "these slices on a voxel grid")
    if np.round(slots).max() > MAX_MISSING_IN_A_ROW + 1:
        i = int(np.argmax(slots))
        raise BrainDINOError(folder, f"{int(round(slots[i])) - 1} slices in a row are missing between {names[i]} "
                                     f"and {names[i + 1]} (a {steps[i]:.4g} mm gap in a {step:.4g} mm series); "
                                     f"too many to interpolate (at most {MAX_MISSING_IN_A_ROW})")
    gaps = np.flatnonzero(np.abs(steps - step) > tolerance)
    count = int(round((along[-1] - along[0]) / step)) + 1
    grid = along[0] + step * np.arange(count)
    where = "; ".join(", ".join(f"{along[i] + step * j:.4g}" for j in range(1, int(round(slots[i])))) +
                      f" mm (between {names[i]} and {names[i + 1]})" for i in gaps)
    log.warning("%s: the DICOM series misses %d slice(s), at %s along the slice axis; resampled onto its regular "
                "%.4g mm slice grid, the missing slices interpolated linearly from their neighbours",
                folder, count - len(along), where, step)
    return _resample_slices(image, along, grid, step)


def _resample_slices(image: sitk.Image, along: np.ndarray, grid: np.ndarray, step: float) -> sitk.Image:
    """Linear interpolation of the slices of `image` (at positions `along`) onto the regular positions `grid`."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # [slice, row, column]
    below = np.clip(np.searchsorted(along, grid, side="right") - 1, 0, len(along) - 2)
    weight = ((grid - along[below]) / (along[below + 1] - along[below])).astype(np.float32)
    shape = (-1,) + (1,) * (array.ndim - 1)
    resampled = array[below] * (1 - weight.reshape(shape)) + array[below + 1] * weight.reshape(shape)
    out = sitk.GetImageFromArray(resampled, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    out.SetSpacing((*image.GetSpacing()[:2], step))
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    return out


# ---- NIfTI header and voxel checks --------------------------------------------------------------------------

@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that ITK reads too leniently."""

    byte_order: str
    dims: tuple[int, ...]  # sizes of the used dimensions
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]  # voxel size of each used dimension
    vox_offset: int

    @classmethod
    def parse(cls, data: bytes, path: Path) -> _NiftiHeader:
        for order in "<>":
            if len(data) >= 4 and struct.unpack(order + "i", data[:4])[0] in (348, 540):
                break
        else:
            raise BrainDINOError(path, "not a NIfTI file (bad header size)")
        if struct.unpack(order + "i", data[:4])[0] == 348:
            dims = struct.unpack(order + "8h", data[40:56])
            datatype, bitpix = struct.unpack(order + "2h", data[70:74])
            pixdim = struct.unpack(order + "8f", data[76:108])
            offset = int(struct.unpack(order + "f", data[108:112])[0])
        else:
            datatype, bitpix = struct.unpack(order + "2h", data[12:16])
            dims = struct.unpack(order + "8q", data[16:80])
            pixdim = struct.unpack(order + "8d", data[104:168])
            offset = struct.unpack(order + "q", data[168:176])[0]
        used = max(0, min(int(dims[0]), 7))
        return cls(order, tuple(int(d) for d in dims[1:1 + used]), datatype, bitpix, tuple(pixdim[1:1 + used]),
                   offset)

    @property
    def data_bytes(self) -> int:
        return int(np.prod([max(1, d) for d in self.dims], dtype=np.int64)) * self.bitpix // 8


# NIfTI datatype codes of floating-point and complex voxels (nifti1.h).
NIFTI_FLOAT_DTYPES = {16: "f4", 64: "f8"}
NIFTI_COMPLEX = {32: "complex64", 1792: "complex128", 2048: "complex256"}


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


def _check_nifti_complete(path: Path) -> tuple[_NiftiHeader, bytes]:
    """ITK zero-fills a truncated NIfTI without complaint; refuse one whose voxel data is cut short."""
    data, complete = _nifti_bytes(path)
    if not complete:
        raise BrainDINOError(path, "truncated or corrupt gzip stream")
    header = _NiftiHeader.parse(data, path)
    expected = header.vox_offset + header.data_bytes
    if len(data) < expected:
        raise BrainDINOError(path, f"truncated: {len(data)} bytes of voxel data and header, {expected} expected")
    return header, data


def _check_nifti(path: Path) -> None:
    """What ITK does not tell: truncation, a voxel size of 0, NaN or below 0 (read as 1 mm), complex voxels, and
    NaN or infinite voxels (read as 0)."""
    header, data = _check_nifti_complete(path)
    spatial = header.pixdim[:3]
    if not all(np.isfinite(v) and v > 0 for v in spatial):
        shown = " x ".join(f"{v:g}" for v in spatial)
        raise BrainDINOError(path, f"voxel size in the header is {shown} mm; every voxel size must be a positive "
                                   "number")
    if header.datatype in NIFTI_COMPLEX:
        raise BrainDINOError(path, f"has complex voxels ({NIFTI_COMPLEX[header.datatype]}: raw k-space or phase "
                                   "data?); BrainDINO needs a magnitude image")
    if header.datatype in NIFTI_FLOAT_DTYPES:
        dtype = np.dtype(NIFTI_FLOAT_DTYPES[header.datatype]).newbyteorder(header.byte_order)
        voxels = np.frombuffer(data, dtype, count=header.data_bytes // dtype.itemsize, offset=header.vox_offset)
        bad = voxels.size - int(np.isfinite(voxels).sum())
        if bad:
            raise BrainDINOError(path, f"contains {bad} NaN or infinite voxels")


# ---- reading ---------------------------------------------------------------------------------------------------

def _read_image(path: Path) -> sitk.Image:
    if not path.exists():
        raise BrainDINOError(path, "no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path)
    register_input(path)
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    try:
        with _quiet_itk():
            return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise BrainDINOError(path, f"cannot read as an image ({_itk_reason(error)})") from None


def _to_3d(image: sitk.Image, path: Path, frame: int) -> sitk.Image:
    """Accept 3-D scalar images; take one frame of a 4-D series; refuse 2-D, complex and multi-component images."""
    if "complex" in image.GetPixelIDTypeAsString():
        raise BrainDINOError(path, f"has complex voxels ({image.GetPixelIDTypeAsString()}: raw k-space or phase "
                                   "data?); BrainDINO needs a magnitude image")
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
    spacing = image.GetSpacing()
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise BrainDINOError(path, f"voxel size {' x '.join(f'{v:g}' for v in spacing)} mm; every voxel size "
                                   "must be a positive number")
    return image


def read_volume(path: str | Path, frame: int = 0) -> Volume:
    """Read a NIfTI/NRRD/MHA/MHD file or a DICOM series folder as a float32 canonical `Volume`.

    Raises `BrainDINOError` (one line: the file and the problem) for missing, corrupt, truncated, 2-D, vector,
    complex, non-finite or constant inputs and for voxel sizes that are not positive numbers. A DICOM series
    with a few missing slices is resampled onto a regular slice grid, with a warning naming where. For a 4-D
    series, volume `frame` is used (and logged). The file is registered as an input: no output of this
    process may replace it (see `atomic.register_input`).
    """
    path = Path(path)
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
    """Read a label volume (whole numbers, 0 = background) as a canonical int64 `Volume`, with the same checks
    of the file as `read_volume`; an empty (all-zero) label volume is not an error here: its caller decides."""
    path = Path(path)
    volume = Volume.from_image(_to_3d(_read_image(path), path, 0), source=str(path))
    array = volume.array
    whole = np.issubdtype(array.dtype, np.integer)
    if not whole and (not np.isfinite(array).all() or (array != np.round(array)).any()):
        raise BrainDINOError(path, "is not a label volume (its values are not whole numbers)")
    return volume.with_array(array.astype(np.int64))


# ---- writing ---------------------------------------------------------------------------------------------------

def _verify_written(path: Path) -> None:
    """Read a freshly written volume back: a full disk leaves a short file that ITK itself may not notice."""
    try:
        with _quiet_itk():
            if path.name.endswith((".nii", ".nii.gz")):
                _check_nifti_complete(path)
            else:
                sitk.ReadImage(str(path))
    except BrainDINOError as error:
        raise IncompleteWriteError(error.problem) from None
    except RuntimeError as error:
        raise IncompleteWriteError(_itk_reason(error)) from None


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write `volume` atomically on the grid of the file it came from (NIfTI, NRRD, MHA: by suffix).

    The file is read back before it is renamed into place; a write that did not complete (full disk) raises
    `BrainDINOError` and leaves nothing at `path`, as does a `path` that is one of the inputs.
    """
    path = Path(path)
    if not str(path).endswith(WRITABLE_SUFFIXES):
        raise BrainDINOError(path, f"unknown output format; use one of {', '.join(WRITABLE_SUFFIXES)}")
    with atomic_path(path, verify=_verify_written) as tmp:
        image = volume.to_stored_image()
        with _quiet_itk():
            try:
                sitk.WriteImage(image, str(tmp), useCompression=True)
            except RuntimeError as error:
                raise IncompleteWriteError(_itk_reason(error)) from None
    return path
