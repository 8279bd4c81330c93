"""Real test volumes derived from the bundled sample: resampled copies, DICOM series in any orientation,
and deliberately broken files. Everything is written with SimpleITK, as a scanner export would be."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def downsampled(path: Path, spacing_mm: float = 2.0, interpolator: int = sitk.sitkLinear,
                pixel: int | None = None) -> sitk.Image:
    """The image at `path` resampled to isotropic `spacing_mm`, keeping its orientation (and, unless `pixel`
    is given, its pixel type). Use nearest-neighbour interpolation for label maps."""
    image = sitk.ReadImage(str(path))
    size = [int(round(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(),
                         [spacing_mm] * 3, image.GetDirection(), 0, image.GetPixelID() if pixel is None else pixel)


def write_dicom_series(image: sitk.Image, folder: Path, orientation: str,
                       shift_mm: dict[int, tuple[float, float, float]] | None = None) -> Path:
    """Store `image` as an MR DICOM series whose slices follow `orientation` (e.g. "LPS" axial, "PIL" sagittal).
    `shift_mm` moves the stored position of slice k by an LPS offset (for series with irregular geometry)."""
    folder.mkdir(parents=True, exist_ok=True)
    oriented = sitk.Cast(sitk.DICOMOrient(image, orientation), sitk.sitkInt16)
    direction = oriented.GetDirection()
    series_uid = f"1.2.826.0.1.3680043.2.1125.{int(time.time() * 1e6)}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(oriented.GetDepth()):
        plane = oriented[:, :, k]
        position = np.add(oriented.TransformIndexToPhysicalPoint((0, 0, k)), (shift_mm or {}).get(k, (0, 0, 0)))
        tags = {
            "0008|0060": "MR",
            "0020|000d": series_uid + ".0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),
            "0018|0050": f"{oriented.GetSpacing()[2]:.6f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
        writer.Execute(plane)
    return folder


def write_array(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    if image.GetDimension() == len(spacing):
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path
