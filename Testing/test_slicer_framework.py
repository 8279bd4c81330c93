"""BrainDINO.py on Slicer's own module framework (ScriptedLoadableModule, parameterNodeWrapper, util, i18n as
released in Slicer 5.10.0 and 5.12.3) and real MRML (slicer-core), with PythonQt's widgets stood in by
`slicer_framework` (properties and signals checked against Slicer 5.12.3's widget API)."""
from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")

from conftest import REPO  # noqa: E402
from mrml_scene import slicer_scene  # noqa: E402
from slicer_framework import API, SLICER_PYTHON, VERSIONS, module_widget, slicer_framework  # noqa: E402

pytestmark = pytest.mark.skipif(API is None, reason=f"Slicer's Python framework is not in {SLICER_PYTHON}")
UI = REPO / "BrainDINO" / "Resources" / "UI" / "BrainDINO.ui"


@pytest.fixture(params=VERSIONS)
def framework(request):
    """(BrainDINO module imported through this Slicer version's framework, its scene)."""
    with slicer_scene(slice_views=1) as scene, slicer_framework(request.param) as module:
        yield module, scene


def bound_parameters() -> set[str]:
    import xml.etree.ElementTree as ET

    return {p.find("string").text for w in ET.parse(UI).iter("widget") for p in w.findall("property")
            if p.get("name") == "SlicerParameterName"}


def test_module_loads_and_registers_its_sample_data_at_startup(framework):
    module, _ = framework
    parent = types.SimpleNamespace(path=slicer.modules.braindino.path)  # qSlicerScriptedLoadableModule
    module.BrainDINO(parent)
    assert parent.title == "BrainDINO" and parent.categories == ["Segmentation"]
    assert "frozen self-supervised ViT" in parent.helpText and "needs 3D Slicer" not in parent.helpText
    assert slicer.app.connections["startupCompleted()"] == [module.registerSampleData]
    assert "BrainDINO" in slicer.selfTests


def test_an_older_slicer_gets_a_message_instead_of_the_panels():
    with slicer_scene(), slicer_framework("v5.10.0", app_version="5.8") as module:
        parent = types.SimpleNamespace(path=slicer.modules.braindino.path)
        module.BrainDINO(parent)
        assert parent.helpText.startswith("BrainDINO needs 3D Slicer 5.10 or later")
        assert "startupCompleted()" not in slicer.app.connections
        with module_widget(module) as widget:
            labels = widget.parent.findChildren(qt_class("QLabel"))
            assert [label.text for label in labels] == [module.unsupportedSlicer()]
            assert widget.logic is None and not widget.parent.findChildren(qt_class("qMRMLNodeComboBox"))
            widget.enter(), widget.exit()


def test_the_self_test_says_it_was_skipped_where_torch_is_missing(framework, monkeypatch, caplog):
    """On an extension build machine without PyTorch, Slicer's test runner gets a clear skip, not a failure."""
    from BrainDINOLib.dependencies import Requirements

    module, scene = framework
    monkeypatch.setattr(Requirements, "missing_torch", lambda self: ["torch>=2.8"])
    parent = types.SimpleNamespace(path=slicer.modules.braindino.path)
    with caplog.at_level(logging.WARNING):
        module.BrainDINO(parent).runTest()  # as Slicer's SelfTests and slicer_add_python_unittest call it
    assert "BrainDINO self-test SKIPPED: this Python lacks torch>=2.8" in caplog.text
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # no sample loaded, nothing ran


def test_packages_go_through_slicers_pip_ensure_with_torch_pinned(framework, monkeypatch):
    """Slicer 5.11+ `slicer.pydeps.pip_ensure` takes Requirement objects and a constraints file; the module asked
    already, so it does not ask again. (pip_ensure itself is Slicer's: recorded here, not run.)"""
    import sys

    from packaging.requirements import Requirement

    module, _ = framework
    calls = []

    def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None):
        calls.append((requirements, Path(constraints).read_text(), prompt_install, requester))

    monkeypatch.setitem(sys.modules, "slicer.pydeps", types.SimpleNamespace(pip_ensure=pip_ensure))
    module.installPackages(["timm>=1.0.20", "monai>=1.4"], ["torch==2.14.1", "torchvision==0.29.1"])
    (requirements, constraints, prompt, requester), = calls
    assert requirements == [Requirement("timm>=1.0.20"), Requirement("monai>=1.4")]
    assert constraints == "torch==2.14.1\ntorchvision==0.29.1\n" and prompt is False and requester == "BrainDINO"


def qt_class(name: str):
    import sys

    return getattr(sys.modules["qt"], name)


def example_values(scene) -> dict:
    """A value for every parameter, unlike its default: nodes of the right classes from `scene`."""
    return {
        "useDemoModel": False, "modelFile": "/models/teacher.pth", "device": "cpu",
        "inputVolume": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "t1"), "overlayOpacity": 0.25,
        "similarityPoint": scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "probe"), "clusterCount": 5,
        "segmentationHead": "/heads/tumour.safetensors",
        "paintedSegmentation": scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted"),
        "outputSegmentation": scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "output"),
        "subjectHead": "/heads/age.safetensors",
        "predictionTable": scene.AddNewNodeByClass("vtkMRMLTableNode", "predictions"),
        "fitHead": "regression", "fitManifest": "/cases/cases.csv", "fitTestFraction": 0.4, "fitEpochs": 50,
        "trainTask": "fit-head", "trainArguments": "--epochs 3",
        "pcaVolume": scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "pca"),
        "similarityVolume": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "similarity"),
        "attentionVolume": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "attention"),
        "clusterVolume": scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "clusters"),
    }


def test_every_parameter_round_trips_through_a_scripted_module_node_and_a_saved_scene(framework):
    module, scene = framework
    parameters = module.getParameterNode()
    assert parameters.parameterNode.IsA("vtkMRMLScriptedModuleNode")
    assert parameters.modelFile == parameters.segmentationHead == parameters.subjectHead == ""  # not "."
    values = example_values(scene)
    assert set(values) == set(parameters.allParameters), "example_values misses a parameter"
    for name, value in values.items():
        setattr(parameters, name, value)

    again = module.getParameterNode()  # a new wrapper over the same singleton node reads the node itself
    assert again.parameterNode is parameters.parameterNode
    for name, value in values.items():
        assert getattr(again, name) == value, name

    scene.SetSaveToXMLString(1)
    scene.Commit()
    saved = scene.GetSceneXMLString()
    scene.Clear(0)
    assert module.getParameterNode().clusterCount == 8  # a fresh scene: defaults
    scene.SetLoadFromXMLString(1)
    scene.SetSceneXMLString(saved)
    scene.Import()
    loaded = module.getParameterNode()
    for name, value in values.items():
        got = getattr(loaded, name)
        if hasattr(value, "GetName"):
            assert got is not None and got.GetName() == value.GetName() and got.GetClassName() == value.GetClassName(), name
        else:
            assert got == value, name


@pytest.mark.parametrize("name, value", [("overlayOpacity", 1.5), ("overlayOpacity", -0.1), ("clusterCount", 1),
                                         ("clusterCount", 33), ("device", "tpu"), ("trainTask", "rm -rf")])
def test_validators_reject_bad_values(framework, name, value):
    module, _ = framework
    parameters = module.getParameterNode()
    before = getattr(parameters, name)
    with pytest.raises(ValueError):
        setattr(parameters, name, value)
    assert getattr(parameters, name) == before


def test_a_node_parameter_refuses_a_node_of_another_class(framework):
    module, scene = framework
    with pytest.raises((TypeError, ValueError)):
        module.getParameterNode().predictionTable = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")


def test_setup_connects_every_bound_widget_both_ways(framework):
    module, scene = framework
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "t1")
    with module_widget(module) as widget:
        parameters = widget._parameterNode
        connectors = parameters._parameterGUIs[widget._parameterNodeGuiTag]
        assert set(connectors) == bound_parameters()
        assert parameters.inputVolume is volume  # the first volume is chosen for the user
        ui = widget.ui
        assert ui.modelFilePathLineEdit.currentPath == "" and ui.segmentationHeadPathLineEdit.currentPath == ""

        ui.clusterCountSpinBox.value = 12  # widget -> parameter
        ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")
        ui.overlayOpacitySlider.value = 0.8
        ui.useDemoModelCheckBox.checked = False
        ui.modelFilePathLineEdit.currentPath = "/models/teacher.pth"
        ui.trainArgumentsLineEdit.text = "--epochs 3"
        assert (parameters.clusterCount, parameters.device, parameters.overlayOpacity, parameters.useDemoModel,
                parameters.modelFile, parameters.trainArguments) == (12, "cpu", 0.8, False, "/models/teacher.pth",
                                                                     "--epochs 3")
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", "predictions")
        parameters.predictionTable = table  # parameter -> widget
        parameters.trainTask = "evaluate"
        parameters.segmentationHead = "/heads/tumour.safetensors"
        assert ui.predictionTableSelector.currentNode() is table
        assert ui.trainTaskComboBox.currentText == "evaluate"
        assert ui.segmentationHeadPathLineEdit.currentPath == "/heads/tumour.safetensors"
        assert ui.clusterCountSpinBox.minimum == 2 and ui.clusterCountSpinBox.maximum == 32  # from WithinRange


def test_the_similarity_point_can_be_placed(framework):
    module, _ = framework
    with module_widget(module) as widget:
        place = widget.ui.similarityPlaceWidget
        assert place.placeButton().isVisible() and not place.deleteButton().isVisible()


def test_enter_exit_scene_close_and_cleanup(framework):
    module, scene = framework
    with module_widget(module) as widget:
        widget.parent.isEntered = True
        widget.enter()
        assert widget._parameterNodeGuiTag is not None
        widget.exit()
        assert widget._parameterNodeGuiTag is None
        widget.enter()
        point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "probe")
        widget._parameterNode.similarityPoint = point
        assert widget._observedPoint is point  # the selector followed the parameter and said so
        assert widget.ui.similarityPlaceWidget.currentNode() is point  # the .ui connection
        assert point.GetMaximumNumberOfControlPoints() == 1
        scene.Clear(0)  # StartCloseEvent, EndCloseEvent: the parameter node is connected again, in the new scene
        assert widget._observedPoint is None
        assert widget._parameterNode.parameterNode.GetScene() is scene
        assert widget._parameterNode.similarityPoint is None
        assert widget._parameterNodeGuiTag in widget._parameterNode._parameterGUIs
    assert not widget.timer.isActive()
    widget.logic.worker._thread.join(timeout=10)
    assert not widget.logic.worker._thread.is_alive(), "cleanup left the torch worker thread running"


# ---- the flows: the self-test's, and the panels' buttons on the worker ----------------------------------------

def coarse(path, mm: float = 3.0, labels: bool = False):
    import SimpleITK as sitk
    from BrainDINOLib import Volume
    from volume_factories import downsampled

    interpolator, pixel = (sitk.sitkNearestNeighbor, sitk.sitkUInt8) if labels else (sitk.sitkLinear, sitk.sitkFloat32)
    return Volume.from_image(downsampled(path, mm, interpolator, pixel), source=path.name)


@pytest.mark.slow
def test_the_self_test_flow_runs_through_the_logic(teacher_checkpoint, tmp_path):
    """`runSelfTestFlow` is what BrainDINOTest runs inside Slicer, with the demo model on the 1 mm sample
    (measured here: few-shot Dice 0.80 against 0.59 for the head mask). In `make test` it runs with the small
    teacher fixture on a 3 mm copy, on one framework version (the flow does not touch the framework)."""
    from BrainDINOLib import mrml
    from BrainDINOLib.atlas import COLIN27_T1

    with slicer_scene(slice_views=1) as scene, slicer_framework(VERSIONS[-1]) as module:
        node = mrml.volume_to_node(coarse(COLIN27_T1), scene, "colin27 3mm")
        atlas = coarse(REPO / "BrainDINOLib" / "data" / "colin27_aal.nii.gz", labels=True)
        logic = module.engineLogic().BrainDINOLogic(scene, cache=tmp_path)
        try:
            results = module.runSelfTestFlow(logic, node, str(teacher_checkpoint), atlas=atlas)
        finally:
            logic.shutdown()
        assert results["shape"] == atlas.shape
        assert results["learned_dice"] > results["head_mask_dice"] + 0.05, results  # measured 0.77 vs 0.59
        assert results["segmentation"].GetSegmentation().GetNumberOfSegments() == 1


def settle(widget, timeout_s: float = 120.0) -> None:
    """Tick the module's timer (Qt's event loop, here) until the worker and any child process are done."""
    import time

    deadline = time.monotonic() + timeout_s
    while widget.timer.isActive():
        assert time.monotonic() < deadline, "the worker did not finish"
        widget.timer.tick()
        time.sleep(0.02)


def test_the_panels_buttons_run_on_the_worker_and_fill_the_scene(framework, teacher_checkpoint, tmp_path):
    from BrainDINOLib import mrml
    from BrainDINOLib.atlas import COLIN27_T1

    module, scene = framework
    node = mrml.volume_to_node(coarse(COLIN27_T1, 4.0), scene, "colin27 4mm")
    with module_widget(module) as widget:
        widget.logic.cache = tmp_path
        ui, parameters = widget.ui, widget._parameterNode
        assert parameters.inputVolume is node
        ui.useDemoModelCheckBox.checked = False
        ui.modelFilePathLineEdit.currentPath = str(teacher_checkpoint)
        ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")

        ui.pcaButton.click()  # loads the model first (queued on the worker), then features, then PCA
        assert ui.cancelButton.enabled and widget.timer.isActive()
        settle(widget)
        assert widget.logic.encoder is not None and "cpu" in ui.architectureLabel.text
        pca = parameters.pcaVolume
        assert pca is not None and pca.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
        assert ui.statusLabel.text == "PCA colours: done." and not ui.cancelButton.enabled
        assert ui.progressBar.value == ui.progressBar.maximum

        ui.pcaButton.click()  # recomputing updates the same node
        settle(widget)
        assert parameters.pcaVolume is pca

        ui.clusterCountSpinBox.value = 3
        ui.clustersButton.click()
        settle(widget)
        clusters = mrml.node_array(parameters.clusterVolume)
        assert clusters.max() == 3

        point = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "probe")
        parameters.similarityPoint = point
        bounds = [0.0] * 6
        node.GetRASBounds(bounds)
        point.AddControlPoint((bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2)
        settle(widget)  # placing the point computed the map
        similarity = parameters.similarityVolume
        assert similarity is not None and mrml.node_array(similarity).max() <= 1.0
        point.SetNthControlPointPosition(0, bounds[0] + 20, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2)
        settle(widget)  # dragging it recomputes the same node
        assert parameters.similarityVolume is similarity


def test_cancel_stops_a_running_job_and_says_so(framework, teacher_checkpoint):
    import threading

    module, scene = framework
    with module_widget(module) as widget:
        started, release = threading.Event(), threading.Event()

        def work(progress, cancel):
            started.set()
            while not cancel():
                progress(1, 10)
                release.wait(0.01)
            raise module.engineLogic().CancelledError("cancelled")

        widget.run("Long job", work, lambda result: None)
        assert started.wait(10)
        widget.timer.tick()
        assert widget.ui.statusLabel.text == "Long job..." and widget.ui.progressBar.maximum == 10
        widget.ui.cancelButton.click()
        settle(widget, 10)
        assert widget.ui.statusLabel.text == "Long job: cancelled." and not widget.ui.cancelButton.enabled


@pytest.mark.slow
def test_fine_tune_a_segmentation_head_on_the_scene_cases_by_clicking(teacher_checkpoint, tmp_path):
    """The Fine-tune panel: the scene's volume + segmentation pairs in the table, Fit in a child process with
    progress, the held-out case's Dice in the panel, Save head, Apply to the input."""
    import numpy as np

    from BrainDINOLib import mrml
    from BrainDINOLib.atlas import COLIN27_T1

    with slicer_scene(slice_views=1) as scene, slicer_framework(VERSIONS[-1]) as module:
        t1 = coarse(COLIN27_T1, 8.0)
        atlas = coarse(REPO / "BrainDINOLib" / "data" / "colin27_aal.nii.gz", 8.0, labels=True).array
        truth = np.where(atlas > 90, 2, np.where(atlas > 0, 1, 0)).astype(np.int16)  # cerebrum, cerebellum
        classes = [mrml.LabelClass(1, "cerebrum", (230, 200, 160)), mrml.LabelClass(2, "cerebellum", (90, 160, 220))]
        for case, gain in enumerate((0.8, 1.0, 1.2)):
            node = mrml.volume_to_node(t1.with_array(t1.array * gain), scene, f"case {case}")
            mrml.segmentation_from_labels(t1.with_array(truth), node, classes, name=f"case {case} labels")
        with module_widget(module) as widget:
            ui, parameters = widget.ui, widget._parameterNode
            widget.logic.cache = tmp_path / "cache"
            ui.useDemoModelCheckBox.checked = False
            ui.modelFilePathLineEdit.currentPath = str(teacher_checkpoint)
            ui.deviceComboBox.currentIndex = ui.deviceComboBox.findText("cpu")
            ui.fitHeadComboBox.currentIndex = ui.fitHeadComboBox.findText("segmentation, linear")
            ui.fitEpochsSpinBox.value = 5

            ui.fitAddSceneCasesButton.click()
            ui.fitAddSceneCasesButton.click()  # nothing is listed twice
            table = ui.fitCasesTable
            assert table.rowCount == 3
            assert [(table.item(r, 0).text(), table.item(r, 1).text(), table.item(r, 3).text())
                    for r in range(3)] == [(f"case {r}", f"case {r} labels", "auto") for r in range(3)]

            progress = []
            ui.progressBar.connect("valueChanged(int)", progress.append)
            ui.fitButton.click()
            assert not ui.fitButton.enabled or widget.logic.worker.busy
            settle(widget, 600)
            assert ui.statusLabel.text == "Fitting segmentation: done.", ui.fitReportBrowser.html
            assert progress, "the fit reported no progress"
            html = ui.fitReportBrowser.html
            assert "test Dice cerebrum" in html and "test cases</td><td align='right'>1<" in html
            assert ui.saveHeadButton.enabled and ui.applyFittedHeadButton.enabled

            qt_class("QFileDialog").answer = str(tmp_path / "my head.safetensors")  # what the user picks
            ui.saveHeadButton.click()
            assert (tmp_path / "my head.safetensors").is_file() and "Head saved" in ui.statusLabel.text

            parameters.inputVolume = scene.GetFirstNodeByName("case 2")
            ui.applyFittedHeadButton.click()
            settle(widget)
            output = parameters.outputSegmentation
            assert output is not None and output.GetAttribute("BrainDINO.output") == "1"
            assert [c.name for c in mrml.segment_classes(output)] == ["cerebrum", "cerebellum"]
            assert len(widget.logic.scene_cases()) == 3  # outputs are never offered as cases
