"""BrainDINOLib.mrml against Slicer's real MRML (the slicer-core wheel): real scene, nodes, readers and
segmentation logic. Geometry must survive node <-> Volume exactly, including oblique directions."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
import vtk.util.numpy_support  # noqa: E402

from BrainDINOLib import BrainDINOError, read_volume  # noqa: E402
from BrainDINOLib import mrml  # noqa: E402

from conftest import SAMPLE_T1  # noqa: E402
from mrml_scene import slicer_scene  # noqa: E402


@pytest.fixture
def scene():
    with slicer_scene(slice_views=2) as scene:
        yield scene


@pytest.fixture(scope="module")
def sample():
    return read_volume(SAMPLE_T1)


@pytest.fixture(scope="module")
def oblique_file(tmp_path_factory):
    """A small anisotropic volume with an oblique direction (rotated about all three axes), as NRRD."""
    rng = np.random.default_rng(0)
    array = rng.normal(100, 20, size=(9, 14, 11)).astype(np.float32)  # [k, j, i]
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 1.3, 2.5))
    image.SetOrigin((12.5, -40.25, 7.0))
    image.SetDirection(tuple(Rotation.from_euler("xyz", [17, -23, 31], degrees=True).as_matrix().ravel()))
    path = tmp_path_factory.mktemp("oblique") / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def load_with_slicer(scene, path, name="loaded"):
    """Read a file with Slicer's own volume reader (ITK IO through vtkMRMLVolumeArchetypeStorageNode)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def assert_same_geometry(a, b, tol=1e-9):
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


def assert_same_volume(a, b, tol=1e-9):
    np.testing.assert_array_equal(a.array, b.array)
    assert_same_geometry(a.geometry, b.geometry, tol)
    assert_same_geometry(a.stored, b.stored, tol)


# ---- volumes -----------------------------------------------------------------------------------------------

def test_node_loaded_by_slicer_is_the_volume_read_by_the_engine(scene, sample):
    node = load_with_slicer(scene, SAMPLE_T1)
    volume = mrml.volume_from_node(node)
    assert volume.array.dtype == np.float32 and volume.shape == (181, 217, 181)
    assert_same_volume(volume, sample, tol=1e-6)
    # Slicer stores colin27 as RAS identity at (-90, -125, -71); the canonical LPS grid flips i and j.
    np.testing.assert_allclose(ijk_to_ras(node)[:3, 3], (-90, -125, -71))
    assert volume.geometry.orientation == "LPS"


def test_sample_round_trips_through_a_node_bit_for_bit(scene, sample):
    node = mrml.volume_to_node(sample, scene, "colin27")
    reference = load_with_slicer(scene, SAMPLE_T1)
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(reference), atol=1e-9)
    np.testing.assert_array_equal(mrml.node_array(node), mrml.node_array(reference).astype(np.float32))
    assert_same_volume(mrml.volume_from_node(node), sample)


def test_oblique_volume_geometry_is_exact_both_ways(scene, oblique_file):
    engine = read_volume(oblique_file)
    node = load_with_slicer(scene, oblique_file, "oblique")
    from_node = mrml.volume_from_node(node)
    assert_same_volume(from_node, engine, tol=1e-6)
    # A voxel's RAS position from Slicer's IJK-to-RAS equals the engine's LPS position with x, y negated.
    stored = sitk.ReadImage(str(oblique_file))
    ijk = np.array([3, 7, 5])
    ras = ijk_to_ras(node) @ np.append(ijk, 1.0)
    lps = np.asarray(stored.TransformContinuousIndexToPhysicalPoint(ijk.astype(float)))
    np.testing.assert_allclose(ras[:3], mrml.RAS_FROM_LPS @ lps, atol=1e-6)
    canonical_kji = engine.geometry.lps_to_index(lps[None])[0]
    np.testing.assert_allclose(engine.geometry.index_to_lps(canonical_kji[None])[0], lps, atol=1e-9)
    assert engine.array[tuple(np.round(canonical_kji).astype(int))] == sitk.GetArrayFromImage(stored)[5, 7, 3]
    # Back to a node: the same IJK-to-RAS and the same voxels as the node Slicer read.
    rebuilt = mrml.volume_to_node(from_node, scene, "rebuilt")
    np.testing.assert_allclose(ijk_to_ras(rebuilt), ijk_to_ras(node), atol=1e-9)
    np.testing.assert_array_equal(mrml.node_array(rebuilt), mrml.node_array(node))
    assert_same_volume(mrml.volume_from_node(rebuilt), engine)


def test_unusable_nodes_are_refused_by_name(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty scan")
    with pytest.raises(BrainDINOError, match="empty scan: has no image data"):
        mrml.volume_from_node(empty)
    constant = mrml.volume_to_node(read_volume(SAMPLE_T1).with_array(np.full((181, 217, 181), 3, np.float32)),
                                   scene, "flat")
    with pytest.raises(BrainDINOError, match="flat: is constant"):
        mrml.volume_from_node(constant)


# ---- maps --------------------------------------------------------------------------------------------------

def test_rgb_map_becomes_a_vector_node_in_the_foreground(scene, oblique_file):
    reference = load_with_slicer(scene, oblique_file, "oblique")
    volume = mrml.volume_from_node(reference)
    rgb = np.random.default_rng(1).integers(0, 256, size=(*volume.shape, 3), dtype=np.uint8)
    node = mrml.show_rgb_map(volume.with_array(rgb), reference, opacity=0.7)
    assert node.IsA("vtkMRMLVectorVolumeNode") and node.GetDisplayNode().IsA("vtkMRMLVectorVolumeDisplayNode")
    image = node.GetImageData()
    assert image.GetNumberOfScalarComponents() == 3 and image.GetScalarTypeAsString() == "unsigned char"
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(reference), atol=1e-9)
    np.testing.assert_array_equal(mrml.volume_from_node(node, dtype=None).array, rgb)
    # What the slice views draw: the display pipeline's RGBA output carries the colours unchanged.
    display = node.GetDisplayNode()
    display.SetInputImageDataConnection(node.GetImageDataConnection())
    display.UpdateImageDataPipeline()
    producer = display.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    shown = vtk.util.numpy_support.vtk_to_numpy(producer.GetOutputDataObject(0).GetPointData().GetScalars())
    np.testing.assert_array_equal(shown[:, :3], mrml.node_array(node).reshape(-1, 3))
    for composite in mrml._nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        assert composite.GetForegroundVolumeID() == node.GetID()
        assert composite.GetBackgroundVolumeID() == reference.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.7)
    # Updating in place keeps the node and changes its voxels.
    again = mrml.show_rgb_map(volume.with_array(255 - rgb), reference, node=node)
    assert again is node
    np.testing.assert_array_equal(mrml.volume_from_node(node, dtype=None).array, 255 - rgb)
    mrml.set_foreground_opacity(scene, 0.2)
    assert mrml._nodes_of_class(scene, "vtkMRMLSliceCompositeNode")[0].GetForegroundOpacity() == pytest.approx(0.2)


def test_scalar_map_has_a_colour_table_and_fixed_range(scene, sample):
    reference = mrml.volume_to_node(sample, scene, "t1")
    similarity = sample.with_array(np.linspace(-1, 1, sample.array.size, dtype=np.float32).reshape(sample.shape))
    node = mrml.show_scalar_map(similarity, reference, "similarity", value_range=(0.0, 1.0), transparent_below=0.0)
    display = node.GetDisplayNode()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == 0.0 and display.GetUpperThreshold() == 1.0
    assert display.GetColorNodeID() == mrml.HEAT_COLORS
    assert not display.GetAutoWindowLevel()
    assert display.GetWindow() == pytest.approx(1.0) and display.GetLevel() == pytest.approx(0.5)
    assert_same_volume(mrml.volume_from_node(node), similarity)


def test_cluster_map_becomes_a_label_layer(scene, sample):
    reference = mrml.volume_to_node(sample, scene, "t1")
    clusters = sample.with_array((np.arange(sample.array.size) % 5).reshape(sample.shape).astype(np.int16))
    node = mrml.show_label_map(clusters, reference, "clusters")
    assert node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetDisplayNode().GetColorNodeID() == mrml.LABEL_COLORS
    assert mrml._nodes_of_class(scene, "vtkMRMLSliceCompositeNode")[0].GetLabelVolumeID() == node.GetID()
    assert_same_volume(mrml.volume_from_node(node, dtype=None), clusters)


# ---- segmentations -----------------------------------------------------------------------------------------

CLASSES = (mrml.LabelClass(1, "ventricles", (0, 128, 255)), mrml.LabelClass(4, "white matter", (250, 250, 210)),
           mrml.LabelClass(7, "lesion", (255, 0, 0)))


def oblique_labels(volume):
    labels = np.zeros(volume.shape, np.int16)
    labels[2:5, 3:8, 2:6] = 1
    labels[5:8, 6:12, 5:10] = 4  # value 7 ("lesion") is absent: it must still get an (empty) segment
    return volume.with_array(labels)


def test_label_volume_becomes_named_coloured_segments_and_back(scene, oblique_file):
    reference = load_with_slicer(scene, oblique_file, "oblique")
    volume = mrml.volume_from_node(reference)
    labels = oblique_labels(volume)
    node = mrml.segmentation_from_labels(labels, reference, CLASSES, name="tissue")
    assert node.IsA("vtkMRMLSegmentationNode")
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is reference
    classes = mrml.segment_classes(node)
    assert [c.name for c in classes] == ["ventricles", "white matter", "lesion"]
    assert [c.colour for c in classes] == [c.colour for c in CLASSES]
    back, back_classes = mrml.labels_from_segmentation(node, reference)
    assert back_classes == classes
    # Segment n is value n when read back: 1 -> 1, 4 -> 2; the empty "lesion" segment paints nothing.
    expected = np.select([labels.array == 1, labels.array == 4], [1, 2], 0)
    np.testing.assert_array_equal(back.array, expected)
    assert_same_geometry(back.geometry, volume.geometry)
    # Writing again into the same node replaces its segments.
    again = mrml.segmentation_from_labels(labels.with_array((labels.array == 1).astype(np.int16)), reference,
                                          CLASSES[:1], node=node)
    assert again is node and [c.name for c in mrml.segment_classes(node)] == ["ventricles"]


def paint(segmentation, segment_id, mask, reference):
    """Set a segment from a binary [k, j, i] mask on the reference node's grid, as a Segment Editor stroke."""
    scene = reference.GetScene()
    stroke = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "stroke")
    stroke.SetAndObserveImageData(mrml._vtk_image(mask))
    stroke.CopyOrientation(reference)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = logic.CreateOrientedImageDataFromVolumeNode(stroke)
    assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE)
    scene.RemoveNode(stroke)


def test_painted_slices_become_few_shot_labels(scene, sample):
    reference = mrml.volume_to_node(sample, scene, "t1")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentation.CreateDefaultDisplayNodes()
    painted = {40: (60, 90, 70, 100), 95: (100, 130, 80, 120), 150: (80, 110, 60, 90)}  # k: j0, j1, i0, i1
    for name, colour in (("grey", (0.5, 0.5, 0.5)), ("blob", (0.9, 0.2, 0.1))):
        segmentation.GetSegmentation().AddEmptySegment(name, name, colour)
    # Paint like Segment Editor does: binary labelmaps on the reference grid (node IJK order).
    stored = read_volume(SAMPLE_T1).stored
    grey = np.zeros(stored.size[::-1], np.uint8)
    blob = np.zeros_like(grey)
    for k, (j0, j1, i0, i1) in painted.items():
        grey[k, j0:j1, i0:i1] = 1
        blob[k, j0 + 5:j0 + 10, i0 + 5:i0 + 10] = 1  # painted over grey: blob wins where they overlap
    paint(segmentation, "grey", grey, reference)
    paint(segmentation, "blob", blob, reference)

    few_shot = mrml.painted_labels(segmentation, reference)
    assert few_shot.class_names == ["grey", "blob"]
    assert few_shot.classes[1].colour == (230, 51, 26)
    # Stored RAS (axial k unchanged), canonical LPS flips i and j but keeps k: the same axial slices.
    assert few_shot.slice_indices == (40, 95, 150)
    assert_same_geometry(few_shot.labels.geometry, sample.geometry)
    expected = np.where(blob == 1, 2, grey)[:, ::-1, ::-1]
    np.testing.assert_array_equal(few_shot.labels.array, expected)


def test_unpainted_segmentations_are_refused(scene, sample):
    reference = mrml.volume_to_node(sample, scene, "t1")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(BrainDINOError, match="nothing: has no segments"):
        mrml.painted_labels(segmentation, reference)
    segmentation.GetSegmentation().AddEmptySegment("a", "a")
    with pytest.raises(BrainDINOError, match="nothing: has no painted voxels"):
        mrml.painted_labels(segmentation, reference)


# ---- tables and points -------------------------------------------------------------------------------------

def test_predictions_become_a_table(scene):
    rows = [{"head": "sex", "class": "female", "probability": 0.81},
            {"head": "age", "value": 63.5},
            {"head": "survival", "risk": -0.2, "class": None}]
    node = mrml.table_from_rows(rows, scene, "predictions")
    table = node.GetTable()
    assert table.GetNumberOfRows() == 3 and table.GetNumberOfColumns() == 5
    back = mrml.rows_from_table(node)
    assert back[0]["head"] == "sex" and back[0]["class"] == "female"
    assert back[0]["probability"] == pytest.approx(0.81) and np.isnan(back[1]["probability"])
    assert back[1]["value"] == pytest.approx(63.5) and back[2]["risk"] == pytest.approx(-0.2)
    assert back[2]["class"] == ""
    mrml.table_from_rows(rows[:1], node=node)
    assert node.GetTable().GetNumberOfRows() == 1


def test_markups_point_is_lps_in_the_volume_frame(scene, sample):
    reference = mrml.volume_to_node(sample, scene, "t1")
    point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "probe")
    point.AddControlPointWorld(vtk.vtkVector3d(10.0, -20.0, 30.0))
    np.testing.assert_allclose(mrml.point_lps(point, 0, reference), (-10.0, 20.0, 30.0))
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 5.0)
    shift.SetMatrixTransformToParent(matrix)
    reference.SetAndObserveTransformNodeID(shift.GetID())
    # The volume moved 5 mm to the right (RAS +x): the same world point is 5 mm further left in its frame.
    np.testing.assert_allclose(mrml.point_lps(point, 0, reference), (-5.0, 20.0, 30.0))
    with pytest.raises(BrainDINOError, match="probe: has no control point 1"):
        mrml.point_lps(point, 1, reference)
