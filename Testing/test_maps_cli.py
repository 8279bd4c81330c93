"""`braindino pca|similarity|attention|cluster` end to end on a small real volume, and montage orientation."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_T1
from matplotlib.image import imread
from volume_factories import downsampled

from BrainDINOLib.cli import main
from BrainDINOLib.montage import plane_image, point_in_plane


@pytest.fixture(scope="module")
def small_nifti(tmp_path_factory):
    path = tmp_path_factory.mktemp("maps_cli") / "colin27_4mm.nii.gz"
    sitk.WriteImage(downsampled(SAMPLE_T1, 4.0), str(path))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_map_command_writes_its_volume_and_picture(small_nifti, teacher_checkpoint, tmp_path, capsys):
    common = ["--model", teacher_checkpoint, "--patch-mm", "16", "--cache-dir", tmp_path / "cache"]
    commands = {
        "pca": ["--components", "4", "--components-out", tmp_path / "pca_components.nrrd"],
        "similarity": ["--point-ras=-24,4,2"],
        "attention": ["--heads-out", tmp_path / "attention_heads.nii.gz"],
        "cluster": ["-k", "5"],
    }
    input_image = sitk.ReadImage(str(small_nifti))
    for command, extra in commands.items():
        out, png = tmp_path / f"{command}.nrrd", tmp_path / f"{command}.png"
        code, stdout, stderr = run(capsys, command, small_nifti, "--out", out, "--png", png, *common, *extra)
        assert code == 0, stderr
        assert f"wrote {out}" in stdout and f"wrote {png}" in stdout
        written = sitk.ReadImage(str(out))
        assert written.GetSize() == input_image.GetSize()
        np.testing.assert_allclose(written.GetOrigin(), input_image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), input_image.GetDirection(), atol=1e-6)
        picture = imread(str(png))
        assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 600
        assert picture[..., :3].std() > 0.05  # an actual picture, not a blank canvas
    assert sitk.ReadImage(str(tmp_path / "pca.nrrd")).GetNumberOfComponentsPerPixel() == 3
    assert sitk.ReadImage(str(tmp_path / "pca_components.nrrd")).GetNumberOfComponentsPerPixel() == 4


def test_bad_map_requests_fail_with_one_line(small_nifti, teacher_checkpoint, tmp_path, capsys):
    code, _, stderr = run(capsys, "similarity", small_nifti, "--out", tmp_path / "s.nii.gz", "--point-lps=400,0,0",
                          "--model", teacher_checkpoint, "--patch-mm", "16", "--no-cache")
    assert code == 2 and stderr.startswith("braindino: error: point (LPS mm) (400.0, 0.0, 0.0): lies outside the volume")
    assert len(stderr.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["pca", str(small_nifti), "--out", str(tmp_path / "map.txt")])
    assert "unknown output format" in capsys.readouterr().err


def test_montage_slices_are_shown_radiologically():
    """Canonical LPS array [k, j, i]: mark the patient's right-anterior-superior corner and find it on screen."""
    array = np.zeros((4, 5, 6))
    array[3, 0, 0] = 1  # k=3 most superior, j=0 most anterior, i=0 patient's right
    axial = plane_image(array, "axial", 3)
    assert axial[0, 0] == 1  # anterior on top, patient's right on the image's left
    coronal = plane_image(array, "coronal", 0)
    assert coronal[0, 0] == 1  # superior on top, patient's right on the left
    sagittal = plane_image(array, "sagittal", 0)
    assert sagittal[0, 0] == 1  # superior on top, anterior on the left
    for plane, image in (("axial", axial), ("coronal", coronal), ("sagittal", sagittal)):
        x, y = point_in_plane(np.array([3, 0, 0]), plane, depth=4)
        assert image[int(y), int(x)] == 1
