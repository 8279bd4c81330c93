"""Volumes: every format through SimpleITK, canonical LPS orientation, exact write-back, clear errors."""
import gzip
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BrainDINOLib import BrainDINOError, read_volume, write_volume
from BrainDINOLib.volume import lps_to_ras, ras_to_lps
from conftest import SAMPLE_T1
from volume_factories import downsampled, write_array, write_dicom_series


@pytest.fixture(scope="module")
def small_image() -> sitk.Image:
    return downsampled(SAMPLE_T1, 3.0)


def test_sample_is_canonical_lps(sample_volume):
    stored = sitk.ReadImage(str(SAMPLE_T1))
    assert sample_volume.shape == (181, 217, 181)
    assert sample_volume.stored.orientation == "RAS"  # how the file stores it
    assert sample_volume.geometry.orientation == "LPS"
    assert sample_volume.geometry.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # The file's voxel (i, j, k) is the canonical voxel (X-1-i, Y-1-j, k): an exact flip, no resampling.
    original = sitk.GetArrayFromImage(stored).astype(np.float32)
    np.testing.assert_array_equal(sample_volume.array, original[:, ::-1, ::-1])
    # Same physical position for the same voxel.
    corner = sample_volume.geometry.index_to_lps(np.array([[0.0, 0.0, 0.0]]))[0]
    np.testing.assert_allclose(corner, stored.TransformIndexToPhysicalPoint((180, 216, 0)))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_every_format_reads_to_the_same_volume(tmp_path, small_image, suffix):
    reference = read_volume(_write(small_image, tmp_path / "ref.nii.gz"))
    volume = read_volume(_write(small_image, tmp_path / f"copy{suffix}"))
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.geometry == reference.geometry


@pytest.mark.parametrize("orientation", ["ASL", "PIR", "RAI", "LPS"])
def test_axial_slices_do_not_depend_on_storage_orientation(tmp_path, small_image, orientation):
    reference = read_volume(_write(small_image, tmp_path / "ref.nii.gz"))
    stored = _write(sitk.DICOMOrient(small_image, orientation), tmp_path / f"{orientation}.nii.gz")
    volume = read_volume(stored)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.geometry.origin, reference.geometry.origin, atol=1e-4)
    assert volume.stored.orientation == orientation


def test_sagittal_dicom_series_gives_the_same_axial_slices_as_axial_series(tmp_path, small_image):
    axial = read_volume(write_dicom_series(small_image, tmp_path / "axial", "LPS"))
    sagittal = read_volume(write_dicom_series(small_image, tmp_path / "sagittal", "PIL"))
    assert sagittal.stored.orientation[2] in "LR"  # the series really is stored sagittally
    np.testing.assert_array_equal(sagittal.array, axial.array)
    np.testing.assert_allclose(sagittal.geometry.origin, axial.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(sagittal.geometry.spacing, axial.geometry.spacing, atol=1e-6)


@pytest.mark.parametrize("orientation", ["RAS", "PIL"])
def test_maps_are_written_back_with_the_input_geometry(tmp_path, small_image, orientation):
    source = _write(sitk.DICOMOrient(small_image, orientation), tmp_path / "input.nii.gz")
    volume = read_volume(source)
    rgb = np.stack([volume.array.astype(np.uint8)] * 3, axis=-1)
    for name, data in {"map.nii.gz": volume.array * 2, "map.nrrd": volume.array, "rgb.nrrd": rgb}.items():
        written = sitk.ReadImage(str(write_volume(volume.with_array(data), tmp_path / name)))
        original = sitk.ReadImage(str(source))
        assert written.GetSize() == original.GetSize()
        assert written.GetSpacing() == original.GetSpacing()
        np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    doubled = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "map.nii.gz")))
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(source))).astype(np.float32)
    np.testing.assert_array_equal(doubled, 2 * original)


def test_ras_and_lps_points():
    np.testing.assert_array_equal(ras_to_lps([10.0, -20.0, 30.0]), [-10.0, 20.0, 30.0])
    np.testing.assert_array_equal(lps_to_ras(ras_to_lps([1.0, 2.0, 3.0])), [1.0, 2.0, 3.0])


def test_physical_point_round_trip(sample_volume):
    points = np.array([[12.5, -40.0, 7.0], [-60.0, 20.0, -30.0]])
    index = sample_volume.geometry.lps_to_index(points)
    np.testing.assert_allclose(sample_volume.geometry.index_to_lps(index), points, atol=1e-9)


def test_four_d_series_uses_the_requested_volume(tmp_path, caplog):
    frames = np.stack([np.full((6, 7, 8), v, np.float32) + np.arange(8, dtype=np.float32) for v in (0, 100)])
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(f) for f in frames]), str(path))
    first = read_volume(path)
    assert "4-D series of 2 volumes; using volume 0" in caplog.text
    assert first.shape == (6, 7, 8) and first.array.min() == 0
    assert read_volume(path, frame=1).array.min() == 100
    with pytest.raises(BrainDINOError, match="frame 2 does not exist"):
        read_volume(path, frame=2)


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    ramp = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    nan = ramp.copy()
    nan[2, 3, 4] = np.nan
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b this is not a gzip stream at all" * 10)
    not_image = tmp_path / "notes.mha"
    not_image.write_text("these are notes, not an image")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(SAMPLE_T1.read_bytes()[:20000])
    truncated_nii = tmp_path / "truncated.nii"
    truncated_nii.write_bytes(gzip.decompress(SAMPLE_T1.read_bytes())[:300000])
    empty_dicom = tmp_path / "empty_dicom"
    empty_dicom.mkdir()
    garbage_dicom = tmp_path / "garbage_dicom"
    garbage_dicom.mkdir()
    (garbage_dicom / "IM0001.dcm").write_bytes(b"DICM" * 100)
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7, 8, 3), np.uint8), isVector=True), str(rgb))
    return {
        "missing": (tmp_path / "missing.nii.gz", "no such file or folder"),
        "corrupt": (corrupt, "truncated or corrupt gzip stream"),
        "not an image": (not_image, "cannot read as an image"),
        "truncated": (truncated, "truncated or corrupt gzip stream"),
        "truncated NIfTI": (truncated_nii, "truncated: "),
        "2-D": (write_array(ramp[0], tmp_path / "plane.nii.gz", (1.0, 1.0)), "2-D image"),
        "single slice": (write_array(ramp[:1], tmp_path / "one.nii.gz"), "single slice"),
        "NaN": (write_array(nan, tmp_path / "nan.nrrd"), "1 NaN or infinite voxels"),
        "constant": (write_array(np.full((6, 7, 8), 3.0, np.float32), tmp_path / "flat.nii.gz"), "is constant"),
        "RGB": (rgb, "3 components per voxel"),
        "empty DICOM folder": (empty_dicom, "no DICOM series found"),
        "garbage DICOM folder": (garbage_dicom, "no DICOM series found"),
    }


BAD_INPUT_NAMES = ["missing", "corrupt", "not an image", "truncated", "truncated NIfTI", "2-D", "single slice", "NaN", "constant", "RGB",
                   "empty DICOM folder", "garbage DICOM folder"]


@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_inputs_get_one_line_errors_naming_the_file(tmp_path, name):
    path, problem = _bad_inputs(tmp_path)[name]
    with pytest.raises(BrainDINOError) as error:
        read_volume(path)
    message = str(error.value)
    assert problem in message
    assert message.startswith(str(path))
    assert "\n" not in message


def test_unwritable_suffix_is_refused(tmp_path, sample_volume):
    with pytest.raises(BrainDINOError, match="unknown output format"):
        write_volume(sample_volume, tmp_path / "out.mhd")


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def test_reading_on_two_threads_leaves_stderr_where_it_was(tmp_path):
    """ITK's messages are captured by moving file descriptor 2 for the read; the Slicer module and the web page
    read on a worker thread while the main thread may read too, and stderr must come back to where it was."""
    path = write_array(np.random.default_rng(0).random((8, 9, 10), dtype=np.float32), tmp_path / "small.nii.gz")
    before = os.fstat(2)
    errors = []

    def read_many():
        try:
            for _ in range(30):
                read_volume(path)
        except Exception as error:  # noqa: BLE001  reported below
            errors.append(error)

    threads = [threading.Thread(target=read_many) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = os.fstat(2)
    assert errors == [] and (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
