"""BrainDINO: brain-MRI foundation-model features, maps, segmentations and predictions inside 3D Slicer.

A thin module: every computation is a call into the `BrainDINOLib` engine, every MRML read or write goes
through `BrainDINOLib.mrml`. `BrainDINOLogic` orchestrates the two and never touches Qt, so it runs the same
from the widget, the self-test or the Python console. Torch work runs on one persistent worker thread
(`TorchWorker`) with a cooperative cancel flag; the widget polls it with a QTimer and applies results to
the scene on the main thread. Training runs in a child process.
"""
import contextlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import queue
import re
import shlex
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import qt
import vtk

import slicer
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTableNode, vtkMRMLVectorVolumeNode)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# No `from __future__ import annotations`: parameterNodeWrapper reads the annotations as real types.
MODULE_DIR = Path(__file__).resolve().parent
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
SAMPLE_NAME = "BrainDINOColin27T1"
TORCH_REQUIREMENT = ">=2.1"


def ensure_engine_on_path() -> Path:
    """The folder of the `BrainDINOLib` package, put on sys.path when running from a source checkout.

    Installed extensions ship it next to this module (qt-scripted-modules/BrainDINOLib); a source checkout
    has it one level up. Nothing is imported: torch may not be installed yet.
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
            "slices; subject-level predictions; and launching pretraining or head fitting.")
        self.parent.acknowledgementText = (
            "Sample data: Colin27 T1 from the MRIcron templates (BSD-3-Clause). Models run with PyTorch and timm.")
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

@parameterNodeWrapper
class BrainDINOParameterNode:
    useDemoModel: bool = True
    modelFile: Path
    device: Annotated[str, Choice(["auto", "cuda", "cpu", "mps"])] = "auto"
    inputVolume: vtkMRMLScalarVolumeNode
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    similarityPoint: vtkMRMLMarkupsFiducialNode
    clusterCount: Annotated[int, WithinRange(2, 32)] = 8
    segmentationHead: Path
    paintedSegmentation: vtkMRMLSegmentationNode
    outputSegmentation: vtkMRMLSegmentationNode
    subjectHead: Path
    predictionTable: vtkMRMLTableNode
    trainTask: Annotated[str, Choice(["prepare-slices", "pretrain", "make-cases", "fit-head", "evaluate"])] = "pretrain"
    trainArguments: str = ""
    # Outputs, remembered so that recomputing updates the same nodes.
    pcaVolume: vtkMRMLVectorVolumeNode
    similarityVolume: vtkMRMLScalarVolumeNode
    attentionVolume: vtkMRMLScalarVolumeNode
    clusterVolume: vtkMRMLLabelMapVolumeNode


#
# Worker thread
#

@dataclass
class Job:
    label: str
    work: Callable[[Callable[[int, int], None], Callable[[], bool]], Any]  # (progress, cancel) -> result
    onDone: Callable[[Any], None] | None = None
    onError: Callable[[BaseException], None] | None = None


class TorchWorker:
    """One persistent thread that runs torch jobs one at a time, so the UI never blocks on a model.

    Jobs get `progress(done, total)` and `cancel()` (the cooperative flag that `cancel` sets). Results and
    errors are queued; `poll()`, called from the main thread (a QTimer in the widget), hands them to the
    job's callbacks there, so MRML is only ever touched from the main thread.
    """

    def __init__(self):
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._finished: queue.Queue[tuple[Job, Any, BaseException | None]] = queue.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress = (0, 0)
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="BrainDINO torch worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def cancel(self) -> None:
        """Stop the running job at its next check and drop the queued ones."""
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
            self._jobs.task_done()
        self._cancel.set()

    @property
    def busy(self) -> bool:
        return self._current is not None or not self._jobs.empty() or not self._finished.empty()

    def status(self) -> tuple[str, int, int]:
        """(label of the running job or "", done, total)."""
        with self._lock:
            return (self._current.label if self._current else "", *self._progress)

    def poll(self) -> int:
        """Run the callbacks of finished jobs on the calling thread; return how many finished."""
        count = 0
        while True:
            try:
                job, result, error = self._finished.get_nowait()
            except queue.Empty:
                return count
            count += 1
            if error is None:
                if job.onDone:
                    job.onDone(result)
            elif job.onError:
                job.onError(error)
            else:
                logging.error("BrainDINO: %s failed: %s", job.label, error)

    def wait(self) -> None:
        """Block until every submitted job finished and run their callbacks (scripts and tests)."""
        self._jobs.join()
        self.poll()

    def shutdown(self) -> None:
        self.cancel()
        self._jobs.put(None)

    def _report(self, done: int, total: int) -> None:
        with self._lock:
            self._progress = (int(done), int(total))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.task_done()
                return
            self._cancel.clear()
            with self._lock:
                self._current, self._progress = job, (0, 0)
            try:
                outcome = (job, job.work(self._report, self._cancel.is_set), None)
            except BaseException as error:  # handed to the main thread, which shows it
                outcome = (job, None, error)
            with self._lock:
                self._current = None
            self._finished.put(outcome)
            self._jobs.task_done()


#
# Logic
#

class BrainDINOLogic(ScriptedLoadableModuleLogic):
    """Orchestrates BrainDINOLib (computations, on any thread) and BrainDINOLib.mrml (scene, main thread).

    Methods that take nodes must run on the main thread; `compute*`, `*Map` and `fit*` methods take engine
    objects only and are what the widget runs on the worker thread.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.worker = TorchWorker()
        self.session = None  # BrainDINOLib's FeatureSession: the model, its resolution and the feature caches
        self._similarity: tuple[int, Any] | None = None  # (id of the features, SimilarityIndex)
        self.trainingProcess = None

    def getParameterNode(self) -> BrainDINOParameterNode:
        return BrainDINOParameterNode(super().getParameterNode())

    # ---- dependencies ------------------------------------------------------------------------------------

    @staticmethod
    def requirements() -> list[str]:
        lines = REQUIREMENTS.read_text().splitlines()
        return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]

    @staticmethod
    def missingRequirements() -> list[str]:
        """Requirements whose distribution is not installed (version pins are checked by pip when installing)."""
        missing = []
        for requirement in BrainDINOLogic.requirements():
            name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(requirement)
        return missing

    @staticmethod
    def torchInstalled() -> bool:
        return importlib.util.find_spec("torch") is not None

    @staticmethod
    def engine():
        """The BrainDINOLib package (imported on first use: it needs torch)."""
        ensure_engine_on_path()
        import BrainDINOLib
        import BrainDINOLib.mrml  # noqa: F401  (the MRML adapter is not imported by the package itself)
        return BrainDINOLib

    # ---- model -------------------------------------------------------------------------------------------

    def loadModel(self, source: str, device: str = "auto"):
        """Load an encoder (a checkpoint path or a built-in name such as "demo") at its device's default
        resolution, with the shared disk feature cache; any thread."""
        from BrainDINOLib.session import FeatureSession
        self.session = FeatureSession.open(source, None if device == "auto" else device,
                                           cache=self.engine().FeatureCache())
        self._similarity = None
        return self.session.encoder

    @property
    def encoder(self):
        return None if self.session is None else self.session.encoder

    def describeModel(self) -> str:
        if self.session is None:
            return "no model loaded"
        encoder = self.session.encoder
        return (f"{encoder.architecture.describe()}; {encoder.num_parameters / 1e6:.1f} M parameters; "
                f"{encoder.model_id}; {self.session.describe()}")

    def requireModel(self):
        if self.session is None:
            raise self.engine().BrainDINOError("model", "no model loaded; choose one and click Load model")
        return self.session.encoder

    # ---- features ----------------------------------------------------------------------------------------

    def volumeFromNode(self, volumeNode):
        """The input volume node as an engine `Volume` (main thread)."""
        if volumeNode is None:
            raise self.engine().BrainDINOError("input", "no input volume selected")
        return self.engine().mrml.volume_from_node(volumeNode)

    def computeFeatures(self, volume, layers: tuple[int, ...] = (), progress=None, cancel=None):
        """Features of `volume` under the loaded model holding at least the intermediate `layers`: from memory,
        from the disk cache (`$BRAINDINO_CACHE`), or computed (any thread)."""
        self.requireModel()
        return self.session.features(volume, layers, progress=progress, cancel=cancel)

    def segmentationLayers(self) -> tuple[int, ...]:
        self.requireModel()
        return self.session.segmentation_layers

    # ---- explore -----------------------------------------------------------------------------------------

    def pcaMap(self, features):
        from BrainDINOLib.maps import pca_map
        return pca_map(features, components=3).rgb

    def similarityMap(self, features, pointLps):
        """Similarity to `pointLps` (LPS mm); the index is kept, so dragging the point is fast."""
        from BrainDINOLib.maps import SimilarityIndex
        if self._similarity is None or self._similarity[0] != id(features):
            self._similarity = (id(features), SimilarityIndex(features))
        return self._similarity[1].map(pointLps)

    def attentionMap(self, volume, progress=None, cancel=None):
        from BrainDINOLib.maps import attention_map
        self.requireModel()
        return attention_map(self.session, volume, progress=progress, cancel=cancel).mean

    def clusterMap(self, features, count: int):
        from BrainDINOLib.maps import cluster_map
        return cluster_map(features, k=int(count))

    def showPCA(self, rgb, referenceNode, node=None, opacity: float = 0.5):
        return self.engine().mrml.show_rgb_map(rgb, referenceNode, name=f"{referenceNode.GetName()} PCA", node=node,
                                               opacity=opacity)

    def showSimilarity(self, similarity, referenceNode, node=None, opacity: float = 0.5):
        mrml = self.engine().mrml
        return mrml.show_scalar_map(similarity, referenceNode, name=f"{referenceNode.GetName()} similarity",
                                    node=node, colors=mrml.HEAT_COLORS, value_range=(0.0, 1.0), opacity=opacity,
                                    transparent_below=0.0)

    def showAttention(self, attention, referenceNode, node=None, opacity: float = 0.5):
        mrml = self.engine().mrml
        return mrml.show_scalar_map(attention, referenceNode, name=f"{referenceNode.GetName()} attention",
                                    node=node, colors=mrml.HEAT_COLORS, opacity=opacity)

    def showClusters(self, clusters, referenceNode, node=None):
        return self.engine().mrml.show_label_map(clusters, referenceNode, name=f"{referenceNode.GetName()} clusters",
                                                 node=node)

    def pointLps(self, markupsNode, referenceNode):
        """The probe: the last control point of the markups node, in LPS mm in the volume's frame."""
        return self.engine().mrml.point_lps(markupsNode, markupsNode.GetNumberOfControlPoints() - 1, referenceNode)

    # ---- segment -----------------------------------------------------------------------------------------

    def loadHead(self, path):
        from BrainDINOLib.heads import load_head
        return load_head(path)

    def segmentWithHead(self, head, volume, progress=None, cancel=None):
        """Label volume from a saved segmentation head, on features with the blocks the head reads."""
        from BrainDINOLib.heads import segment
        features = self.computeFeatures(volume, tuple(head.card.layers), progress, cancel)
        return segment(head, features)

    def paintedLabels(self, segmentationNode, referenceNode):
        if segmentationNode is None:
            raise self.engine().BrainDINOError("segmentation", "choose the segmentation you painted")
        return self.engine().mrml.painted_labels(segmentationNode, referenceNode)

    def fitFewShot(self, volume, painted, progress=None, cancel=None):
        """Fit a head on the painted slices and segment the whole volume (few-shot), as `braindino few-shot`."""
        from BrainDINOLib.heads.painted import learn_from_painted
        self.requireModel()
        return learn_from_painted(self.session, volume, painted, progress=progress, cancel=cancel)

    def showSegmentation(self, labels, referenceNode, classes, node=None, name: str = ""):
        """Labels -> a segmentation node with one named, coloured segment per class."""
        return self.engine().mrml.segmentation_from_labels(
            labels, referenceNode, classes, name=name or f"{referenceNode.GetName()} BrainDINO", node=node)

    # ---- predict -----------------------------------------------------------------------------------------

    def predictSubject(self, head, volume, progress=None, cancel=None) -> dict:
        if head.task == "segmentation":
            raise self.engine().BrainDINOError(head.card.kind, "is a segmentation head; use the Segment panel")
        features = self.computeFeatures(volume, tuple(head.card.layers), progress, cancel)
        return head.predict(features)

    def showPrediction(self, prediction: dict, headName: str, subjectName: str, tableNode=None):
        """Add (or replace) the row of this head and subject in the results table."""
        mrml = self.engine().mrml
        row = {"subject": subjectName, "head": headName, **_flatten(prediction)}
        rows = [] if tableNode is None else [
            r for r in mrml.rows_from_table(tableNode) if (r.get("subject"), r.get("head")) != (subjectName, headName)]
        return mrml.table_from_rows([*rows, row], scene=slicer.mrmlScene, name="BrainDINO predictions", node=tableNode)

    # ---- train -------------------------------------------------------------------------------------------

    @staticmethod
    def trainingCommand(task: str, arguments: str) -> list[str]:
        """`braindino <task> <arguments>` run by Slicer's own Python (PythonSlicer)."""
        python = shutil.which("PythonSlicer") or sys.executable
        return [python, "-m", "BrainDINOLib.cli", task, *shlex.split(arguments)]

    def startTraining(self, task: str, arguments: str, onLine: Callable[[str], None],
                      onFinished: Callable[[int], None]):
        """Launch training as a child process whose output streams to `onLine`; `stopTraining` kills it."""
        if self.trainingProcess is not None and self.trainingProcess.poll() is None:
            raise self.engine().BrainDINOError(task, "a training run is already in progress")
        command = self.trainingCommand(task, arguments)
        environment = {"PYTHONPATH": os.pathsep.join(p for p in (str(ensure_engine_on_path().parent),
                                                                 os.environ.get("PYTHONPATH", "")) if p),
                       "PYTHONUNBUFFERED": "1"}
        onLine("$ " + shlex.join(command))

        def finished(code: int) -> None:
            self.trainingProcess = None
            onFinished(code)

        if "blocking" not in inspect.signature(slicer.util.launchConsoleProcess).parameters:
            raise self.engine().BrainDINOError("Slicer", "this Slicer cannot stream a child process's output; "
                                                         "use a newer Slicer, or run the command in a terminal")
        self.trainingProcess = slicer.util.launchConsoleProcess(
            command, updateEnvironment=environment, blocking=False, logCallback=onLine, completedCallback=finished)
        return self.trainingProcess

    def stopTraining(self) -> None:
        """Kill the training process and everything it started (torchrun workers, data loaders)."""
        if self.trainingProcess is None or self.trainingProcess.poll() is not None:
            return
        import psutil
        try:
            process = psutil.Process(self.trainingProcess.pid)
            for child in process.children(recursive=True):
                child.kill()
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _flatten(prediction: dict, prefix: str = "") -> dict:
    """Nested prediction dicts -> one flat row (e.g. {"probabilities": {"a": .2}} -> {"probabilities.a": .2})."""
    row = {}
    for key, value in prediction.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            row.update(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            row.update({f"{name}[{i}]": v for i, v in enumerate(value)})
        else:
            row[name] = value.item() if hasattr(value, "item") else value
    return row


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

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainDINO.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BrainDINOLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_MS)
        self.timer.connect("timeout()", self.pollWorker)

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
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self.timer.stop()
        if self.logic:
            self.logic.worker.shutdown()
            self.logic.stopTraining()

    def enter(self) -> None:
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
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.observePoint(self._parameterNode.similarityPoint)

    # ---- dependencies ------------------------------------------------------------------------------------

    def ensureDependencies(self) -> bool:
        """Install torch (PyTorch extension) and the requirements, each only after the user agrees."""
        if not BrainDINOLogic.torchInstalled():
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("BrainDINO needs PyTorch: install the PyTorch extension from the "
                                         "Extensions Manager and restart Slicer.")
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                            torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
        if not BrainDINOLogic.missingRequirements():
            return True
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(packaging.load_requirements(str(REQUIREMENTS)), requester="BrainDINO")
        else:
            missing = BrainDINOLogic.missingRequirements()
            if not slicer.util.confirmOkCancelDisplay(
                    "BrainDINO needs these Python packages, which will be downloaded and installed now:\n\n"
                    + "\n".join(missing), windowTitle="BrainDINO: install dependencies"):
                return False
            with slicer.util.tryWithErrorDisplay("Installing BrainDINO's dependencies failed.", waitCursor=True):
                slicer.util.pip_install(missing)
        missing = BrainDINOLogic.missingRequirements()
        if missing:
            slicer.util.warningDisplay("Still missing: " + ", ".join(missing))
        return not missing

    # ---- worker plumbing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def showingErrors(self, label: str):
        """Show an error of a worker callback to the user and stop it there (the timer keeps polling)."""
        try:
            with slicer.util.tryWithErrorDisplay(f"{label} failed."):
                yield
        except Exception:
            self.ui.statusLabel.text = f"{label}: failed."

    def run(self, label: str, work, onDone) -> None:
        """Queue `work(progress, cancel)` on the torch thread; `onDone(result)` runs here when it finishes."""
        def onError(error: BaseException) -> None:
            self.logic.worker.cancel()  # the jobs queued after this one depend on it
            if isinstance(error, BrainDINOLogic.engine().CancelledError):
                self.ui.statusLabel.text = f"{label}: cancelled."
                return
            with self.showingErrors(label):
                raise error

        def done(result) -> None:
            with self.showingErrors(label):
                onDone(result)
                self.ui.statusLabel.text = f"{label}: done."

        self.logic.worker.submit(Job(label, work, done, onError))
        self.ui.cancelButton.enabled = True
        self.timer.start()

    def pollWorker(self) -> None:
        label, done, total = self.logic.worker.status()
        if label:
            self.ui.statusLabel.text = f"{label}..."
            self.ui.progressBar.maximum = max(total, 1) if total else 0  # 0: busy indicator
            self.ui.progressBar.value = done
        self.logic.worker.poll()
        if not self.logic.worker.busy:
            self.timer.stop()
            self.ui.architectureLabel.text = self.logic.describeModel()
            self.ui.cancelButton.enabled = False
            self.ui.progressBar.maximum = 1
            self.ui.progressBar.value = 1

    def onCancel(self) -> None:
        self.logic.worker.cancel()

    def requireReady(self) -> bool:
        """Dependencies installed (False if the user declined); the model is queued for loading if none is
        loaded yet, so the jobs queued after it find it (the worker runs jobs in order)."""
        if not self.ensureDependencies():
            return False
        if self.logic.encoder is None:
            self.queueModelLoading()
        return True

    def modelSource(self) -> str:
        p = self._parameterNode
        return "demo" if p.useDemoModel else str(p.modelFile)

    # ---- model and input ---------------------------------------------------------------------------------

    def queueModelLoading(self) -> None:
        source, device = self.modelSource(), self._parameterNode.device
        self.ui.architectureLabel.text = f"loading {source}..."
        self.run("Loading the model", lambda progress, cancel: self.logic.loadModel(source, device),
                 lambda encoder: None)  # the label is refreshed when the worker is idle

    def onLoadModel(self) -> None:
        with slicer.util.tryWithErrorDisplay("Loading the model failed."):
            if self.ensureDependencies():
                self.queueModelLoading()

    def inputVolume(self):
        """The selected input node and its engine `Volume` (read on the main thread)."""
        node = self._parameterNode.inputVolume
        return node, self.logic.volumeFromNode(node)

    def withFeatures(self, label: str, then, segmentationLayers: bool = False) -> None:
        """Compute (or fetch) features on the worker, then call `then(node, volume, features)` here."""
        with slicer.util.tryWithErrorDisplay(f"{label} failed.", waitCursor=True):
            if not self.requireReady():
                return
            node, volume = self.inputVolume()

            def work(progress, cancel):  # on the worker, after the model (possibly queued just now) is loaded
                layers = self.logic.segmentationLayers() if segmentationLayers else ()
                return self.logic.computeFeatures(volume, layers, progress, cancel)

            self.run("Computing features", work, lambda features: then(node, volume, features))

    def onComputeFeatures(self) -> None:
        """Embed with the blocks segmentation needs too, so every panel afterwards reuses these features."""
        self.withFeatures("Computing features", lambda node, volume, features: None, segmentationLayers=True)

    # ---- explore -----------------------------------------------------------------------------------------

    def onPCA(self) -> None:
        def show(node, volume, features):
            self.run("PCA colours", lambda progress, cancel: self.logic.pcaMap(features),
                     lambda rgb: setattr(self._parameterNode, "pcaVolume", self.logic.showPCA(
                         rgb, node, self._parameterNode.pcaVolume, self._parameterNode.overlayOpacity)))
        self.withFeatures("PCA colours", show)

    def onAttention(self) -> None:
        with slicer.util.tryWithErrorDisplay("Attention map failed.", waitCursor=True):
            if not self.requireReady():
                return
            node, volume = self.inputVolume()
            self.run("Attention map", lambda progress, cancel: self.logic.attentionMap(volume, progress, cancel),
                     lambda attention: setattr(self._parameterNode, "attentionVolume", self.logic.showAttention(
                         attention, node, self._parameterNode.attentionVolume, self._parameterNode.overlayOpacity)))

    def onClusters(self) -> None:
        def show(node, volume, features):
            count = self._parameterNode.clusterCount
            self.run("Clusters", lambda progress, cancel: self.logic.clusterMap(features, count),
                     lambda clusters: setattr(self._parameterNode, "clusterVolume", self.logic.showClusters(
                         clusters, node, self._parameterNode.clusterVolume)))
        self.withFeatures("Clusters", show)

    def onOpacity(self, value: float) -> None:
        """Foreground opacity of every slice view (overlays exist only once the engine, and torch, are there)."""
        if BrainDINOLogic.torchInstalled():
            BrainDINOLogic.engine().mrml.set_foreground_opacity(slicer.mrmlScene, value)

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
            point = self.logic.pointLps(caller, node)
            self._similarityRunning, self._pendingPoint = True, False
            self.run("Similarity map", lambda progress, cancel: self.similarityWork(volume, point, progress, cancel),
                     lambda similarity: self.showSimilarity(similarity, node, caller))

    def similarityWork(self, volume, point, progress, cancel):
        try:
            return self.logic.similarityMap(self.logic.computeFeatures(volume, (), progress, cancel), point)
        finally:
            self._similarityRunning = False

    def showSimilarity(self, similarity, node, markupsNode) -> None:
        self._parameterNode.similarityVolume = self.logic.showSimilarity(
            similarity, node, self._parameterNode.similarityVolume, self._parameterNode.overlayOpacity)
        if self._pendingPoint:
            self.onPointMoved(markupsNode)

    # ---- segment -----------------------------------------------------------------------------------------

    def onApplyHead(self) -> None:
        with slicer.util.tryWithErrorDisplay("Segmenting with the head failed.", waitCursor=True):
            if not self.requireReady():
                return
            node, volume = self.inputVolume()
            head = self.logic.loadHead(self._parameterNode.segmentationHead)
            self.run("Segmenting with the head",
                     lambda progress, cancel: self.logic.segmentWithHead(head, volume, progress, cancel),
                     lambda labels: self.setOutputSegmentation(self.logic.showSegmentation(
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
            painted = self.logic.paintedLabels(self._parameterNode.paintedSegmentation, node)
            self.ui.statusLabel.text = (f"Learning {', '.join(painted.class_names)} from slices "
                                        f"{', '.join(map(str, painted.slice_indices))}...")
            self.run(f"Learning from {len(painted.slice_indices)} slices",
                     lambda progress, cancel: self.logic.fitFewShot(volume, painted, progress, cancel),
                     lambda result: self.setOutputSegmentation(self.logic.showSegmentation(
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
            head = self.logic.loadHead(path)

            def show(prediction):
                table = self.logic.showPrediction(prediction, path.stem, node.GetName(),
                                                  self._parameterNode.predictionTable)
                self._parameterNode.predictionTable = table
                slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
                slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
                slicer.app.applicationLogic().PropagateTableSelection()

            self.run(f"Predicting with {path.stem}",
                     lambda progress, cancel: self.logic.predictSubject(head, volume, progress, cancel), show)

    # ---- train -------------------------------------------------------------------------------------------

    def onStartTraining(self) -> None:
        self.ui.trainingLog.clear()
        with slicer.util.tryWithErrorDisplay("Training could not be started."):
            if not self.ensureDependencies():
                return
            self.logic.startTraining(self._parameterNode.trainTask, self._parameterNode.trainArguments,
                                     self.ui.trainingLog.appendPlainText, self.onTrainingFinished)
            self.ui.startTrainingButton.enabled = False
            self.ui.stopTrainingButton.enabled = True

    def onStopTraining(self) -> None:
        self.logic.stopTraining()

    def onTrainingFinished(self, code: int) -> None:
        self.ui.trainingLog.appendPlainText(f"[finished with exit code {code}]")
        self.ui.startTrainingButton.enabled = True
        self.ui.stopTrainingButton.enabled = False


#
# Test
#

class BrainDINOTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer: sample data -> features -> PCA -> similarity -> few-shot segmentation,
    plus cancelling a job on the worker thread."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_full_flow()
        self.setUp()
        self.test_cancel_on_worker()

    def modelSource(self) -> str:
        """The built-in demo model, or $BRAINDINO_TEST_MODEL (e.g. the teacher fixture in a source checkout)."""
        return os.environ.get("BRAINDINO_TEST_MODEL", "demo")

    def test_full_flow(self):
        import numpy as np
        import SampleData

        registerSampleData()
        self.delayDisplay("Loading the sample volume")
        volumeNode = SampleData.downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(volumeNode)

        logic = BrainDINOLogic()
        logic.loadModel(self.modelSource(), "cpu")
        volume = logic.volumeFromNode(volumeNode)
        self.assertEqual(volume.shape, (181, 217, 181))

        self.delayDisplay("Computing features")
        progress = []
        features = logic.computeFeatures(volume, logic.segmentationLayers(), progress=lambda d, t: progress.append(d))
        self.assertTrue(progress)
        self.assertEqual(features.patches.shape[0], len(features.slices.slice_indices))

        self.delayDisplay("PCA colours")
        pcaNode = logic.showPCA(logic.pcaMap(features), volumeNode)
        self.assertEqual(pcaNode.GetImageData().GetNumberOfScalarComponents(), 3)
        self.assertEqual(pcaNode.GetImageData().GetDimensions(), volumeNode.GetImageData().GetDimensions())

        self.delayDisplay("Similarity to a point")
        point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "probe")
        bounds = [0.0] * 6
        volumeNode.GetRASBounds(bounds)
        centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        point.AddControlPoint(vtk.vtkVector3d(*centre))
        similarity = logic.similarityMap(features, logic.pointLps(point, volumeNode))
        self.assertAlmostEqual(float(similarity.array.max()), 1.0, places=5)
        logic.showSimilarity(similarity, volumeNode)

        self.delayDisplay("Few-shot segmentation from three painted slices")
        atlas = logic.engine().read_volume(ensure_engine_on_path() / "data" / "colin27_aal.nii.gz")
        self.assertEqual(atlas.shape, volume.shape)
        labels = atlas.array > 0  # the brain as AAL outlines it: cortex, deep grey matter, cerebellum
        painted = np.zeros(volume.shape, np.int16)
        slices = features.slices.slice_indices
        examples = [slices[len(slices) // 4], slices[len(slices) // 2], slices[3 * len(slices) // 4]]
        painted[examples] = labels[examples].astype(np.int16)
        mrml = logic.engine().mrml
        examplesNode = mrml.segmentation_from_labels(volume.with_array(painted), volumeNode,
                                                     [mrml.LabelClass(1, "brain", (250, 240, 180))],
                                                     name="examples")
        fewShot = logic.paintedLabels(examplesNode, volumeNode)
        self.assertEqual(fewShot.slice_indices, tuple(sorted(examples)))
        result = logic.fitFewShot(volume, fewShot)
        output = logic.showSegmentation(result.labels, volumeNode, fewShot.classes)
        segment = output.GetSegmentation().GetNthSegment(0)
        self.assertEqual(segment.GetName(), "brain")
        others = [k for k in slices if k not in examples]

        def dice(predicted):
            return 2 * (predicted[others] & labels[others]).sum() / (predicted[others].sum() + labels[others].sum())

        learned, headMask = dice(result.labels.array > 0), dice(features.foreground)
        logging.info("few-shot Dice on %d unpainted slices: %.3f (the whole head mask scores %.3f)",
                     len(others), learned, headMask)
        self.assertGreater(learned, headMask)  # it learned the brain, not just where the head is
        self.delayDisplay("BrainDINO flow passed")

    def test_cancel_on_worker(self):
        import SampleData

        registerSampleData()
        volumeNode = SampleData.downloadSample(SAMPLE_NAME)
        logic = BrainDINOLogic()
        logic.loadModel(self.modelSource(), "cpu")
        volume = logic.volumeFromNode(volumeNode)
        outcome = {}
        started = threading.Event()

        def work(progress, cancel):
            started.set()
            while not cancel():  # stands for a long embedding loop that checks the flag between batches
                threading.Event().wait(0.01)
            return logic.engine().embed_volume(volume, logic.encoder, progress=progress, cancel=lambda: True)

        logic.worker.submit(Job("cancel test", work, lambda r: outcome.update(result=r),
                                lambda e: outcome.update(error=e)))
        started.wait(10)
        logic.worker.cancel()
        logic.worker.wait()
        self.assertIsInstance(outcome.get("error"), logic.engine().CancelledError)
        logic.worker.shutdown()
