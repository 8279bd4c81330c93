"""Small real inputs for the map tests: the bundled Colin27 T1 at 2 mm as NIfTI, as a sagittal DICOM series
(stored in another orientation) and as an oblique NIfTI, and their features under the tiny fixture model at a
coarse test resolution (16-mm patches, slices every 16 mm)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from conftest import SAMPLE_T1
from volume_factories import downsampled, write_dicom_series

from BrainDINOLib import read_volume
from BrainDINOLib.resolution import ResolutionPolicy
from BrainDINOLib.session import FeatureSession

SMALL = ResolutionPolicy(patch_mm=16.0)
DICOM_ORIENTATION = "PIR"  # sagittal slices, rows running inferior, columns posterior: far from canonical LPS


def oblique(image: sitk.Image, degrees: float = 20.0) -> sitk.Image:
    """The same voxels with a direction rotated about the superior axis: a tilted acquisition."""
    angle = np.radians(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilted = sitk.Image(image)
    tilted.SetDirection(tuple((rotation @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel()))
    return tilted


def write_small_inputs(folder: Path) -> dict[str, Path]:
    """The 2-mm sample as NIfTI, as a sagittal DICOM series and as an oblique NIfTI, written under `folder`."""
    image = downsampled(SAMPLE_T1, 2.0)
    nifti = folder / "colin27_2mm.nii.gz"
    sitk.WriteImage(image, str(nifti))
    dicom = write_dicom_series(image, folder / "colin27_2mm_sagittal_dicom", DICOM_ORIENTATION)
    tilted = folder / "colin27_2mm_oblique.nii.gz"
    sitk.WriteImage(oblique(image), str(tilted))
    return {"nifti": nifti, "dicom": dicom, "oblique": tilted}


def small_session(encoder, policy: ResolutionPolicy = SMALL) -> FeatureSession:
    return FeatureSession.for_encoder(encoder, policy, batch_size=32)


def small_features(path: Path, encoder, policy: ResolutionPolicy = SMALL):
    volume = read_volume(path)
    return volume, small_session(encoder, policy).features(volume)


def stored_geometry(path: Path) -> tuple:
    """(size, spacing, origin, direction) of a file or DICOM folder exactly as SimpleITK reads it."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    return image.GetSize()[:3], image.GetSpacing(), image.GetOrigin(), image.GetDirection()
