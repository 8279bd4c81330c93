"""Small real inputs for the map tests: the bundled Colin27 T1 at 2 mm as NIfTI and as a sagittal DICOM series
(stored in another orientation), and their features under the tiny fixture model at 112 px (7 x 7 patches)."""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk
from conftest import SAMPLE_T1
from volume_factories import downsampled, write_dicom_series

from BrainDINOLib import PreprocessConfig, embed_volume, read_volume

SMALL = PreprocessConfig(image_size=112)
DICOM_ORIENTATION = "PIR"  # sagittal slices, rows running inferior, columns posterior: far from canonical LPS


def write_small_inputs(folder: Path) -> dict[str, Path]:
    """The 2-mm sample as NIfTI and as a sagittal DICOM series, written under `folder`."""
    image = downsampled(SAMPLE_T1, 2.0)
    nifti = folder / "colin27_2mm.nii.gz"
    sitk.WriteImage(image, str(nifti))
    dicom = write_dicom_series(image, folder / "colin27_2mm_sagittal_dicom", DICOM_ORIENTATION)
    return {"nifti": nifti, "dicom": dicom}


def small_features(path: Path, encoder):
    volume = read_volume(path)
    return volume, embed_volume(volume, encoder, config=SMALL, batch_size=32)


def stored_geometry(path: Path) -> tuple:
    """(size, spacing, origin, direction) of a file or DICOM folder exactly as SimpleITK reads it."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    return image.GetSize()[:3], image.GetSpacing(), image.GetOrigin(), image.GetDirection()
