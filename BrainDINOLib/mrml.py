"""The one adapter between 3D Slicer's MRML scene and the engine's types. Nothing else in BrainDINOLib imports
`slicer` or `vtk`.

Geometry. A Slicer volume node is a voxel grid (vtkImageData, IJK) plus an IJK-to-RAS matrix (spacing,
origin, direction cosines, possibly oblique). The engine's `Volume` is canonical LPS with `stored`, the grid
it came from. `volume_from_node` turns the node's grid into a SimpleITK image in LPS (RAS with x and y
negated) and reorients it exactly like `read_volume` does, so a node loaded from a file gives the same
`Volume` (and the same feature-cache key) as reading that file with the CLI. `volume_to_node` goes back
through `Volume.to_stored_image`, so every map lands on exactly the input node's IJK grid.

Nodes are expressed in their parent transform's coordinates (a map node copies its reference node's parent
transform), and markups points are brought into that frame before use (`point_lps`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .errors import BrainDINOError
from .features import Planes
from .heads.card import ClassInfo
from .heads.painted import PaintedLabels
from .heads.painted import painted_labels as painted_from_volume
from .volume import Geometry, Volume, ras_to_lps

log = logging.getLogger(__name__)

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse

# Colour nodes that Slicer's Colors module always creates (procedural: no file needed).
HEAT_COLORS = "vtkMRMLPETProceduralColorNodePET-Heat"
LABEL_COLORS = "vtkMRMLColorTableNodeLabels"


class LabelClass(NamedTuple):
    """One class of a label volume: its voxel value, a name and an RGB colour (0-255).

    `BrainDINOLib.heads.card.ClassInfo` has the same fields, so head cards can be passed where these are.
    """

    value: int
    name: str
    colour: tuple[int, int, int]


class ClassLike(Protocol):
    value: int
    name: str
    colour: tuple[int, int, int]


# ---- geometry ----------------------------------------------------------------------------------------------

def _image_data(node) -> vtk.vtkImageData:
    image = node.GetImageData() if node is not None else None
    if image is None or image.GetNumberOfPoints() == 0:
        name = node.GetName() if node is not None else "volume"
        raise BrainDINOError(name, "has no image data (load or compute a volume first)")
    return image


def modified_times(node) -> tuple[int, int]:
    """VTK's modification times of a volume node (geometry, name) and of its image data (voxels, once a changed
    array is marked `Modified`, as `slicer.util.arrayFromVolumeModified` does)."""
    return node.GetMTime(), _image_data(node).GetMTime()


def geometry_from_node(node) -> Geometry:
    """The LPS `Geometry` of a volume node's IJK grid (in its parent transform's frame)."""
    image = _image_data(node)
    extent = image.GetExtent()
    if extent[0::2] != (0, 0, 0):
        raise BrainDINOError(node.GetName(), f"image extent {extent} does not start at voxel 0")
    directions = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(directions)
    ras = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
    lps = RAS_FROM_LPS @ ras
    origin = RAS_FROM_LPS @ np.asarray(node.GetOrigin(), dtype=np.float64)
    return Geometry(tuple(int(s) for s in image.GetDimensions()), tuple(float(s) for s in node.GetSpacing()),
                    tuple(float(o) for o in origin), tuple(float(d) for d in lps.ravel()))


def set_node_geometry(node, geometry: Geometry) -> None:
    """Give a volume node the IJK-to-RAS matrix of an LPS `Geometry`."""
    ras = RAS_FROM_LPS @ np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    directions = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            directions.SetElement(r, c, ras[r, c])
    node.SetIJKToRASDirectionMatrix(directions)
    node.SetSpacing(*geometry.spacing)
    node.SetOrigin(*(RAS_FROM_LPS @ np.asarray(geometry.origin, dtype=np.float64)))


def node_array(node) -> np.ndarray:
    """A copy of a volume node's voxels: [k, j, i] (or [k, j, i, C]) in the node's own IJK order."""
    image = _image_data(node)
    scalars = image.GetPointData().GetScalars()
    columns, rows, depth = image.GetDimensions()
    components = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars).reshape(depth, rows, columns, components)
    return np.array(array[..., 0] if components == 1 else array)


def volume_from_node(node, dtype: np.dtype | None = np.float32) -> Volume:
    """A volume node as a canonical-LPS `Volume` (identical to `read_volume` of the file it was loaded from).

    `dtype` float32 (the default, for model input) also refuses non-finite and constant volumes as
    `read_volume` does; `None` keeps the node's voxel type (label maps).
    """
    name = node.GetName() if node is not None else "volume"
    geometry = geometry_from_node(node)
    if min(geometry.size) < 2:
        raise BrainDINOError(name, f"is a single slice (size {geometry.size}); BrainDINO needs a 3-D volume")
    array = node_array(node)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
        if np.issubdtype(array.dtype, np.floating):
            _require_usable(array, name)
    image = geometry.apply_to(sitk.GetImageFromArray(array, isVector=array.ndim == 4))
    return Volume.from_image(image, source=name)


def _require_usable(array: np.ndarray, name: str) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        raise BrainDINOError(name, f"contains {int((~finite).sum())} NaN or infinite voxels")
    if float(array.min()) == float(array.max()):
        raise BrainDINOError(name, f"is constant (every voxel is {float(array.min()):g}); there is no image to analyse")


def _vtk_image(array: np.ndarray) -> vtk.vtkImageData:
    """[k, j, i] or [k, j, i, C] numpy -> vtkImageData (deep copy; bool becomes uint8)."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    depth, rows, columns = array.shape[:3]
    components = array.shape[3] if array.ndim == 4 else 1
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).reshape(-1, components), deep=True)
    image = vtk.vtkImageData()
    image.SetDimensions(columns, rows, depth)
    image.GetPointData().SetScalars(scalars)
    return image


def _write_in_place(node, array: np.ndarray) -> bool:
    """Write voxels [k, j, i(, C)] into the node's own image if it has that shape and type (a map shown again for
    a new point): no new image for the views to take up, only new values. False if it cannot."""
    image = node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    components = array.shape[3] if array.ndim == 4 else 1
    if scalars is None or image.GetDimensions() != array.shape[2::-1] or array.dtype == bool \
            or scalars.GetNumberOfComponents() != components \
            or scalars.GetDataType() != numpy_support.get_vtk_array_type(array.dtype):
        return False
    numpy_support.vtk_to_numpy(scalars).reshape(-1, components)[:] = array.reshape(-1, components)
    scalars.Modified()
    image.Modified()
    node.Modified()  # what slice views observe to draw the new values
    return True


def volume_to_node(volume: Volume, scene=None, name: str = "", class_name: str = "vtkMRMLScalarVolumeNode",
                   node=None, reference=None):
    """Put a `Volume` (or map) into a volume node on its stored grid; reuse `node` if given.

    With a `reference` node the new node sits under the same parent transform, so it overlays it exactly.
    """
    if node is None:
        scene = scene or (reference.GetScene() if reference is not None else slicer.mrmlScene)
        node = scene.AddNewNodeByClass(class_name, name or volume.source or "BrainDINO")
    elif name:
        node.SetName(name)
    image = volume.to_stored_image()
    array = sitk.GetArrayViewFromImage(image)  # a view: `image` stays alive while it is read
    if not _write_in_place(node, array):
        node.SetAndObserveImageData(_vtk_image(array))
    set_node_geometry(node, Geometry.of(image))
    if reference is not None:
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# ---- display -----------------------------------------------------------------------------------------------

def show_in_slice_views(scene, background=None, foreground=None, label=None, foreground_opacity: float | None = None):
    """Set the background/foreground/label layers of every slice view (None leaves a layer as it is)."""
    for composite in _nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if label is not None:
            composite.SetLabelVolumeID(label.GetID())
        if foreground_opacity is not None:
            composite.SetForegroundOpacity(float(foreground_opacity))


def set_foreground_opacity(scene, opacity: float) -> None:
    show_in_slice_views(scene, foreground_opacity=opacity)


def _nodes_of_class(scene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def show_rgb_map(rgb: Volume, reference, name: str = "BrainDINO PCA", node=None, opacity: float = 0.5):
    """A uint8 [Z, Y, X, 3] map as an RGB `vtkMRMLVectorVolumeNode`, shown in the foreground layer."""
    if rgb.array.ndim != 4 or rgb.array.shape[3] != 3:
        raise ValueError(f"an RGB map has shape [Z, Y, X, 3], not {rgb.array.shape}")
    rgb = rgb.with_array(np.asarray(rgb.array, dtype=np.uint8))
    node = volume_to_node(rgb, name=name, class_name="vtkMRMLVectorVolumeNode", node=node, reference=reference)
    display = node.GetDisplayNode()  # window 255 at level 127.5 maps 0..255 to itself: the colours as computed
    display.AutoWindowLevelOff()
    display.SetWindowLevel(255.0, 127.5)
    show_in_slice_views(reference.GetScene(), background=reference, foreground=node, foreground_opacity=opacity)
    return node


def show_scalar_map(values: Volume, reference, name: str = "BrainDINO map", node=None,
                    colors: str = HEAT_COLORS, value_range: tuple[float, float] | None = None,
                    opacity: float = 0.5, transparent_below: float | None = None):
    """A float map as a scalar volume with a colour table and a fixed display range, shown in the foreground.

    Voxels below `transparent_below` (if given) are not drawn, so the background shows through.
    """
    node = volume_to_node(values.with_array(np.asarray(values.array, dtype=np.float32)), name=name, node=node,
                          reference=reference)
    display = node.GetDisplayNode()
    scene = reference.GetScene()
    if scene.GetNodeByID(colors) is not None:
        display.SetAndObserveColorNodeID(colors)
    else:
        log.warning("colour table %s is not in the scene; %s keeps its default colours", colors, name)
    low, high = value_range if value_range is not None else (float(values.array.min()), float(values.array.max()))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    if transparent_below is not None:
        display.SetApplyThreshold(True)
        display.SetThreshold(float(transparent_below), max(high, float(values.array.max())))
    show_in_slice_views(scene, background=reference, foreground=node, foreground_opacity=opacity)
    return node


def show_label_map(labels: Volume, reference, name: str = "BrainDINO labels", node=None,
                   colors: str = LABEL_COLORS):
    """An integer map (clusters) as a label-map volume in the label layer."""
    node = volume_to_node(labels.with_array(np.asarray(labels.array, dtype=np.int16)), name=name, node=node,
                          class_name="vtkMRMLLabelMapVolumeNode", reference=reference)
    if reference.GetScene().GetNodeByID(colors) is not None:
        node.GetDisplayNode().SetAndObserveColorNodeID(colors)
    show_in_slice_views(reference.GetScene(), background=reference, label=node)
    return node


# ---- segmentations -----------------------------------------------------------------------------------------

def _segmentation_logic():
    return slicer.vtkSlicerSegmentationsModuleLogic


def _colour_table(scene, classes: Sequence[ClassLike], name: str):
    """A user colour table naming and colouring each class value (temporary: for labelmap import)."""
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    table.SetTypeToUser()
    table.SetNumberOfColors(max(c.value for c in classes) + 1)
    table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for c in classes:
        r, g, b = (v / 255.0 for v in c.colour)
        table.SetColor(int(c.value), c.name, r, g, b, 1.0)
    return table


def segmentation_from_labels(labels: Volume, reference, classes: Sequence[ClassLike],
                             name: str = "BrainDINO segmentation", node=None):
    """A label volume as a `vtkMRMLSegmentationNode`: one named, coloured segment per class (in the order of
    `classes`, empty ones included), the reference volume as reference geometry. Reuses `node`, replacing
    its segments."""
    if not classes:
        raise ValueError("segmentation_from_labels needs at least one class")
    if min(c.value for c in classes) < 1:
        raise ValueError("class values must be >= 1 (0 is background)")
    scene = reference.GetScene()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    labelmap = volume_to_node(labels.with_array(np.asarray(labels.array, dtype=np.int16)),
                              class_name="vtkMRMLLabelMapVolumeNode", name=f"{name} labels", reference=reference)
    table = _colour_table(scene, classes, f"{name} colours")
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
    try:
        if not _segmentation_logic().ImportLabelmapToSegmentationNode(labelmap, node):
            raise RuntimeError(f"Slicer could not import the label map into {node.GetName()}")
    finally:
        scene.RemoveNode(labelmap)
        scene.RemoveNode(table)
    by_value = {segmentation.GetNthSegment(i).GetLabelValue(): segmentation.GetNthSegmentID(i)
                for i in range(segmentation.GetNumberOfSegments())}
    for index, c in enumerate(classes):
        r, g, b = (v / 255.0 for v in c.colour)
        segment_id = by_value.get(int(c.value)) or segmentation.AddEmptySegment("", c.name, (r, g, b))
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(c.name)
        segment.SetColor(r, g, b)
        segmentation.SetSegmentIndex(segment_id, index)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def segment_classes(segmentation_node) -> tuple[LabelClass, ...]:
    """The segments of a segmentation node as classes 1..N (name and colour), in segment order."""
    segmentation = segmentation_node.GetSegmentation()
    classes = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        colour = tuple(int(round(255 * v)) for v in segment.GetColor())
        classes.append(LabelClass(index + 1, segment.GetName(), colour))
    return tuple(classes)


def labels_from_segmentation(segmentation_node, reference) -> tuple[Volume, tuple[LabelClass, ...]]:
    """Rasterise every segment on the reference volume's grid: an int16 canonical `Volume` (segment n = n)."""
    name = segmentation_node.GetName()
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise BrainDINOError(name, "has no segments; add one per structure in Segment Editor and paint it")
    ids = vtk.vtkStringArray()
    for index in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(index))
    scene = reference.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} export")
    try:
        if not _segmentation_logic().ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise BrainDINOError(name, f"could not be rasterised on the grid of {reference.GetName()}")
        labels = volume_from_node(labelmap, dtype=np.int16)
    finally:
        scene.RemoveNode(labelmap)
    return Volume(labels.array, labels.geometry, labels.stored, reference.GetName()), segment_classes(segmentation_node)


def painted_labels(segmentation_node, reference) -> PaintedLabels:
    """A partially painted segmentation as few-shot training labels on the reference volume's grid (the same
    checks as `braindino few-shot` applies to a label file)."""
    labels, classes = labels_from_segmentation(segmentation_node, reference)
    return painted_from_volume(labels, [ClassInfo(*c) for c in classes], source=segmentation_node.GetName())


# ---- tables and points -------------------------------------------------------------------------------------

def table_from_rows(rows: Sequence[Mapping[str, object]], scene=None, name: str = "BrainDINO predictions",
                    node=None):
    """Rows of {column: value} as a `vtkMRMLTableNode` (numeric columns as doubles, others as text).

    Columns appear in first-seen order; a value missing from a row is NaN (numeric) or empty (text).
    """
    columns: dict[str, bool] = {}  # name -> numeric?
    for row in rows:
        for key, value in row.items():
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            columns[key] = columns.get(key, True) and numeric
    if node is None:
        node = (scene or slicer.mrmlScene).AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    table.Initialize()
    for key, numeric in columns.items():
        array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        array.SetName(key)
        for row in rows:
            value = row.get(key)
            if numeric:
                array.InsertNextValue(float("nan") if value is None else float(value))
            else:
                array.InsertNextValue("" if value is None else str(value))
        table.AddColumn(array)
    node.Modified()
    return node


def rows_from_table(node) -> list[dict[str, object]]:
    """A table node back as rows of {column: value} (floats for numeric columns, strings otherwise)."""
    table = node.GetTable()
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c, key in enumerate(names):
            column = table.GetColumn(c)
            row[key] = column.GetValue(r) if isinstance(column, vtk.vtkStringArray) else float(column.GetValue(r))
        rows.append(row)
    return rows


def point_lps(markups_node, index: int, reference) -> np.ndarray:
    """Control point `index` of a markups node in LPS mm, in the frame of the reference volume's grid."""
    if markups_node is None or not 0 <= index < markups_node.GetNumberOfControlPoints():
        raise BrainDINOError(markups_node.GetName() if markups_node else "point",
                             f"has no control point {index}; place a point on the volume first")
    world = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(index, world)
    local = [0.0, 0.0, 0.0]
    reference.TransformPointFromWorld(world, local)
    return RAS_FROM_LPS @ np.asarray(local, dtype=np.float64)


def displayed_planes(slice_nodes: Sequence, geometry: Geometry) -> Planes | None:
    """The canonical voxel planes of a volume on `geometry` that `slice_nodes` show: each slice lies in one voxel
    plane, or between two (both: the views interpolate), of the axis it is normal to. None if a slice is oblique
    to the voxel grid (it crosses every plane)."""
    found: tuple[set[int], set[int], set[int]] = (set(), set(), set())
    for node in slice_nodes:
        matrix = node.GetSliceToRAS()
        centre_ras = np.array([matrix.GetElement(r, 3) for r in range(3)])
        normal_ras = np.array([matrix.GetElement(r, 2) for r in range(3)])
        centre, ahead = geometry.lps_to_index(ras_to_lps(np.stack([centre_ras, centre_ras + normal_ras])))
        step = ahead - centre
        axis = int(np.argmax(np.abs(step)))
        if np.abs(np.delete(step, axis)).max() > 1e-6 * abs(step[axis]):
            return None
        size = geometry.size[::-1][axis]  # (k, j, i) order
        found[axis].update(p for p in {int(np.floor(centre[axis] + 1e-4)), int(np.ceil(centre[axis] - 1e-4))}
                           if 0 <= p < size)
    return Planes(*(tuple(sorted(planes)) for planes in found))
