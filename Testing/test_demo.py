"""`braindino demo` end to end with small settings: the sample and atlas at 4 mm, the tiny fixture model."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SAMPLE_T1
from matplotlib.image import imread
from volume_factories import downsampled

from BrainDINOLib.cli import main
from BrainDINOLib.atlas import COLIN27_AAL, LOBES, aal_names, merge_aal_into_lobes
from BrainDINOLib.demo import LEFT_PUTAMEN, DemoConfig, run_demo
from BrainDINOLib.resolution import ResolutionPolicy
from BrainDINOLib.volume import read_volume


def test_the_named_point_is_in_the_left_putamen():
    atlas = read_volume(COLIN27_AAL)
    kji = tuple(np.rint(atlas.geometry.lps_to_index(LEFT_PUTAMEN.lps[None])[0]).astype(int))
    assert aal_names()[int(atlas.array[kji])] == "Putamen_L"
    lobes, _ = merge_aal_into_lobes(np.rint(atlas.array).astype(np.int64))
    assert lobes[kji] == list(LOBES).index("deep grey matter") + 1
    assert set(np.unique(lobes)) == set(range(len(LOBES) + 1))  # every AAL region lands in a lobe
    assert ((atlas.array > 0) == (lobes > 0)).all()


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_inputs")
    t1 = downsampled(SAMPLE_T1, 4.0)
    atlas = sitk.Resample(sitk.ReadImage(str(COLIN27_AAL)), t1, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(t1, str(folder / "t1.nii.gz"))
    sitk.WriteImage(atlas, str(folder / "aal.nii.gz"))
    return folder / "t1.nii.gz", folder / "aal.nii.gz"


def test_demo_runs_end_to_end(small_sample, teacher_checkpoint, tmp_path):
    t1, atlas = small_sample
    config = DemoConfig(volume=t1, atlas=atlas, model=teacher_checkpoint, policy=ResolutionPolicy(patch_mm=16.0),
                        clusters=4, labelled_slices=3)
    steps = []
    result = run_demo(tmp_path / "demo", config, on_step=lambda name, seconds: steps.append(name))
    assert steps == list(result.seconds) and len(steps) == 8 and all(s >= 0 for s in result.seconds.values())
    assert set(result.dice) <= set(LOBES) and len(result.dice) >= 5
    assert all(0.0 <= d <= 1.0 for d in result.dice.values())
    assert set(result.dice_compared) == set(result.dice)  # the same lobes at the old resolution
    reference = sitk.ReadImage(str(t1))
    volumes = [p for p in result.outputs.values() if p.name.endswith(".nii.gz")]
    assert len(volumes) == 4
    for path in volumes:
        written = sitk.ReadImage(str(path))
        assert written.GetSize() == reference.GetSize()
        np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    assert imread(str(result.outputs["report picture"])).shape[0] > 500
    assert sorted(p.name for p in (tmp_path / "demo").iterdir() if p.suffix == ".png") == ["report.png"]


def test_demo_without_the_bundled_model_says_so(tmp_path, capsys, monkeypatch):
    from BrainDINOLib import checkpoints
    monkeypatch.setitem(checkpoints.BUILTIN_MODELS, "demo", tmp_path / "missing" / "demo.safetensors")
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert "the demo model is not bundled in this installation" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
