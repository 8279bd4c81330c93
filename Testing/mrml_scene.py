"""A real MRML scene from the slicer-core wheel, set up the way Slicer sets up its own."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import slicer


@contextlib.contextmanager
def slicer_scene(slice_views: int = 1) -> Iterator[slicer.vtkMRMLScene]:
    """A fresh `slicer.mrmlScene` with Slicer's default colour tables, the segmentation logic and
    `slice_views` slice composite nodes (where maps are shown); cleared afterwards."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    for _ in range(slice_views):
        scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    try:
        yield scene
    finally:
        segmentations.SetMRMLScene(None)
        colors.SetMRMLScene(None)
        scene.Clear(True)
