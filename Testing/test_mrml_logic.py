"""The Qt-free Logic (`BrainDINOLib.logic.BrainDINOLogic`, shared by the Slicer module and the web page) end to
end on the real engine and real MRML nodes (slicer-core), imported directly, with no stand-in: features, PCA,
similarity, clusters, attention, few-shot segmentation, a saved head, the predictions table, and cancelling
on the torch worker thread.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from BrainDINOLib import BrainDINOError, CancelledError, Volume, mrml  # noqa: E402
from BrainDINOLib.logic import BrainDINOLogic, Job  # noqa: E402
from BrainDINOLib.volume import ras_to_lps  # noqa: E402

from conftest import REPO, SAMPLE_T1  # noqa: E402
from mrml_scene import slicer_scene  # noqa: E402
from volume_factories import downsampled  # noqa: E402

AAL = REPO / "BrainDINOLib" / "data" / "colin27_aal.nii.gz"


def read_coarse(path: Path, interpolator=sitk.sitkLinear, pixel=sitk.sitkFloat32, mm: float = 3.0) -> Volume:
    """The bundled 1 mm Colin27 (or its atlas) on a coarse grid: the whole flow in seconds."""
    return Volume.from_image(downsampled(path, mm, interpolator, pixel), source=path.name)


@pytest.fixture(scope="module")
def scene():
    with slicer_scene(slice_views=1) as scene:
        yield scene


@pytest.fixture(scope="module")
def logic(scene, teacher_checkpoint, tmp_path_factory):
    logic = BrainDINOLogic(scene, cache=tmp_path_factory.mktemp("cache"))
    logic.load_model(str(teacher_checkpoint), "cpu")
    yield logic
    logic.shutdown()


@pytest.fixture(scope="module")
def t1_node(scene):
    return mrml.volume_to_node(read_coarse(SAMPLE_T1), scene, "colin27 3mm")


@pytest.fixture(scope="module")
def features(logic, t1_node):
    volume = logic.volume_from_node(t1_node)
    progress = []
    features = logic.features(volume, logic.segmentation_layers(), progress=lambda d, t: progress.append((d, t)))
    assert progress and progress[-1][0] == progress[-1][1] == features.num_slices
    return features


def test_model_description_names_the_architecture_and_resolution(logic):
    from BrainDINOLib.session import segmentation_layers
    assert segmentation_layers(12) == (2, 5, 8, 11) and segmentation_layers(6) == (0, 2, 3, 5)
    assert segmentation_layers(3) == (0, 1, 2) == logic.segmentation_layers()
    text = logic.describe_model()
    assert "256" in text and logic.encoder.model_id in text and "cpu" in text
    assert "6 mm patches, slices every 6 mm, guided upsampling" in text  # the CPU default


def test_features_are_reused_in_memory(logic, t1_node, features):
    volume = logic.volume_from_node(t1_node)
    assert logic.features(volume, logic.segmentation_layers()) is features
    assert logic.features(volume) is features  # features with more blocks serve requests for fewer
    assert sorted(features.layers) == list(logic.segmentation_layers())


def test_an_unchanged_node_is_one_volume_whose_key_is_hashed_once(scene, logic, monkeypatch):
    """A similarity point dragged in Slicer asks for the node's volume and its features on every move: while the
    node is unchanged the Logic hands out the same Volume, whose cache key the session hashed once; changed voxels
    (marked Modified, as Slicer's arrayFromVolumeModified does) or a moved origin give a new Volume."""
    from vtk.util import numpy_support

    from BrainDINOLib import session as session_module
    from BrainDINOLib.cache import volume_key

    hashed = []

    def counted_key(*args):
        hashed.append(args[0])
        return volume_key(*args)
    monkeypatch.setattr(session_module, "volume_key", counted_key)
    node = mrml.volume_to_node(read_coarse(SAMPLE_T1, mm=6.0), scene, "colin27 6mm")  # its own: it is changed here
    volume = logic.volume_from_node(node)
    keys = {logic.session.cache_key(logic.volume_from_node(node)) for _ in range(3)}
    assert logic.volume_from_node(node) is volume and len(keys) == 1 and hashed == [volume]
    again = mrml.volume_from_node(node)  # the same voxels in another object: hashed, to the same key
    assert logic.session.cache_key(again) in keys and len(hashed) == 2

    scalars = node.GetImageData().GetPointData().GetScalars()
    numpy_support.vtk_to_numpy(scalars)[0] += 100.0
    scalars.Modified()
    changed = logic.volume_from_node(node)
    assert changed is not volume and logic.session.cache_key(changed) not in keys
    node.SetOrigin(*(np.array(node.GetOrigin()) + 5.0))
    moved = logic.volume_from_node(node)
    shift = np.subtract(moved.geometry.origin, changed.geometry.origin)
    assert moved is not changed and np.allclose(np.abs(shift), 5.0)


def test_pca_clusters_and_attention_land_on_the_input_grid(logic, t1_node, features):
    pca = logic.show_pca(logic.pca_map(features), t1_node, opacity=0.4)
    assert pca.GetImageData().GetDimensions() == t1_node.GetImageData().GetDimensions()
    assert pca.GetImageData().GetNumberOfScalarComponents() == 3
    rgb = mrml.node_array(pca)
    assert rgb.dtype == np.uint8 and rgb[mrml.node_array(t1_node) > 50].mean() > 20  # coloured inside the head
    clusters = logic.show_clusters(logic.cluster_map(features, 4), t1_node)
    assert set(np.unique(mrml.node_array(clusters))) <= set(range(5)) and mrml.node_array(clusters).max() > 0
    attention = logic.show_attention(logic.attention_map(logic.volume_from_node(t1_node)), t1_node)
    values = mrml.node_array(attention)
    assert values.shape == mrml.node_array(t1_node).shape and values.max() > 0


def test_similarity_peaks_at_the_clicked_point(scene, logic, t1_node, features):
    ijk = (30, 40, 33)  # node IJK (i, j, k): inside the brain
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    t1_node.GetIJKToRASMatrix(matrix)
    ras = matrix.MultiplyPoint((*ijk, 1.0))[:3]
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "probe")
    point.AddControlPoint(ras)
    similarity = logic.similarity_map(features, logic.point_lps(point, t1_node))
    node = logic.show_similarity(similarity, t1_node)
    values = mrml.node_array(node)
    i, j, k = ijk
    near = values[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2]  # within 3 mm of the click
    head = values[mrml.node_array(t1_node) > 50]
    # The tiny fixture has random weights: the map is high around the click (measured 0.68, between the
    # head's 95th and 99th percentiles), not sharply peaked.
    assert near.max() > np.percentile(head, 95) and values.max() <= 1.0 and values.min() >= -1.0
    assert node.GetDisplayNode().GetColorNodeID() == mrml.HEAT_COLORS
    # Moving the point reuses the similarity index.
    index = logic._similarity[1]
    logic.similarity_map(features, logic.point_lps(point, t1_node) + 4.0)
    assert logic._similarity[1] is index


def slice_node(scene, normal_ras, through_ras):
    """A slice view's node whose slice is normal to `normal_ras` (one of the RAS axes) through `through_ras`."""
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    normal = np.asarray(normal_ras, dtype=float)
    x_axis = np.roll(normal, 1)  # any other axis: only the normal and the centre matter here
    matrix = node.GetSliceToRAS()
    for row in range(3):
        for column, vector in enumerate((x_axis, np.cross(normal, x_axis), normal, through_ras)):
            matrix.SetElement(row, column, float(vector[row]))
    node.UpdateMatrices()
    return node


def test_similarity_on_the_planes_the_views_show(scene, logic, t1_node, features):
    """Axial, coronal and sagittal views through a point show voxel planes k, j, i of it (two planes where the
    slice lies between them); their similarity alone equals the whole map there."""
    volume = logic.volume_from_node(t1_node)
    kji = np.array([25, 40, 30])
    point = volume.geometry.index_to_lps(kji[None])[0]
    ras = ras_to_lps(point)  # the map is its own inverse
    between = ras_to_lps(volume.geometry.index_to_lps((kji + [0, 0.5, 0])[None])[0])  # halfway to row j + 1
    nodes = [slice_node(scene, (0, 0, 1), ras), slice_node(scene, (0, 1, 0), between),
             slice_node(scene, (1, 0, 0), ras)]
    planes = mrml.displayed_planes(nodes, volume.geometry)
    assert (planes.axial, planes.coronal, planes.sagittal) == ((25,), (40, 41), (30,))
    whole = logic.similarity_map(features, point).array
    shown = logic.similarity_planes(features, point, planes).array
    on_planes = np.zeros(whole.shape, dtype=bool)
    on_planes[25], on_planes[:, [40, 41]], on_planes[:, :, 30] = True, True, True
    np.testing.assert_array_equal(shown[on_planes], whole[on_planes])
    assert not shown[~on_planes].any()
    # Shown again in the same node, a map's new values go into the node's own image.
    node = logic.show_similarity(logic.similarity_map(features, point), t1_node)
    image = node.GetImageData()
    logic.show_similarity(Volume(shown, volume.geometry, volume.stored), t1_node, node)
    assert node.GetImageData() is image
    np.testing.assert_array_equal(mrml.volume_from_node(node).array, shown)
    oblique = slice_node(scene, (0, 0.6, 0.8), ras)
    assert mrml.displayed_planes([*nodes, oblique], volume.geometry) is None
    for node in [*nodes, oblique]:
        scene.RemoveNode(node)


def test_few_shot_segmentation_from_painted_slices(scene, logic, t1_node, features, tmp_path):
    heads = pytest.importorskip("BrainDINOLib.heads")
    atlas = read_coarse(AAL, sitk.sitkNearestNeighbor, sitk.sitkUInt8).array
    truth = np.isin(atlas, (3, 4)).astype(np.int16) + 2 * np.isin(atlas, (1, 2))  # superior frontal, precentral
    slices = [k for k in features.slices.slice_indices if (truth[k] > 0).sum() > 40]
    examples = [slices[len(slices) // 3], slices[2 * len(slices) // 3]]  # two painted slices keep it quick
    painted = np.zeros_like(truth)
    painted[examples] = truth[examples]
    volume = logic.volume_from_node(t1_node)
    classes = [mrml.LabelClass(1, "superior frontal", (200, 120, 60)), mrml.LabelClass(2, "precentral", (60, 160, 220))]
    examples_node = mrml.segmentation_from_labels(volume.with_array(painted), t1_node, classes, name="examples")

    few_shot = logic.painted_labels(examples_node, t1_node)
    assert few_shot.slice_indices == tuple(examples)
    result = logic.learn_from_painted(volume, few_shot)
    output = logic.show_segmentation(result.labels, t1_node, few_shot.classes)
    assert [c.name for c in mrml.segment_classes(output)] == ["superior frontal", "precentral"]
    assert [c.colour for c in mrml.segment_classes(output)] == [c.colour for c in classes]
    labels, _ = mrml.labels_from_segmentation(output, t1_node)
    np.testing.assert_array_equal(labels.array, result.labels.array)
    # The fixture is a tiny random-weight model, so accuracy is not the point here (the self-test in Slicer
    # measures it with the demo model): both classes are predicted beyond the painted slices.
    unseen = [k for k in features.slices.slice_indices if k not in examples]
    assert all((labels.array[unseen] == value).sum() > 0 for value in (1, 2))

    # The fitted head, saved and applied through the "saved head" path, segments the same.
    path = heads.save_head(result.head, tmp_path / "few_shot_head.safetensors")
    head = logic.load_head(path)
    np.testing.assert_array_equal(logic.segment_with_head(head, volume).array, result.labels.array)


def test_subject_head_prediction_lands_in_a_table(scene, logic, t1_node, features, tmp_path):
    """A classification head saved as `fit-head` saves one (weights random: the wiring is what is tested)."""
    import torch
    from BrainDINOLib.heads import Head, HeadCard, load_head, save_head
    from BrainDINOLib.heads.card import make_classes
    from BrainDINOLib.heads.storage import build_module

    torch.manual_seed(0)
    dim = features.cls.shape[1]
    card = HeadCard(task="classification", kind="subject-mlp", encoder_id=features.model_id,
                    classes=make_classes([0, 1], ["T1-like", "T2-like"]),
                    module={"token_dim": 2 * dim, "out_dim": 2})
    path = save_head(Head(card, build_module(card).eval()), tmp_path / "sequence.safetensors")
    head = logic.load_head(path)
    prediction = logic.predict_subject(head, logic.volume_from_node(t1_node))
    assert prediction == load_head(path).predict(features)
    table = logic.show_prediction(prediction, path.stem, t1_node.GetName())
    (row,) = mrml.rows_from_table(table)
    assert row["subject"] == t1_node.GetName() and row["head"] == "sequence"
    assert row["class"] in ("T1-like", "T2-like")
    assert row["probabilities.T1-like"] + row["probabilities.T2-like"] == pytest.approx(1.0)
    with pytest.raises(Exception, match="segmentation head"):
        few_shot_head = HeadCard(task="segmentation", kind="linear", encoder_id=features.model_id)
        logic.predict_subject(Head(few_shot_head, torch.nn.Identity()), logic.volume_from_node(t1_node))


def test_prediction_rows_go_into_one_table(scene, logic):
    table = logic.show_prediction({"class": "T1", "probabilities": {"T1": 0.9, "T2": 0.1}}, "sequence", "case A")
    table = logic.show_prediction({"value": 71.5}, "age", "case A", table)
    table = logic.show_prediction({"class": "T2", "probabilities": {"T1": 0.3, "T2": 0.7}}, "sequence", "case A",
                                 table)
    rows = mrml.rows_from_table(table)
    assert [(r["subject"], r["head"]) for r in rows] == [("case A", "age"), ("case A", "sequence")]
    assert rows[1]["class"] == "T2" and rows[1]["probabilities.T2"] == pytest.approx(0.7)
    assert rows[0]["value"] == pytest.approx(71.5)


def test_worker_runs_jobs_off_the_main_thread_and_cancels(logic, t1_node):
    from BrainDINOLib import embed_volume

    volume = logic.volume_from_node(t1_node)
    worker = logic.worker
    outcome: dict = {}
    threads = []

    def work(progress, cancel):
        threads.append(threading.current_thread())
        progress(1, 2)
        return 42

    worker.submit(Job("answer", work, lambda r: outcome.update(result=r)))
    worker.wait()
    assert outcome == {"result": 42} and threads[0] is not threading.main_thread()

    started = threading.Event()

    def slow(progress, cancel):
        started.set()
        while not cancel():
            threading.Event().wait(0.01)
        return embed_volume(volume, logic.encoder, cancel=cancel)

    worker.submit(Job("embedding", slow, lambda r: outcome.update(late=r), lambda e: outcome.update(error=e)))
    worker.submit(Job("queued", work, lambda r: outcome.update(queued=r), lambda e: outcome.update(dropped=e)))
    assert started.wait(30)
    worker.cancel()
    worker.wait()
    assert isinstance(outcome["error"], CancelledError) and "late" not in outcome
    assert isinstance(outcome["dropped"], CancelledError) and "queued" not in outcome  # dropped, yet told
    assert not worker.busy
    worker.submit(Job("after", work, lambda r: outcome.update(after=r)))  # a cancel stops only what came before
    worker.wait()
    assert outcome["after"] == 42


def test_scene_cases_and_typed_targets_become_a_manifest(scene, tmp_path):
    """The Fine-tune panel's cases (shared with the web page): the scene's input volumes, never BrainDINO's
    outputs; typed targets checked before any work; auto splits held out; written as a cases CSV."""
    from BrainDINOLib.logic import OUTPUT_ATTRIBUTE, SceneCase

    logic = BrainDINOLogic(scene, cache=None)
    try:
        import SimpleITK as sitk

        small = Volume.from_image(sitk.Image([6, 5, 4], sitk.sitkFloat32))
        noise = np.random.default_rng(0)
        nodes = [mrml.volume_to_node(small.with_array(noise.random(small.shape, np.float32)), scene, f"subject {i}")
                 for i in range(4)]
        made = mrml.volume_to_node(small, scene, "a BrainDINO map")
        made.SetAttribute(OUTPUT_ATTRIBUTE, "1")
        offered = [c.volume for c in logic.scene_cases() if c.volume.GetName().startswith(("subject", "a Brain"))]
        assert offered == nodes

        with pytest.raises(BrainDINOError, match="subject 2: target 'old' is not a number"):
            logic.collect_cases([SceneCase(n, target=t) for n, t in zip(nodes, ["61", "70.5", "old", "55"])],
                                "regression")
        with pytest.raises(BrainDINOError, match="survival target"):
            logic.collect_cases([SceneCase(nodes[0], target="12")], "survival")
        cases = logic.collect_cases([SceneCase(n, target=t, split=s) for n, t, s in
                                     zip(nodes, ["61", "70.5", "48", "55"], ["auto", "auto", "auto", "test"])],
                                    "regression", test_fraction=0.25)
        assert cases.splits.count("test") == 1 and cases.splits[3] == "test"  # the typed split counts
        manifest = cases.write(tmp_path / "cases")
        rows = manifest.read_text().splitlines()
        assert rows[0] == "case,split,image,target" and rows[4].startswith("subject 3,test,003_subject_3.nii,55")
        assert all((tmp_path / "cases" / f"00{i}_subject_{i}.nii").is_file() for i in range(4))
    finally:
        logic.shutdown()
