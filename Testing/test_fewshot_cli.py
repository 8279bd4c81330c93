"""`braindino few-shot`: a label volume with a few painted axial slices in, the whole volume segmented out, on
the input's exact grid, with class names from a label table beside the labels; bad labels get one line.

Case: the bundled Colin27 and its AAL atlas merged into lobes, at 4 mm; three axial slices painted with the
lobes; the bundled demo model with 8-mm patches (bad inputs: the tiny fixture encoder)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_T1
from volume_factories import downsampled

from BrainDINOLib import read_volume
from BrainDINOLib.volume import read_label_volume
from BrainDINOLib.atlas import COLIN27_AAL, LOBES, merge_aal_into_lobes
from BrainDINOLib.cli import main
from BrainDINOLib.heads import load_head
from BrainDINOLib.heads.metrics import dice_per_class
from BrainDINOLib.heads.painted import find_label_table, read_label_table

PAINTED = (14, 20, 26)  # axial slices (4-mm grid) through the frontal, parietal and temporal lobes


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("few_shot")
    t1 = downsampled(SAMPLE_T1, 4.0)
    atlas = sitk.Resample(sitk.ReadImage(str(COLIN27_AAL)), t1, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    stored_lobes, names = merge_aal_into_lobes(sitk.GetArrayFromImage(atlas).astype(np.int64))
    painted = np.zeros_like(stored_lobes)
    painted[list(PAINTED)] = stored_lobes[list(PAINTED)]  # stored axially: k is the canonical axial slice too
    labels = sitk.GetImageFromArray(painted)
    labels.CopyInformation(t1)
    sitk.WriteImage(t1, str(folder / "t1.nii.gz"))
    sitk.WriteImage(labels, str(folder / "painted.nii.gz"))
    (folder / "painted.txt").write_text("".join(f"{value} {name}\n" for value, name in enumerate(names)))
    lobes = read_label_volume(folder / "painted.nii.gz").with_array(
        merge_aal_into_lobes(read_label_volume(_write(atlas, folder / "aal.nii.gz")).array)[0])
    assert (lobes.array[list(PAINTED)] == read_label_volume(folder / "painted.nii.gz").array[list(PAINTED)]).all()
    return folder, lobes.array.astype(np.int64)


def _write(image: sitk.Image, path):
    sitk.WriteImage(image, str(path))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_few_shot_segments_the_unpainted_slices(case, tmp_path, capsys):
    folder, lobes = case
    out, png, head = tmp_path / "lobes.nrrd", tmp_path / "lobes.png", tmp_path / "lobes.safetensors"
    code, stdout, stderr = run(capsys, "few-shot", folder / "t1.nii.gz", "--labels", folder / "painted.nii.gz",
                               "--out", out, "--png", png, "--head", head, "--patch-mm", "8",
                               "--cache-dir", tmp_path / "cache")
    assert code == 0, stderr
    assert "3 labelled slices (14, 20, 26)" in stdout and "names from" in stdout
    assert "features: " in stdout and "8 mm patches" in stdout
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(folder / "t1.nii.gz"))
    assert written.GetSize() == source.GetSize() and written.GetSpacing() == source.GetSpacing()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    table = (tmp_path / "lobes.txt").read_text().splitlines()
    assert table[0] == "0 background" and table[1] == "1 frontal"
    assert load_head(head).card.class_names[1:] == [name for name in LOBES if name in
                                                    {line.split(" ", 1)[1] for line in table}]
    assert png.stat().st_size > 10_000
    # Scored on the unpainted slices between the painted ones, for the lobes that were painted.
    predicted = read_volume(out).array.astype(np.int64)
    between = [k for k in range(PAINTED[0], PAINTED[-1]) if k not in PAINTED]
    painted_lobes = sorted(set(np.unique(lobes[list(PAINTED)]).tolist()) - {0})
    dice = dice_per_class(predicted[between], lobes[between], painted_lobes)
    print("few-shot lobes, demo model, 3 slices:", {k: round(v, 2) for k, v in dice.items()})
    assert np.mean(list(dice.values())) > 0.45  # measured 0.54 (4-mm voxels, 8-mm patches)


def test_label_tables_in_three_formats(tmp_path):
    slicer = tmp_path / "labels.ctbl"
    slicer.write_text("# Color table file\n0 Background 0 0 0 0\n1 tumour core 255 0 0 255\n2 oedema 0 255 0 255\n")
    snap = tmp_path / "snap.label"
    snap.write_text('# ITK-SNAP Label Description File\n    0     0    0    0        0  0  0    "Clear Label"\n'
                    '    1   255    0    0        1  1  1    "Left hippocampus"\n')
    plain = tmp_path / "plain.txt"
    plain.write_text("1 grey matter\n2 white matter\n")
    assert [(c.value, c.name, c.colour) for c in read_label_table(slicer)] == [(1, "tumour core", (255, 0, 0)),
                                                                                 (2, "oedema", (0, 255, 0))]
    assert [(c.value, c.name, c.colour) for c in read_label_table(snap)] == [(1, "Left hippocampus", (255, 0, 0))]
    assert [c.name for c in read_label_table(plain)] == ["grey matter", "white matter"]
    (tmp_path / "labels.nii.gz").write_bytes(b"")
    assert find_label_table(tmp_path / "labels.nii.gz") == slicer
    bad = tmp_path / "bad.txt"
    bad.write_text("1 fine\nnot a label line\n")
    with pytest.raises(Exception, match="bad.txt, line 2: is not a label line"):
        read_label_table(bad)


def bad_labels(folder, tmp_path, name: str, change) -> str:
    labels = sitk.ReadImage(str(folder / "painted.nii.gz"))
    array = change(sitk.GetArrayFromImage(labels).copy())
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(labels)
    path = tmp_path / f"{name}.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("name, change, message", [
    ("nothing", lambda a: a * 0, "has no painted voxels"),
    ("one_class", lambda a: np.where(np.arange(a.shape[0])[:, None, None] == 20, 3, 0).astype(a.dtype) + 0 * a,
     "hold a single class (3)"),
    ("negative", lambda a: a.astype(np.int16) - 1, "negative label values"),
])
def test_bad_labels_get_one_line(case, tmp_path, capsys, teacher_checkpoint, name, change, message):
    folder, _ = case
    labels = bad_labels(folder, tmp_path, name, change)
    code, _, stderr = run(capsys, "few-shot", folder / "t1.nii.gz", "--labels", labels, "--out", tmp_path / "o.nii.gz",
                          "--model", teacher_checkpoint, "--no-cache")
    assert code == 2 and message in stderr and str(labels) in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o.nii.gz").exists()


def test_labels_on_another_grid_are_refused(case, tmp_path, capsys, teacher_checkpoint):
    folder, _ = case
    other = tmp_path / "other_grid.nii.gz"
    sitk.WriteImage(downsampled(folder / "painted.nii.gz", 8.0, sitk.sitkNearestNeighbor), str(other))
    code, _, stderr = run(capsys, "few-shot", folder / "t1.nii.gz", "--labels", other, "--out", tmp_path / "o.nii.gz",
                          "--model", teacher_checkpoint, "--no-cache")
    assert code == 2 and f"{other}: is not on the grid of" in stderr and len(stderr.strip().splitlines()) == 1
