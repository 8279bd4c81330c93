"""`BrainDINOLogic`: everything the Slicer module and the web page do, on an MRML scene, without Qt or the Slicer
application.

It owns the `FeatureSession` (model, resolution, feature caches), a `TorchWorker` for model work, and the
child process of long jobs (head fitting, pretraining). It joins two halves that never meet elsewhere:

- computations on engine objects (`Volume`, `VolumeFeatures`, heads), which may run on any thread: `features`,
  `pca_map`, `similarity_map`, `attention_map`, `cluster_map`, `segment_with_head`, `learn_from_painted`,
  `predict_subject`. A front end runs them on `self.worker`;
- reads and writes of MRML nodes through `BrainDINOLib.mrml`, which must run on the scene's (main) thread:
  `volume_from_node`, `painted_labels`, `show_*`, `collect_cases`.

Nothing here imports torch, SimpleITK or `slicer` when the module is imported, so a front end can import it
before dependencies are installed. The scene is passed in; `slicer.mrmlScene` and `slicer.app` are never used.

Quick use from Slicer's Python console or a script (one thread, so no worker needed):

    logic = BrainDINOLogic(slicer.mrmlScene)
    logic.load_model("demo")
    features = logic.features_of(volume_node)
    logic.show_pca(logic.pca_map(features), volume_node)
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BrainDINOError, CancelledError
from .heads.config import FitConfig
from .heads.tasks import CLASS_TASKS, CLASSIFICATION, KNN, REGRESSION, SEGMENTATION, SURVIVAL, UNKNOWN_TASK
from .process import ChildProcess, braindino_command
from .worker import Cancel, Job, Progress, TorchWorker

__all__ = ["BrainDINOError", "BrainDINOLogic", "CancelledError", "CaseSet", "FitReport", "FitRequest", "FitRun",
           "HEAD_CHOICES", "Job", "OUTPUT_ATTRIBUTE", "SceneCase", "TorchWorker"]

if TYPE_CHECKING:
    from .cache import FeatureCache
    from .encoder import Encoder
    from .features import Planes, VolumeFeatures
    from .heads import Head
    from .heads.fewshot import FewShotResult
    from .heads.painted import PaintedLabels
    from .resolution import ResolutionPolicy
    from .session import FeatureSession
    from .volume import Volume

log = logging.getLogger(__name__)

OUTPUT_ATTRIBUTE = "BrainDINO.output"  # set on the nodes the Logic makes (maps, segmentations), never on inputs
DEFAULT_CACHE = "default"  # `BrainDINOLogic(cache=...)`: the shared disk cache ($BRAINDINO_CACHE, ~/.cache/braindino)
# Torch threads for similarity maps: their operations are small and memory-bound, and a second thread lost far
# more to OpenMP synchronisation than it gained on a shared 2-core machine (benchmarks/similarity_speed.py); one
# thread also leaves a core to the viewer's rendering while the rest of a map is computed.
SIMILARITY_THREADS = 1

# What the fine-tuning panel offers: label -> (fit-head --task, --kind).
HEAD_CHOICES: dict[str, tuple[str, str]] = {
    "segmentation, linear": (SEGMENTATION, "linear"),
    "segmentation, MLP": (SEGMENTATION, "mlp"),
    "segmentation, decoder (x4 finer)": (SEGMENTATION, "decoder"),
    "classification": (CLASSIFICATION, ""),
    "regression": (REGRESSION, ""),
    "survival": (SURVIVAL, ""),
    "kNN classification": (KNN, ""),
}
_COLUMN = {f.name: f.default for f in fields(FitConfig) if f.name.endswith("_column")}  # fit-head's defaults
LABEL_COLUMN = _COLUMN["label_column"]
SUBJECT_TARGET_COLUMNS = {CLASSIFICATION: (LABEL_COLUMN,), KNN: (LABEL_COLUMN,),
                          REGRESSION: (_COLUMN["target_column"],),
                          SURVIVAL: (_COLUMN["time_column"], _COLUMN["event_column"])}


# ---- fine-tuning: labelled cases of the scene --------------------------------------------------------------

@dataclass
class SceneCase:
    """One labelled case in the scene: a volume node and what it should teach.

    Segmentation heads take `segmentation` (a segmentation node on the volume; segments are matched across
    cases by name). Subject heads take `target`: a class name (classification, kNN), a number (regression),
    or "time, event" (survival; event 1 = observed, 0 = censored). `split` is "train", "test" or "auto".
    """

    volume: Any
    segmentation: Any = None
    target: str = ""
    split: str = "auto"


@dataclass
class CaseSet:
    """Scene cases read into engine volumes (on the main thread), ready to be written anywhere (any thread)."""

    task: str
    images: list[Volume]
    labels: list[Volume | None]
    targets: list[dict[str, str]]
    splits: list[str]
    names: list[str]
    class_names: list[str] = field(default_factory=list)  # segmentation: names of label values 1..N

    def write(self, folder: str | Path) -> Path:
        """Images (and label maps) as NIfTI, `classes.txt` (segmentation) and `cases.csv`; the manifest path."""
        from .atomic import write_text_atomic
        from .volume import write_volume

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        columns = ["case", "split", "image", *((LABEL_COLUMN,) if self.task == SEGMENTATION
                                               else SUBJECT_TARGET_COLUMNS[self.task])]
        rows = []
        for index, (name, image, labels, targets, split) in enumerate(
                zip(self.names, self.images, self.labels, self.targets, self.splits)):
            stem = f"{index:03d}_{_file_stem(name)}"
            write_volume(image, folder / f"{stem}.nii")
            row = {"case": name, "split": split, "image": f"{stem}.nii", **targets}
            if labels is not None:
                write_volume(labels, folder / f"{stem}_labels.nii")
                row[LABEL_COLUMN] = f"{stem}_labels.nii"
            rows.append(row)
        if self.task == SEGMENTATION:
            write_text_atomic(folder / "classes.txt", "\n".join(["background", *self.class_names]) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        manifest = folder / "cases.csv"
        write_text_atomic(manifest, buffer.getvalue())
        return manifest


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:40] or "case"


def subject_targets(task: str, text: str, case: str) -> dict[str, str]:
    """The manifest columns of one subject's typed target (checked here, so a typo is named before any work)."""
    text = text.strip()
    columns = SUBJECT_TARGET_COLUMNS.get(task)
    if task in CLASS_TASKS:
        if not text:
            raise BrainDINOError(case, "has no class: type the class of each case")
        return {columns[0]: text}
    if task == REGRESSION:
        if not _is_finite_number(text):
            raise BrainDINOError(case, f"target {text!r} is not a number")
        return {columns[0]: text}
    if task == SURVIVAL:
        parts = [p for p in re.split(r"[,;\s]+", text) if p]
        if len(parts) != 2 or not _is_finite_number(parts[0]) or parts[1] not in ("0", "1"):
            raise BrainDINOError(case, f"survival target {text!r}: type the time and the event, e.g. '24.5, 1' "
                                       "(event 1 = observed, 0 = censored)")
        return dict(zip(columns, parts))
    raise BrainDINOError(task, UNKNOWN_TASK)


def _is_finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def assign_splits(splits: Sequence[str], test_fraction: float, seed: int = 0,
                  strata: Sequence[str] | None = None) -> list[str]:
    """Fill the "auto" entries of `splits` with "train" or "test": `test_fraction` of all cases held out
    (stratified by `strata`, e.g. class names, where every class has two members), the rest for training."""
    import numpy as np

    splits = list(splits)
    auto = [i for i, s in enumerate(splits) if s == "auto"]
    wanted = int(round(test_fraction * len(splits))) - sum(s == "test" for s in splits)
    count = max(0, min(wanted, len(auto) - 2)) if test_fraction > 0 else 0
    chosen: set[int] = set()
    if count:
        from sklearn.model_selection import train_test_split

        labels = None if strata is None else np.asarray([strata[i] for i in auto])
        if labels is not None:
            _, counts = np.unique(labels, return_counts=True)
            if counts.min() < 2 or count < len(counts):
                labels = None
        _, held = train_test_split(np.arange(len(auto)), test_size=count, random_state=seed, stratify=labels)
        chosen = {auto[i] for i in held}
    return ["test" if i in chosen else ("train" if s == "auto" else s) for i, s in enumerate(splits)]


# ---- fine-tuning: the fit and its report -------------------------------------------------------------------

@dataclass(frozen=True)
class FitRequest:
    """What to fit (a `fit-head` task and kind) and how."""

    task: str
    kind: str = ""
    epochs: int = 200
    val_fraction: float | None = None  # None: 0.2, or 0 below 10 training cases (too few to spare)
    seed: int = 0

    @classmethod
    def from_choice(cls, label: str, **options) -> FitRequest:
        if label not in HEAD_CHOICES:
            raise BrainDINOError(label, f"unknown head; choose one of {', '.join(HEAD_CHOICES)}")
        task, kind = HEAD_CHOICES[label]
        return cls(task, kind, **options)


@dataclass
class FitRun:
    """One `braindino fit-head` in a child process: where it writes, and the process."""

    folder: Path
    manifest: Path
    head: Path
    report: Path
    process: ChildProcess


@dataclass(frozen=True)
class FitReport:
    """A fit's report folder read back: test metrics (metrics.json), fitting metrics (fit_metrics.json), plots."""

    folder: Path
    metrics: dict
    fit_metrics: dict
    plots: tuple[Path, ...]

    @classmethod
    def read(cls, folder: str | Path) -> FitReport:
        folder = Path(folder)

        def load(name: str) -> dict:
            path = folder / name
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

        return cls(folder, load("metrics.json"), load("fit_metrics.json"), tuple(sorted(folder.glob("*.png"))))

    def summary(self) -> list[tuple[str, str]]:
        """The numbers a user looks at first, as (name, value) rows: test metrics, else validation metrics."""
        rows: list[tuple[str, str]] = []
        test = self.metrics
        validation = self.fit_metrics.get("validation", {})
        source, where = (test, "test") if test else (validation, "validation")
        count = source.get("cases", source.get("subjects"))
        if count is not None:
            rows.append((f"{where} cases", str(count)))
        for key, label in (("mean_dice", "mean Dice"), ("mean_hd95_mm", "mean HD95 (mm)"), ("accuracy", "accuracy"),
                           ("balanced_accuracy", "balanced accuracy"), ("macro_auc", "AUC"), ("mae", "MAE"),
                           ("rmse", "RMSE"), ("r2", "R²"), ("c_index", "C-index"), ("logrank_p", "log-rank p")):
            if isinstance(source.get(key), (int, float)):
                rows.append((f"{where} {label}", _number(source[key])))
        for name, dice in source.get("dice_per_class", {}).items():
            rows.append((f"{where} Dice {name}", _number(dice)))
        cross = self.fit_metrics.get("cross_validation", {})
        for key, value in cross.items():
            if isinstance(value, dict) and "mean" in value:
                rows.append((f"cross-validation {key}", f"{_number(value['mean'])} ± {_number(value['std'])}"))
        return rows

    def html(self) -> str:
        """The summary as an HTML table followed by the plots (for a Qt text browser or a web page)."""
        from html import escape

        cells = "".join(f"<tr><td>{escape(k)}</td><td align='right'>{escape(v)}</td></tr>" for k, v in self.summary())
        images = "".join(f"<p><b>{escape(p.stem.replace('_', ' '))}</b><br><img src='{p.as_uri()}' width='360'></p>"
                         for p in self.plots)
        return f"<table cellspacing='2'>{cells}</table>{images}"


def _number(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


# ---- the Logic ------------------------------------------------------------------------------------------------

class BrainDINOLogic:
    """The BrainDINO Logic on one MRML scene (see the module docstring for its two halves).

    `cache`: the feature cache models use: `DEFAULT_CACHE` (shared with the command line), a folder, a
    `FeatureCache`, or None (memory only).
    """

    def __init__(self, scene, cache: FeatureCache | str | Path | None = DEFAULT_CACHE):
        self.scene = scene
        self.cache = cache
        self.worker = TorchWorker()
        self.session: FeatureSession | None = None
        self.model_source: str = ""
        self.process: ChildProcess | None = None  # the running child process, if any
        self._similarity: tuple[VolumeFeatures, Any] | None = None  # (features, their SimilarityIndex)
        self._node_volume: tuple[tuple, Volume] | None = None  # ((node ID, modified times), its Volume)

    def shutdown(self) -> None:
        """Stop the worker thread and any child process (the front end is closing)."""
        self.worker.shutdown()
        self.stop_process()

    # ---- model ---------------------------------------------------------------------------------------------

    def load_model(self, source: str = "demo", device: str = "auto", policy: ResolutionPolicy | None = None,
                   precision: str = "auto") -> Encoder:
        """Load an encoder (a checkpoint path or a built-in name such as "demo") with the shared feature cache, to
        run at `precision` (see `inference.py`); `policy` None takes the device's default resolution. Any thread."""
        from .cache import FeatureCache
        from .session import FeatureSession

        cache = self.cache
        if isinstance(cache, (str, Path)):
            cache = FeatureCache(None if cache == DEFAULT_CACHE else cache)
        self.session = FeatureSession.open(source, None if device in ("", "auto") else device, policy, cache,
                                           precision=precision)
        self.model_source = str(source)
        self._similarity = None
        return self.session.encoder

    @property
    def encoder(self) -> Encoder | None:
        return None if self.session is None else self.session.encoder

    def describe_model(self) -> str:
        if self.session is None:
            return "no model loaded"
        encoder = self.session.encoder
        return (f"{encoder.architecture.describe()}; {encoder.num_parameters / 1e6:.1f} M parameters; "
                f"{self.session.describe()}")

    def require_session(self) -> FeatureSession:
        if self.session is None:
            raise BrainDINOError("model", "no model loaded; choose one and click Load model")
        return self.session

    def segmentation_layers(self) -> tuple[int, ...]:
        return self.require_session().segmentation_layers

    # ---- features ------------------------------------------------------------------------------------------

    def volume_from_node(self, volume_node) -> Volume:
        """A volume node as an engine `Volume` (main thread). The same object again while the node and its voxels
        are unchanged (their modification times), so that the session finds its features without copying and
        hashing the voxels again: a similarity point dragged across the views asks on every move."""
        if volume_node is None:
            raise BrainDINOError("input", "no input volume selected")
        from . import mrml

        stamp = (volume_node.GetID(), *mrml.modified_times(volume_node))
        if self._node_volume is None or self._node_volume[0] != stamp:
            self._node_volume = (stamp, mrml.volume_from_node(volume_node))
        return self._node_volume[1]

    def features(self, volume: Volume, layers: Sequence[int] = (), progress: Progress | None = None,
                 cancel: Cancel | None = None) -> VolumeFeatures:
        """Features of `volume` with at least the encoder blocks `layers`: from memory, the disk cache, or
        computed (any thread)."""
        return self.require_session().features(volume, layers, progress=progress, cancel=cancel)

    def features_of(self, volume_node, layers: Sequence[int] = (), progress: Progress | None = None,
                    cancel: Cancel | None = None) -> VolumeFeatures:
        """`features` of a volume node, in one call (main thread: for scripts and the console)."""
        return self.features(self.volume_from_node(volume_node), layers, progress, cancel)

    # ---- maps (any thread) and their nodes (main thread) ---------------------------------------------------

    def pca_map(self, features: VolumeFeatures) -> Volume:
        from .maps import pca_map

        return pca_map(features, components=3).rgb

    def similarity_map(self, features: VolumeFeatures, point_lps, cancel: Cancel | None = None) -> Volume:
        """Similarity to `point_lps` (LPS mm); the index and its upsampling weights are kept, so the next point is
        fast. `CancelledError` once `cancel()` (checked between chunks of slices)."""
        from .threads import torch_threads

        with torch_threads(SIMILARITY_THREADS):
            return self._similarity_index(features).map(point_lps, cancel)

    def similarity_planes(self, features: VolumeFeatures, point_lps, planes: Planes) -> Volume:
        """`similarity_map` on the planes three slice views show (0 elsewhere), in a fraction of its time."""
        from .threads import torch_threads

        with torch_threads(SIMILARITY_THREADS):
            return self._similarity_index(features).map_planes(point_lps, planes)

    def _similarity_index(self, features: VolumeFeatures):
        from .maps import SimilarityIndex

        if self._similarity is None or self._similarity[0] is not features:
            self._similarity = (features, SimilarityIndex(features))
        return self._similarity[1]

    def attention_map(self, volume: Volume, progress: Progress | None = None, cancel: Cancel | None = None) -> Volume:
        from .maps import attention_map

        return attention_map(self.require_session(), volume, progress=progress, cancel=cancel).mean

    def cluster_map(self, features: VolumeFeatures, count: int) -> Volume:
        from .maps import cluster_map

        return cluster_map(features, k=int(count))

    def show_pca(self, rgb: Volume, reference, node=None, opacity: float = 0.5):
        from . import mrml

        return _output(mrml.show_rgb_map(rgb, reference, name=f"{reference.GetName()} PCA", node=node, opacity=opacity))

    def show_similarity(self, similarity: Volume, reference, node=None, opacity: float = 0.5):
        from . import mrml

        return _output(mrml.show_scalar_map(similarity, reference, name=f"{reference.GetName()} similarity",
                                            node=node, colors=mrml.HEAT_COLORS, value_range=(0.0, 1.0),
                                            opacity=opacity, transparent_below=0.0))

    def show_attention(self, attention: Volume, reference, node=None, opacity: float = 0.5):
        from . import mrml

        return _output(mrml.show_scalar_map(attention, reference, name=f"{reference.GetName()} attention",
                                            node=node, colors=mrml.HEAT_COLORS, opacity=opacity))

    def show_clusters(self, clusters: Volume, reference, node=None):
        from . import mrml

        return _output(mrml.show_label_map(clusters, reference, name=f"{reference.GetName()} clusters", node=node))

    def set_overlay_opacity(self, opacity: float) -> None:
        from . import mrml

        mrml.set_foreground_opacity(self.scene, opacity)

    def point_lps(self, markups_node, reference):
        """The probe: the last control point of the markups node, in LPS mm in the volume's frame."""
        from . import mrml

        if markups_node is None:
            raise BrainDINOError("point", "no similarity point selected")
        return mrml.point_lps(markups_node, markups_node.GetNumberOfControlPoints() - 1, reference)

    # ---- segmentation ---------------------------------------------------------------------------------------

    @staticmethod
    def load_head(path: str | Path) -> Head:
        from .heads import load_head

        if not str(path).strip() or Path(path).is_dir():
            raise BrainDINOError("head", "no head file chosen")
        return load_head(path)

    def segment_with_head(self, head: Head, volume: Volume, progress: Progress | None = None,
                          cancel: Cancel | None = None) -> Volume:
        """The label volume a saved segmentation head predicts, on features with the blocks it reads."""
        from .heads import FeatureSource, segment

        if head.card.task != SEGMENTATION:
            raise BrainDINOError(head.card.kind, f"is a {head.card.task} head; use Predict")
        FeatureSource.for_head(head, self.require_session())  # refuses a head fitted on another encoder
        return segment(head, self.features(volume, tuple(head.card.layers), progress, cancel))

    def painted_labels(self, segmentation_node, reference) -> PaintedLabels:
        if segmentation_node is None:
            raise BrainDINOError("segmentation", "choose the segmentation you painted")
        from . import mrml

        return mrml.painted_labels(segmentation_node, reference)

    def learn_from_painted(self, volume: Volume, painted: PaintedLabels, progress: Progress | None = None,
                           cancel: Cancel | None = None) -> FewShotResult:
        """Fit a head on the painted slices and segment the whole volume (few-shot, as `braindino few-shot`)."""
        from .heads.painted import learn_from_painted

        return learn_from_painted(self.require_session(), volume, painted, progress=progress, cancel=cancel)

    def show_segmentation(self, labels: Volume, reference, classes, node=None, name: str = ""):
        """Labels -> a segmentation node with one named, coloured segment per class."""
        from . import mrml

        return _output(mrml.segmentation_from_labels(labels, reference, [c for c in classes if c.value != 0],
                                                     name=name or f"{reference.GetName()} BrainDINO", node=node))

    # ---- subject predictions ---------------------------------------------------------------------------------

    def predict_subject(self, head: Head, volume: Volume, progress: Progress | None = None,
                        cancel: Cancel | None = None) -> dict:
        if head.card.task == SEGMENTATION:
            raise BrainDINOError(head.card.kind, "is a segmentation head; use the Segment panel")
        from .heads import FeatureSource

        FeatureSource.for_head(head, self.require_session())
        return head.predict(self.features(volume, tuple(head.card.layers), progress, cancel))

    def show_prediction(self, prediction: dict, head_name: str, subject_name: str, table_node=None):
        """Add (or replace) the row of this head and subject in the results table."""
        from . import mrml

        row = {"subject": subject_name, "head": head_name, **flatten(prediction)}
        rows = [] if table_node is None else [
            r for r in mrml.rows_from_table(table_node)
            if (r.get("subject"), r.get("head")) != (subject_name, head_name)]
        return mrml.table_from_rows([*rows, row], scene=self.scene, name="BrainDINO predictions", node=table_node)

    # ---- child processes ---------------------------------------------------------------------------------------

    def start_process(self, command: Sequence[str], on_line: Callable[[str], None] | None = None,
                      on_finished: Callable[[int], None] | None = None,
                      on_progress: Callable[[str, int, int], None] | None = None,
                      env: dict[str, str] | None = None) -> ChildProcess:
        """Run `command` as this Logic's one child process (poll it with `self.process.poll()`)."""
        if self.process is not None and self.process.running:
            raise BrainDINOError(self.process.describe(), "is still running; cancel it or wait for it to finish")

        def finished(code: int) -> None:
            if on_finished:
                on_finished(code)

        self.process = ChildProcess(command, on_line, finished, on_progress, env=env)
        if on_line:
            on_line("$ " + self.process.describe())
        return self.process

    def start_command(self, task: str, arguments: Sequence[str] | str, **callbacks) -> ChildProcess:
        """`braindino <task> <arguments>` (the free-text launcher: pretraining and power users)."""
        return self.start_process(braindino_command(task, arguments), **callbacks)

    def stop_process(self) -> None:
        """Kill the running child process and everything it started."""
        if self.process is not None:
            self.process.kill()

    # ---- fine-tuning heads ----------------------------------------------------------------------------------

    def scene_cases(self) -> list[SceneCase]:
        """The scene's volumes that could be labelled cases (scalar volumes this Logic did not make), each with
        the segmentation drawn on it (the last one whose reference geometry is that volume), if any."""
        def nodes(class_name: str) -> list:
            return [self.scene.GetNthNodeByClass(i, class_name)
                    for i in range(self.scene.GetNumberOfNodesByClass(class_name))]

        drawn_on = {}
        for segmentation in nodes("vtkMRMLSegmentationNode"):
            reference = segmentation.GetNodeReference(
                segmentation.GetReferenceImageGeometryReferenceRole())
            if reference is not None and not segmentation.GetAttribute(OUTPUT_ATTRIBUTE):
                drawn_on[reference.GetID()] = segmentation
        return [SceneCase(volume, drawn_on.get(volume.GetID())) for volume in nodes("vtkMRMLScalarVolumeNode")
                if not volume.IsA("vtkMRMLLabelMapVolumeNode") and not volume.IsA("vtkMRMLVectorVolumeNode")
                and not volume.GetAttribute(OUTPUT_ATTRIBUTE)]

    def collect_cases(self, cases: Sequence[SceneCase], task: str, test_fraction: float = 0.25,
                      seed: int = 0) -> CaseSet:
        """Read labelled scene cases into engine volumes (main thread), checking every one first; "auto"
        splits become train/test with `test_fraction` held out."""
        from . import mrml

        if not cases:
            raise BrainDINOError("cases", "no labelled cases chosen; add volumes (with a segmentation or a target)")
        images, labels, targets, names, class_names = [], [], [], [], []
        for case in cases:
            if case.volume is None:
                raise BrainDINOError("case", "a row has no volume")
            name = case.volume.GetName()
            if case.split not in ("auto", "train", "test"):
                raise BrainDINOError(name, f"split {case.split!r}: use train, test or auto")
            if task == SEGMENTATION:
                if case.segmentation is None:
                    raise BrainDINOError(name, "has no segmentation; choose the segmentation that labels it")
                label_volume, classes = mrml.labels_from_segmentation(case.segmentation, case.volume)
                labels.append(_renumber(label_volume, [c.name for c in classes], class_names))
                targets.append({})
            else:
                labels.append(None)
                targets.append(subject_targets(task, case.target, name))
            images.append(mrml.volume_from_node(case.volume))
            names.append(name)
        strata = [t.get("label", "") for t in targets] if task in ("classification", "knn") else None
        splits = assign_splits([c.split for c in cases], test_fraction, seed, strata)
        if splits.count("train") < 2:
            raise BrainDINOError("cases", f"{splits.count('train')} training case(s): fitting needs at least two "
                                          "(hold out fewer, or add cases)")
        return CaseSet(task, images, labels, targets, splits, names, class_names)

    def fit_arguments(self, manifest: Path, request: FitRequest, head: Path, report: Path,
                      class_names: Path | None = None, training_cases: int | None = None) -> list[str]:
        """The `braindino fit-head` arguments for `request` on the loaded model, device and resolution."""
        session = self.require_session()
        val = request.val_fraction
        if val is None:
            val = 0.0 if training_cases is not None and training_cases < 10 else 0.2
        arguments = ["--task", request.task, "--manifest", str(manifest),
                     "--out", str(head), "--report", str(report), "--epochs", str(request.epochs),
                     "--val-fraction", f"{val:g}", "--seed", str(request.seed), "--model", self.model_source,
                     "--device", str(session.encoder.device), "--precision", session.encoder.precision,
                     *resolution_arguments(session.policy)]
        if request.kind:
            arguments += ["--kind", request.kind]
        if class_names is not None:
            arguments += ["--classes", str(class_names)]
        arguments += ["--no-cache"] if session.cache is None else ["--cache-dir", str(session.cache.root)]
        return arguments

    def start_fit(self, manifest: str | Path, request: FitRequest, folder: str | Path,
                  on_line: Callable[[str], None] | None = None,
                  on_progress: Callable[[str, int, int], None] | None = None,
                  on_finished: Callable[[int], None] | None = None,
                  env: dict[str, str] | None = None) -> FitRun:
        """Fit a head on a manifest's cases in a child process; the head and its report land in `folder`.

        `manifest` may be a CSV file or a folder holding one (as `braindino make-cases` writes)."""
        manifest = find_manifest(manifest)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        head, report = folder / "head.safetensors", folder / "head_report"
        classes = manifest.parent / "classes.txt"
        training = _count_training_rows(manifest)
        arguments = self.fit_arguments(manifest, request, head, report,
                                       classes if request.task == SEGMENTATION and classes.is_file() else None,
                                       training)
        process = self.start_process(braindino_command("fit-head", arguments, progress_lines=True), on_line=on_line,
                                     on_finished=on_finished, on_progress=on_progress, env=env)
        return FitRun(folder, manifest, head, report, process)

    @staticmethod
    def save_head(run: FitRun, path: str | Path) -> Path:
        """Copy a finished fit's head (with its readable card and report) to `path` (a .safetensors file)."""
        from .atomic import atomic_path

        path = Path(path)
        if path.suffix != ".safetensors":
            raise BrainDINOError(path, "a head is saved as a .safetensors file")
        if not run.head.is_file():
            raise BrainDINOError(run.head, "no fitted head to save: the fit did not finish")
        with atomic_path(path) as temporary:
            shutil.copyfile(run.head, temporary)
        card = run.head.with_suffix(".json")
        if card.is_file():
            with atomic_path(path.with_suffix(".json")) as temporary:
                shutil.copyfile(card, temporary)
        return path


def _output(node):
    """Mark a node as made by BrainDINO (so it is never offered as an input case)."""
    node.SetAttribute(OUTPUT_ATTRIBUTE, "1")
    return node


def resolution_arguments(policy: ResolutionPolicy) -> list[str]:
    """The command-line options that reproduce `policy` exactly (so a child process embeds as this session does)."""
    size = ["--image-size", str(policy.image_size)] if policy.image_size else ["--patch-mm", f"{policy.patch_mm:g}"]
    step = [] if policy.slice_step_mm is None else ["--slice-step-mm", f"{policy.slice_step_mm:g}"]
    return [*size, *step, "--upsampling", policy.upsampling, "--shifts", str(policy.shifts)]


def find_manifest(path: str | Path) -> Path:
    """A manifest CSV, or the one CSV of a folder (`cases.csv` where there are several)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise BrainDINOError(path, "no such manifest file or folder")
    if (path / "cases.csv").is_file():
        return path / "cases.csv"
    found = sorted(path.glob("*.csv"))
    if len(found) != 1:
        raise BrainDINOError(path, f"holds {len(found)} CSV files; choose the manifest itself")
    return found[0]


def _count_training_rows(manifest: Path) -> int | None:
    try:
        with manifest.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None  # fit-head says what is wrong with it
    return sum(1 for row in rows if (row.get("split") or "train").strip() != "test")


def _renumber(labels: Volume, names: Sequence[str], class_names: list[str]) -> Volume:
    """Segment n of one case -> the value of its name among all cases' segments (names are added in the order
    first seen), so the same structure has the same label value in every case."""
    import numpy as np

    lookup = np.zeros(len(names) + 1, np.int16)
    for value, name in enumerate(names, 1):
        if name not in class_names:
            class_names.append(name)
        lookup[value] = class_names.index(name) + 1
    return replace(labels, array=lookup[labels.array])


def flatten(prediction: dict, prefix: str = "") -> dict:
    """Nested prediction dicts -> one flat row (e.g. {"probabilities": {"a": .2}} -> {"probabilities.a": .2})."""
    row = {}
    for key, value in prediction.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            row.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            row.update({f"{name}[{i}]": v for i, v in enumerate(value)})
        else:
            row[name] = value.item() if hasattr(value, "item") else value
    return row
