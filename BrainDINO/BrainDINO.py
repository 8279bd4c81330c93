"""BrainDINO: brain-MRI foundation-model features, maps, segmentations and predictions inside 3D Slicer.

A thin module. Every computation and every scene change is a call into `BrainDINOLib.logic.BrainDINOLogic`
(Qt-free, shared with the web page and usable from the Python console); this file holds only Slicer's side:
the parameter node, the widget wiring (widgets to parameters, buttons to Logic calls, the worker's progress
to the progress bar), dependency installation through Slicer's installers, sample data and the self-test.

Supports Slicer 5.10 and later (Python 3.12). Older Slicers (5.8 ships Python 3.9) load this file and get a
message instead of the panels, so nothing here may need Python 3.10 at import time.
"""
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated

import ctk
import qt
import vtk

import slicer
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode, vtkMRMLVectorVolumeNode)
from slicer.parameterNodeWrapper import (Choice, GuiConnector, WithinRange, parameterNodeGuiConnector,
                                         parameterNodeWrapper)
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# No `from __future__ import annotations`: parameterNodeWrapper reads the annotations as real types.
MODULE_DIR = Path(__file__).resolve().parent
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
SAMPLE_NAME = "BrainDINOColin27T1"
MINIMUM_SLICER = (5, 10)
CASE_COLUMNS = ("Volume", "Segmentation", "Target", "Split")


def ensure_engine_on_path() -> Path:
    """The folder of the `BrainDINOLib` package, put on sys.path when running from a source checkout.

    Installed extensions ship it next to this module (qt-scripted-modules/BrainDINOLib); a source checkout
    has it one level up. Nothing heavy is imported: torch may not be installed yet.
    """
    spec = importlib.util.find_spec("BrainDINOLib")
    if spec is None:
        checkout = MODULE_DIR.parent
        if (checkout / "BrainDINOLib" / "__init__.py").exists():
            sys.path.insert(0, str(checkout))
            spec = importlib.util.find_spec("BrainDINOLib")
    if spec is None or spec.origin is None:
        raise ImportError("the BrainDINOLib engine is not installed next to the BrainDINO module")
    return Path(spec.origin).parent


def unsupportedSlicer():
    """A sentence saying why this Slicer cannot run BrainDINO, or "" when it can."""
    version = (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    if version >= MINIMUM_SLICER and sys.version_info >= (3, 10):
        return ""
    return ("BrainDINO needs 3D Slicer {}.{} or later (Python 3.10 or later); this is Slicer {}.{} with Python {}.{}. "
            "Install a current Slicer from https://download.slicer.org and BrainDINO again."
            .format(*MINIMUM_SLICER, *version, *sys.version_info[:2]))


#
# Module
#

class BrainDINO(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BrainDINO"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainDINO developers"]
        self.parent.helpText = (
            "Brain-MRI features from a frozen self-supervised ViT (DINOv3-style): PCA colour maps, similarity "
            "to a clicked point, attention and clusters; segmentation from a saved head or from a few painted "
            "slices; subject-level predictions; fine-tuning heads on the labelled cases in the scene; and "
            "launching pretraining.")
        self.parent.acknowledgementText = (
            "Sample data: Colin27 T1 from the MRIcron templates (BSD-3-Clause). Models run with PyTorch and timm.")
        problem = unsupportedSlicer()
        if problem:
            self.parent.helpText = problem + "\n\n" + self.parent.helpText
            return
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Offer the bundled Colin27 T1 in the Sample Data module (copied from the extension: no download)."""
    import SampleData

    sample = ensure_engine_on_path() / "data" / "colin27_t1.nii.gz"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="BrainDINO", sampleName=SAMPLE_NAME,
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "BrainDINO.png"),
        uris=sample.as_uri(), fileNames="colin27_t1.nii.gz", nodeNames=SAMPLE_NAME, checksums=None)


#
# Parameter node
#

@parameterNodeGuiConnector
class PathLineEditToStrConnector(GuiConnector):
    """A file path kept as text, so an unset path is "" (Slicer's Path parameters default to "." and show it)."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and datatype == str

    @staticmethod
    def create(widget, datatype):
        return PathLineEditToStrConnector(widget) if PathLineEditToStrConnector.canRepresent(widget, datatype) else None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.currentPath

    def write(self, value: str) -> None:
        self._widget.currentPath = value


def headChoices() -> list:
    """The heads the Fine-tune panel fits (BrainDINOLib.logic.HEAD_CHOICES); one placeholder where the engine
    cannot be imported (an older Slicer: the module shows why instead of its panels)."""
    try:
        ensure_engine_on_path()
        from BrainDINOLib.logic import HEAD_CHOICES
    except (ImportError, SyntaxError, TypeError):
        return ["segmentation, linear"]
    return list(HEAD_CHOICES)


HEAD_LABELS = headChoices()


@parameterNodeWrapper
class BrainDINOParameterNode:
    useDemoModel: bool = True
    modelFile: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu", "mps"])] = "auto"
    inputVolume: vtkMRMLScalarVolumeNode
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    similarityPoint: vtkMRMLMarkupsFiducialNode
    clusterCount: Annotated[int, WithinRange(2, 32)] = 8
    segmentationHead: str = ""
    paintedSegmentation: vtkMRMLSegmentationNode
    outputSegmentation: vtkMRMLSegmentationNode
    subjectHead: str = ""
    predictionTable: vtkMRMLTableNode
    fitHead: Annotated[str, Choice(HEAD_LABELS)] = HEAD_LABELS[0]
    fitManifest: str = ""
    fitTestFraction: Annotated[float, WithinRange(0.0, 0.5)] = 0.25
    fitEpochs: Annotated[int, WithinRange(1, 5000)] = 200
    trainTask: Annotated[str, Choice(["prepare-slices", "pretrain", "make-cases", "fit-head", "evaluate"])] = "pretrain"
    trainArguments: str = ""
    # Outputs, remembered so that recomputing updates the same nodes.
    pcaVolume: vtkMRMLVectorVolumeNode
    similarityVolume: vtkMRMLScalarVolumeNode
    attentionVolume: vtkMRMLScalarVolumeNode
    clusterVolume: vtkMRMLLabelMapVolumeNode


def getParameterNode():
    """The module's parameter node in `slicer.mrmlScene` (a singleton scripted-module node, saved with the scene)."""
    logic = ScriptedLoadableModuleLogic()
    logic.moduleName = "BrainDINO"
    return BrainDINOParameterNode(logic.getParameterNode())


def engineLogic():
    """The `BrainDINOLib.logic` module (light to import: it loads torch only when a model is used)."""
    ensure_engine_on_path()
    import BrainDINOLib.logic

    return BrainDINOLib.logic


#
# Dependencies, through Slicer's installers
#

def installTorch(torchSpecifier, torchvisionSpecifier):
    """PyTorch through the PyTorch extension (matched to the GPU driver), without asking again."""
    try:
        import PyTorchUtils
    except ImportError:
        raise engineLogic().BrainDINOError(
            "PyTorch extension", "is not installed: install it from the Extensions Manager and restart Slicer")
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=torchSpecifier,
        torchvisionVersionRequirement=torchvisionSpecifier)
    return torch is not None


def installPackages(requirements, constraints):
    """pip requirement lines into Slicer's Python under `constraints` (the installed torch, pinned), through
    Slicer's `pip_ensure` (`slicer.pydeps` from 5.11, `slicer.packaging` in later layouts; it takes `Requirement`
    objects and offers a restart when a loaded package changed), else `slicer.util.pip_install`. Already asked:
    no second question."""
    from packaging.requirements import Requirement

    ensurer = pipEnsure()
    with tempfile.TemporaryDirectory() as folder:
        constraintsFile = Path(folder) / "constraints.txt"
        constraintsFile.write_text("\n".join(constraints) + "\n")
        if ensurer is None:
            slicer.util.pip_install(["-c", str(constraintsFile), *requirements])
            return
        ensurer([Requirement(r) for r in requirements], constraints=constraintsFile, prompt_install=False,
                requester="BrainDINO")


def pipEnsure():
    """Slicer's `pip_ensure`, wherever this Slicer keeps it; None where it has none (then pip_install)."""
    for name in ("slicer.pydeps", "slicer.packaging"):
        try:
            return getattr(importlib.import_module(name), "pip_ensure")
        except (ImportError, AttributeError):
            continue
    return None


def ensureDependencies():
    """Install what BrainDINO lacks after one question; a `DependencyState` (a decline is not an error)."""
    engineLogic()
    from BrainDINOLib.dependencies import DependencyInstaller, Requirements

    def confirm(question, details):
        return slicer.util.confirmOkCancelDisplay(question, "BrainDINO: install dependencies", detailedText=details)

    return DependencyInstaller(Requirements.read(REQUIREMENTS), confirm, installTorch, installPackages).ensure()


#
# Widget
#

class BrainDINOWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPoint = None
        self._pendingPoint = False
        self._similarityRunning = False
        self.fitRun = None  # the last fit (a BrainDINOLib.logic.FitRun) and what it fitted
        self.fitRequest = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = unsupportedSlicer()
        if problem:
            message = qt.QLabel(problem)
            message.wordWrap = True
            self.layout.addWidget(message)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainDINO.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = engineLogic().BrainDINOLogic(slicer.mrmlScene)
        # Only the place button: the similarity probe is one point, placed or dragged.
        self.ui.similarityPlaceWidget.buttonsVisible = False
        self.ui.similarityPlaceWidget.placeButton().show()

        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_MS)
        self.timer.connect("timeout()", self.poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.computeFeaturesButton.connect("clicked(bool)", self.onComputeFeatures)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.pcaButton.connect("clicked(bool)", self.onPCA)
        self.ui.attentionButton.connect("clicked(bool)", self.onAttention)
        self.ui.clustersButton.connect("clicked(bool)", self.onClusters)
        self.ui.overlayOpacitySlider.connect("valueChanged(double)", self.onOpacity)
        self.ui.similarityPointSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.observePoint)
        self.ui.applyHeadButton.connect("clicked(bool)", self.onApplyHead)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.learnButton.connect("clicked(bool)", self.onLearn)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.fitCasesTable.setHorizontalHeaderLabels(list(CASE_COLUMNS))
        self.ui.fitAddSceneCasesButton.connect("clicked(bool)", self.onAddSceneCases)
        self.ui.fitClearCasesButton.connect("clicked(bool)", lambda: setattr(self.ui.fitCasesTable, "rowCount", 0))
        self.ui.fitButton.connect("clicked(bool)", self.onFit)
        self.ui.fitCancelButton.connect("clicked(bool)", self.onStopCommand)
        self.ui.saveHeadButton.connect("clicked(bool)", self.onSaveHead)
        self.ui.applyFittedHeadButton.connect("clicked(bool)", self.onApplyFittedHead)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartCommand)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopCommand)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.timer.stop()
            self.logic.shutdown()

    def enter(self) -> None:
        if self.logic:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.observePoint(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.observePoint(self._parameterNode.similarityPoint)

    # ---- dependencies and the worker ------------------------------------------------------------------------

    def dependenciesReady(self) -> bool:
        """Dependencies installed, asking once if they are not; a decline shows "not installed" and returns False."""
        state = ensureDependencies()
        self.ui.statusLabel.text = "" if state.ready and not state.restart_needed else state.message
        if state.restart_needed:
            slicer.util.infoDisplay(state.message, "BrainDINO")
        return state.ready and not state.restart_needed

    def run(self, label: str, work, onDone) -> None:
        """Queue `work(progress, cancel)` on the torch thread; `onDone(result)` runs here when it finishes."""
        worker = self.logic.worker

        def onError(error: BaseException) -> None:
            if isinstance(error, engineLogic().CancelledError):  # the jobs queued after it were dropped with it
                self.ui.statusLabel.text = f"{label}: cancelled."
                return
            worker.cancel()  # the jobs queued after this one depend on it
            self.ui.statusLabel.text = f"{label}: failed."
            with slicer.util.tryWithErrorDisplay(f"{label} failed."):
                raise error

        def done(result) -> None:
            with slicer.util.tryWithErrorDisplay(f"{label} failed."):
                onDone(result)
                self.ui.statusLabel.text = f"{label}: done."

        worker.submit(engineLogic().Job(label, work, done, onError))
        self.ui.cancelButton.enabled = True
        self.timer.start()

    def poll(self) -> None:
        """The QTimer tick: worker progress to the progress bar, finished jobs' callbacks, child-process output."""
        worker = self.logic.worker
        label, done, total = worker.status()
        if label:
            self.ui.statusLabel.text = f"{label}..."
            self.ui.progressBar.maximum = max(total, 1) if total else 0  # 0: busy indicator
            self.ui.progressBar.value = done
        worker.poll()
        running = self.logic.process is not None and self.logic.process.poll()
        if not worker.busy:
            self.ui.architectureLabel.text = self.logic.describe_model()
            self.ui.cancelButton.enabled = False
            if not running:
                self.ui.progressBar.maximum = 1
                self.ui.progressBar.value = 1
                self.timer.stop()

    def onCancel(self) -> None:
        self.logic.worker.cancel()

    def requireReady(self) -> bool:
        """Dependencies installed (False if not); the model is queued for loading if none is loaded yet, so the
        jobs queued after it find it (the worker runs jobs in order)."""
        if not self.dependenciesReady():
            return False
        if self.logic.encoder is None:
            self.queueModelLoading()
        return True

    # ---- model and input ---------------------------------------------------------------------------------

    def modelSource(self) -> str:
        p = self._parameterNode
        if p.useDemoModel:
            return "demo"
        if not p.modelFile:
            raise engineLogic().BrainDINOError("model", "choose a model file, or tick Built-in demo model")
        return p.modelFile

    def queueModelLoading(self) -> None:
        source, device = self.modelSource(), self._parameterNode.device
        self.ui.architectureLabel.text = f"loading {source}..."
        self.run("Loading the model", lambda progress, cancel: self.logic.load_model(source, device),
                 lambda encoder: None)  # the label is refreshed when the worker is idle

    def onLoadModel(self) -> None:
        with slicer.util.tryWithErrorDisplay("Loading the model failed."):
            if self.dependenciesReady():
                self.queueModelLoading()

    def inputVolume(self):
        """The selected input node and its engine `Volume` (read on the main thread)."""
        node = self._parameterNode.inputVolume
        return node, self.logic.volume_from_node(node)

    def withFeatures(self, label: str, then, segmentationLayers: bool = False) -> None:
        """Compute (or fetch) features on the worker, then call `then(node, volume, features)` here."""
        with slicer.util.tryWithErrorDisplay(f"{label} failed.", waitCursor=True):
            if not self.requireReady():
                return
            node, volume = self.inputVolume()

            def work(progress, cancel):  # on the worker, after the model (possibly queued just now) is loaded
                layers = self.logic.segmentation_layers() if segmentationLayers else ()
                return self.logic.features(volume, layers, progress, cancel)

            self.run("Computing features", work, lambda features: then(node, volume, features))

    def onComputeFeatures(self) -> None:
        """Embed with the blocks segmentation needs too, so every panel afterwards reuses these features."""
        self.withFeatures("Computing features", lambda node, volume, features: None, segmentationLayers=True)

    # ---- explore -----------------------------------------------------------------------------------------

    def onPCA(self) -> None:
        def show(node, volume, features):
            self.run("PCA colours", lambda progress, cancel: self.logic.pca_map(features),
                     lambda rgb: setattr(self._parameterNode, "pcaVolume", self.logic.show_pca(
                         rgb, node, self._parameterNode.pcaVolume, self._parameterNode.overlayOpacity)))
        self.withFeatures("PCA colours", show)

    def onAttention(self) -> None:
        with slicer.util.tryWithErrorDisplay("Attention map failed.", waitCursor=True):
            if not self.requireReady():
                return
            node, volume = self.inputVolume()
            self.run("Attention map", lambda progress, cancel: self.logic.attention_map(volume, progress, cancel),
                     lambda attention: setattr(self._parameterNode, "attentionVolume", self.logic.show_attention(
                         attention, node, self._parameterNode.attentionVolume, self._parameterNode.overlayOpacity)))

    def onClusters(self) -> None:
        def show(node, volume, features):
            count = self._parameterNode.clusterCount
            self.run("Clusters", lambda progress, cancel: self.logic.cluster_map(features, count),
                     lambda clusters: setattr(self._parameterNode, "clusterVolume", self.logic.show_clusters(
                         clusters, node, self._parameterNode.clusterVolume)))
        self.withFeatures("Clusters", show)

    def onOpacity(self, value: float) -> None:
        self.logic.set_overlay_opacity(value)

    def observePoint(self, markupsNode) -> None:
        """Recompute the similarity map whenever the probe point is placed or moved."""
        if self._observedPoint is not None:
            self.removeObserver(self._observedPoint, slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self.onPointMoved)
            self.removeObserver(self._observedPoint, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                self.onPointMoved)
        self._observedPoint = markupsNode
        if markupsNode is not None:
            if markupsNode.GetNumberOfControlPoints() == 0:  # a new probe: one point, dragged around
                markupsNode.SetMaximumNumberOfControlPoints(1)
            self.addObserver(markupsNode, slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self.onPointMoved)
            self.addObserver(markupsNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointMoved)

    def onPointMoved(self, caller=None, event=None) -> None:
        """Coalesce drags: while one map is computing, only the latest position is computed next."""
        if self.logic.encoder is None or caller is None or caller.GetNumberOfDefinedControlPoints() == 0:
            return
        if self._similarityRunning:
            self._pendingPoint = True
            return
        with slicer.util.tryWithErrorDisplay("Similarity map failed."):
            node, volume = self.inputVolume()
            point = self.logic.point_lps(caller, node)
            self._similarityRunning, self._pendingPoint = True, False
            self.run("Similarity map", lambda progress, cancel: self.similarityWork(volume, point, progress, cancel),
                     lambda similarity: self.showSimilarity(similarity, node, caller))

    def similarityWork(self, volume, point, progress, cancel):
        try:
            return self.logic.similarity_map(self.logic.features(volume, (), progress, cancel), point)
        finally:
            self._similarityRunning = False

    def showSimilarity(self, similarity, node, markupsNode) -> None:
        self._parameterNode.similarityVolume = self.logic.show_similarity(
            similarity, node, self._parameterNode.similarityVolume, self._parameterNode.overlayOpacity)
        if self._pendingPoint:
            self.onPointMoved(markupsNode)

    # ---- segment -----------------------------------------------------------------------------------------

    def onApplyHead(self) -> None:
        with slicer.util.tryWithErrorDisplay("Segmenting with the head failed.", waitCursor=True):
            if not self.requireReady():
                return
            node, volume = self.inputVolume()
            head = self.logic.load_head(self._parameterNode.segmentationHead)
            self.run("Segmenting with the head",
                     lambda progress, cancel: self.logic.segment_with_head(head, volume, progress, cancel),
                     lambda labels: self.setOutputSegmentation(self.logic.show_segmentation(
                         labels, node, head.card.classes, self._parameterNode.outputSegmentation)))

    def onOpenSegmentEditor(self) -> None:
        """Open Segment Editor on the examples segmentation (created if needed) and the input volume."""
        p = self._parameterNode
        if p.paintedSegmentation is None:
            p.paintedSegmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                                       "BrainDINO examples")
            p.paintedSegmentation.CreateDefaultDisplayNodes()
        if p.inputVolume is not None:
            p.paintedSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(p.inputVolume)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.paintedSegmentation)
        if p.inputVolume is not None:
            editor.setSourceVolumeNode(p.inputVolume)

    def onLearn(self) -> None:
        with slicer.util.tryWithErrorDisplay("Learning from the painted slices failed.", waitCursor=True):
            if not self.requireReady():
                return
            node, volume = self.inputVolume()
            painted = self.logic.painted_labels(self._parameterNode.paintedSegmentation, node)
            self.ui.statusLabel.text = (f"Learning {', '.join(painted.class_names)} from slices "
                                        f"{', '.join(map(str, painted.slice_indices))}...")
            self.run(f"Learning from {len(painted.slice_indices)} slices",
                     lambda progress, cancel: self.logic.learn_from_painted(volume, painted, progress, cancel),
                     lambda result: self.setOutputSegmentation(self.logic.show_segmentation(
                         result.labels, node, painted.classes, self._parameterNode.outputSegmentation,
                         name=f"{self._parameterNode.paintedSegmentation.GetName()} (BrainDINO)")))

    def setOutputSegmentation(self, segmentationNode) -> None:
        self._parameterNode.outputSegmentation = segmentationNode

    # ---- predict -----------------------------------------------------------------------------------------

    def onPredict(self) -> None:
        with slicer.util.tryWithErrorDisplay("Prediction failed.", waitCursor=True):
            if not self.requireReady():
                return
            node, volume = self.inputVolume()
            path = Path(self._parameterNode.subjectHead)
            head = self.logic.load_head(self._parameterNode.subjectHead)

            def show(prediction):
                table = self.logic.show_prediction(prediction, path.stem, node.GetName(),
                                                   self._parameterNode.predictionTable)
                self._parameterNode.predictionTable = table
                slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
                slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
                slicer.app.applicationLogic().PropagateTableSelection()

            self.run(f"Predicting with {path.stem}",
                     lambda progress, cancel: self.logic.predict_subject(head, volume, progress, cancel), show)

    # ---- fine-tune heads ---------------------------------------------------------------------------------

    def onAddSceneCases(self) -> None:
        """One table row per volume of the scene that could be a case, with the segmentation drawn on it."""
        table = self.ui.fitCasesTable
        listed = {table.item(row, 0).data(qt.Qt.UserRole) for row in range(table.rowCount)}
        for case in self.logic.scene_cases():
            if case.volume.GetID() in listed:
                continue
            row = table.rowCount
            table.rowCount = row + 1
            for column, node in ((0, case.volume), (1, case.segmentation)):
                item = qt.QTableWidgetItem(node.GetName() if node is not None else "")
                item.setData(qt.Qt.UserRole, node.GetID() if node is not None else "")
                table.setItem(row, column, item)
            table.setItem(row, 2, qt.QTableWidgetItem(""))
            table.setItem(row, 3, qt.QTableWidgetItem(case.split))

    def tableCases(self) -> list:
        """The table's rows as `SceneCase`s. A node cell whose text was edited names another node."""
        from BrainDINOLib.logic import SceneCase

        table, scene = self.ui.fitCasesTable, slicer.mrmlScene

        def node(row: int, column: int):
            item = table.item(row, column)
            if item is None or not item.text().strip():
                return None
            chosen = scene.GetNodeByID(item.data(qt.Qt.UserRole) or "")
            if chosen is None or chosen.GetName() != item.text().strip():
                chosen = scene.GetFirstNodeByName(item.text().strip())
            if chosen is None:
                raise engineLogic().BrainDINOError(item.text(), "no node of that name in the scene")
            return chosen

        def text(row: int, column: int, default: str = "") -> str:
            item = table.item(row, column)
            return (item.text().strip() if item is not None else "") or default

        return [SceneCase(node(row, 0), node(row, 1), text(row, 2), text(row, 3, "auto"))
                for row in range(table.rowCount)]

    def onFit(self) -> None:
        """Fit the chosen head on the table's cases (or the manifest) in a child process, after the model."""
        with slicer.util.tryWithErrorDisplay("The fit could not be started.", waitCursor=True):
            if not self.requireReady():
                return
            from BrainDINOLib.logic import FitRequest

            p = self._parameterNode
            request = FitRequest.from_choice(p.fitHead, epochs=p.fitEpochs)
            folder = Path(tempfile.mkdtemp(prefix="BrainDINO-fit-"))
            self.ui.fitReportBrowser.setHtml("")
            if p.fitManifest:
                manifest = p.fitManifest
                self.run("Preparing the fit", lambda progress, cancel: manifest,
                         lambda manifest: self.startFit(manifest, request, folder))
            else:
                cases = self.logic.collect_cases(self.tableCases(), request.task, p.fitTestFraction)
                self.run("Writing the cases", lambda progress, cancel: cases.write(folder / "cases"),
                         lambda manifest: self.startFit(manifest, request, folder))

    def startFit(self, manifest, request, folder: Path) -> None:
        lines = []

        def progress(stage: str, done: int, total: int) -> None:
            self.ui.statusLabel.text = f"Fitting {request.task}: {stage}..."
            self.ui.progressBar.maximum = max(total, 1)
            self.ui.progressBar.value = done

        self.fitRequest = request
        self.fitRun = self.logic.start_fit(manifest, request, folder / "fit", on_line=lines.append,
                                           on_progress=progress, env=slicer.util.startupEnvironment(),
                                           on_finished=lambda code: self.onFitFinished(code, lines))
        self.ui.fitButton.enabled = False
        self.ui.fitCancelButton.enabled = True
        self.ui.saveHeadButton.enabled = self.ui.applyFittedHeadButton.enabled = False
        self.timer.start()

    def onFitFinished(self, code: int, lines: list) -> None:
        """The report (metrics and plots) in the panel, or why the fit did not finish."""
        from html import escape

        from BrainDINOLib.logic import FitReport

        self.ui.fitButton.enabled = True
        self.ui.fitCancelButton.enabled = False
        if code == 0 and self.fitRun.head.is_file():
            self.ui.statusLabel.text = f"Fitting {self.fitRequest.task}: done."
            self.ui.fitReportBrowser.setHtml(FitReport.read(self.fitRun.report).html())
            self.ui.saveHeadButton.enabled = self.ui.applyFittedHeadButton.enabled = True
            return
        outcome = "cancelled" if self.fitRun.process.cancelled else f"failed (exit code {code})"
        self.ui.statusLabel.text = f"Fitting {self.fitRequest.task}: {outcome}."
        tail = escape(chr(10).join(lines[-20:]))
        self.ui.fitReportBrowser.setHtml(f"<p><b>The fit {outcome}.</b></p><pre>{tail}</pre>")

    def onSaveHead(self) -> None:
        with slicer.util.tryWithErrorDisplay("Saving the head failed."):
            path = qt.QFileDialog.getSaveFileName(None, "Save the fitted head", "head.safetensors",
                                                  "BrainDINO heads (*.safetensors)")
            if path:
                saved = self.logic.save_head(self.fitRun, path)
                self.ui.statusLabel.text = f"Head saved to {saved}."

    def onApplyFittedHead(self) -> None:
        """The fitted head on the input volume: a segmentation, or a row of predictions."""
        if self.fitRequest.task == "segmentation":
            self._parameterNode.segmentationHead = str(self.fitRun.head)
            self.onApplyHead()
        else:
            self._parameterNode.subjectHead = str(self.fitRun.head)
            self.onPredict()

    # ---- command line (pretraining and power users) ------------------------------------------------------

    def onStartCommand(self) -> None:
        self.ui.trainingLog.clear()
        with slicer.util.tryWithErrorDisplay("The command could not be started."):
            if not self.dependenciesReady():
                return
            self.logic.start_command(self._parameterNode.trainTask, self._parameterNode.trainArguments,
                                     on_line=self.ui.trainingLog.appendPlainText, on_finished=self.onCommandFinished,
                                     env=slicer.util.startupEnvironment())
            self.ui.startTrainingButton.enabled = False
            self.ui.stopTrainingButton.enabled = True
            self.timer.start()

    def onStopCommand(self) -> None:
        self.logic.stop_process()

    def onCommandFinished(self, code: int) -> None:
        self.ui.trainingLog.appendPlainText(f"[finished with exit code {code}]")
        self.ui.startTrainingButton.enabled = True
        self.ui.stopTrainingButton.enabled = False


#
# Test
#

class BrainDINOTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer: sample data -> features -> PCA -> similarity -> few-shot segmentation,
    plus cancelling a job on the worker thread. Skipped, saying so, where PyTorch is not installed (an
    extension build machine): nothing is installed during a test."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if not self.torchAvailable():
            return
        self.setUp()
        self.test_full_flow()
        self.setUp()
        self.test_cancel_on_worker()

    def torchAvailable(self) -> bool:
        from BrainDINOLib.dependencies import Requirements

        ensure_engine_on_path()
        missing = [str(r) for r in Requirements.read(REQUIREMENTS).missing_torch()]
        missing += [str(r) for r in Requirements.read(REQUIREMENTS).missing_packages()]
        if missing:
            message = "BrainDINO self-test SKIPPED: this Python lacks " + ", ".join(missing)
            logging.warning(message)
            self.delayDisplay(message)
            return False
        return True

    def modelSource(self) -> str:
        """The built-in demo model, or $BRAINDINO_TEST_MODEL (e.g. the teacher fixture in a source checkout)."""
        return os.environ.get("BRAINDINO_TEST_MODEL", "demo")

    def test_full_flow(self):
        import SampleData

        registerSampleData()
        self.delayDisplay("Loading the sample volume")
        volumeNode = SampleData.downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(volumeNode)
        self.delayDisplay("Computing features, maps and a few-shot segmentation")
        results = runSelfTestFlow(engineLogic().BrainDINOLogic(slicer.mrmlScene, cache=tempfile.mkdtemp()),
                                  volumeNode, self.modelSource())
        self.assertEqual(results["shape"], (181, 217, 181))
        self.assertGreater(results["learned_dice"], results["head_mask_dice"])
        self.delayDisplay("BrainDINO flow passed")

    def test_cancel_on_worker(self):
        import SampleData

        registerSampleData()
        volumeNode = SampleData.downloadSample(SAMPLE_NAME)
        logic = engineLogic().BrainDINOLogic(slicer.mrmlScene, cache=None)
        logic.load_model(self.modelSource(), "cpu")
        try:
            self.assertIsInstance(cancelOnWorker(logic, logic.volume_from_node(volumeNode)),
                                  engineLogic().CancelledError)
        finally:
            logic.shutdown()


def runSelfTestFlow(logic, volumeNode, modelSource: str = "demo", examples: int = 3, atlas=None) -> dict:
    """The self-test's flow through the Logic: model -> features -> PCA -> similarity -> few-shot segmentation
    from `examples` painted slices of the AAL atlas's brain (`atlas`: a `Volume` on the volume's grid; None:
    the bundled one, on the sample's grid). Returns the figures the test checks."""
    import numpy as np

    logic.load_model(modelSource, "cpu")
    volume = logic.volume_from_node(volumeNode)
    progress = []
    features = logic.features(volume, logic.segmentation_layers(), progress=lambda d, t: progress.append(d))
    assert progress, "no progress was reported while computing features"
    assert features.patches.shape[0] == len(features.slices.slice_indices)

    pcaNode = logic.show_pca(logic.pca_map(features), volumeNode)
    assert pcaNode.GetImageData().GetNumberOfScalarComponents() == 3
    assert pcaNode.GetImageData().GetDimensions() == volumeNode.GetImageData().GetDimensions()

    point = logic.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "probe")
    bounds = [0.0] * 6
    volumeNode.GetRASBounds(bounds)
    point.AddControlPoint(vtk.vtkVector3d((bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2,
                                          (bounds[4] + bounds[5]) / 2))
    similarity = logic.similarity_map(features, logic.point_lps(point, volumeNode))
    logic.show_similarity(similarity, volumeNode)

    from BrainDINOLib import read_volume
    from BrainDINOLib.mrml import LabelClass, segmentation_from_labels

    if atlas is None:
        atlas = read_volume(ensure_engine_on_path() / "data" / "colin27_aal.nii.gz")
    labels = atlas.array > 0  # the brain as AAL outlines it: cortex, deep grey matter, cerebellum
    if atlas.shape != volume.shape:
        raise AssertionError(f"the atlas grid {atlas.shape} is not the sample's {volume.shape}")
    slices = features.slices.slice_indices
    chosen = [slices[(i + 1) * len(slices) // (examples + 1)] for i in range(examples)]
    painted = np.zeros(volume.shape, np.int16)
    painted[chosen] = labels[chosen].astype(np.int16)
    examplesNode = segmentation_from_labels(volume.with_array(painted), volumeNode,
                                            [LabelClass(1, "brain", (250, 240, 180))], name="examples")
    fewShot = logic.painted_labels(examplesNode, volumeNode)
    assert fewShot.slice_indices == tuple(sorted(chosen))
    result = logic.learn_from_painted(volume, fewShot)
    output = logic.show_segmentation(result.labels, volumeNode, fewShot.classes)
    assert output.GetSegmentation().GetNthSegment(0).GetName() == "brain"
    others = [k for k in slices if k not in chosen]

    def dice(predicted):
        return float(2 * (predicted[others] & labels[others]).sum() / (predicted[others].sum() + labels[others].sum()))

    results = {"shape": volume.shape, "learned_dice": dice(result.labels.array > 0),
               "head_mask_dice": dice(features.foreground), "segmentation": output, "pca": pcaNode}
    logging.info("few-shot Dice on %d unpainted slices: %.3f (the whole head mask scores %.3f)",
                 len(others), results["learned_dice"], results["head_mask_dice"])
    return results


def cancelOnWorker(logic, volume):
    """Submit an embedding to the worker, cancel it while it runs; the error the job ended with."""
    outcome = {}
    started = threading.Event()

    from BrainDINOLib import embed_volume

    def work(progress, cancel):
        started.set()
        while not cancel():  # stands for a long embedding loop that checks the flag between batches
            threading.Event().wait(0.01)
        return embed_volume(volume, logic.encoder, progress=progress, cancel=cancel)

    engine = engineLogic()
    logic.worker.submit(engine.Job("cancel test", work, lambda r: outcome.update(result=r),
                                   lambda e: outcome.update(error=e)))
    started.wait(30)
    logic.worker.cancel()
    logic.worker.wait()
    return outcome.get("error")
