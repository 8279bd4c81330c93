"""The server side of the BrainDINO page: one volume in a trame-slicer scene, its features, maps and segmentations.

Every computation is a call into the Slicer module's Qt-free Logic (`BrainDINOLogic`), run on its worker thread
through `PageJobs`; every node is made by the Logic's `show*` methods (the engine's MRML adapter), on the event
loop. The page's state (trame's `state`) is what the side panel shows; `ui.build_page` lays it out.

Files: volumes, checkpoints, heads and label files are chosen by name from the data folder (`DataFolder`), or
the bundled sample; outputs go into the output folder (`OutputFolder`). A mistake (a broken file, a click
outside the volume, a head for another model) is shown in the page as the engine's one-line message; the server
goes on serving.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from .. import mrml
from ..errors import BrainDINOError, CancelledError
from ..logic import flatten
from ..map_defaults import MAP_DEFAULTS
from ..resolution import PRESETS, default_policy
from ..volume import Volume, ras_to_lps, read_label_volume, read_volume
from .config import ServeConfig
from .jobs import PageJobs
from .outputs import save_outputs
from .safety import DataFolder, OutputFolder
from .views import SliceViews

log = logging.getLogger(__name__)

SAMPLE_NAME = "sample: Colin27 T1 (bundled)"
AS_STARTED = "as started"  # the resolution the command line asked for
FOREGROUNDS = {"pca": "PCA colours", "similarity": "similarity", "attention": "attention"}
# A click's similarity is shown on the views' planes first; the whole volume's follows this long after, so its work
# does not compete with the drawing of those planes (on a 2-core CPU, started at once, it did).
WHOLE_MAP_DELAY_S = 1.0


def rss_mib() -> int:
    return round(psutil.Process().memory_info().rss / 2**20)


def open_model(logic, source: str, device: str | None, policy_for: Callable[[str], object],
               batch_size: int | None, precision: str = "auto") -> None:
    """Load `source` into the Logic with the resolution `policy_for(device type)` and `serve --batch-size`.

    A web-side adapter: the Logic's `load_model` takes one fixed policy (or the device's default), but the page's
    resolution follows the device the model lands on (auto by default), which is known only once it is loaded;
    so the Logic loads the encoder and its session is re-made on that encoder with the page's policy."""
    from ..session import FeatureSession

    encoder = logic.load_model(source, device or "auto", precision=precision)
    logic.session = FeatureSession.for_encoder(encoder, policy_for(encoder.device.type), logic.session.cache,
                                               batch_size)


def peak_voxel(values: Volume) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(values.array)), values.array.shape))


class BrainDINOPage:
    """State and actions of the page, on the Logic; `views` are the slice views, `state` trame's page state."""

    def __init__(self, server, slicer_app, logic, job_type: type, config: ServeConfig):
        self.server, self.state, self.slicer_app, self.logic, self.config = server, server.state, slicer_app, \
            logic, config
        self.data = DataFolder(config.data)
        self.out = OutputFolder(config.out)
        self.jobs = PageJobs(logic.worker, job_type, self._show_progress)
        self.views = SliceViews(slicer_app, server, self.on_click)
        self.volume: Volume | None = None  # the engine's view of the loaded volume
        self.node = None  # its volume node
        self.nodes: dict[str, Any] = {}  # overlay nodes by name (pca, similarity, attention, clusters, ...)
        # What "Save" writes: maps and label volumes by name (or a function that computes one not complete yet).
        self.maps: dict[str, Volume | Callable[[], Volume]] = {}
        self.classes: dict[str, tuple] = {}  # class tables of the label volumes in `maps`
        self.point_lps: np.ndarray | None = None  # the last similarity point
        self._model_key: tuple | None = None  # (model, resolution) the Logic's session was opened with
        self._wanted_point: tuple[str, np.ndarray] | None = None  # (view, RAS) of the newest click not mapped yet
        self._whole_similarity: np.ndarray | None = None  # LPS point whose whole-volume map should follow
        self._whole_timer: asyncio.TimerHandle | None = None
        self._similarity_running = False

        files = self.data.model_files()
        self.state.update({
            "volumes": [SAMPLE_NAME, *self.data.volumes()], "volume_name": None,
            "models": list(dict.fromkeys([config.model, "demo", *files])), "model_name": config.model,
            "resolutions": [AS_STARTED, *PRESETS], "resolution": AS_STARTED,
            "heads": files, "head_name": None, "label_files": self.data.volumes(), "labels_name": None,
            "busy": False, "progress": 0, "status": "", "error": "", "model_info": "",
            "overlays": [], "overlay": None, "opacity": 0.5, "clusters": MAP_DEFAULTS.clusters,
            "clusters_visible": True,
            "click_report": "", "brush": "off", "brush_status": "", "painted_status": "", "brush_mm": 8.0,
            "structure": "", "structures": [],
            "predictions": [], "prediction_columns": [], "saved": "", "memory_mib": rss_mib(),
        })
        for name, handler in {"volume_name": self._on_volume_name, "overlay": self._on_overlay,
                              "opacity": self._on_opacity, "clusters_visible": self._on_clusters_visible,
                              "brush": self._on_brush, "brush_mm": self._on_brush}.items():
            self.state.change(name)(handler)
        for name in ("compute", "cancel", "show_pca", "show_attention", "show_clusters", "add_structure",
                     "load_labels", "learn", "apply_head", "save"):
            self.server.controller[name] = self._guarded(getattr(self, name))

    # ---- plumbing ------------------------------------------------------------------------------------------

    def _guarded(self, action: Callable[[], None]) -> Callable[..., None]:
        """A button handler that shows a mistake in the page instead of raising into the server."""
        def handler(*_args, **_kwargs) -> None:
            try:
                action()
            except Exception as error:  # noqa: BLE001  whatever goes wrong, the server keeps serving
                self._fail(error)
        return handler

    def _fail(self, error: BaseException) -> None:
        if isinstance(error, CancelledError):
            message, status = "", "cancelled"
        elif isinstance(error, BrainDINOError):
            message, status = self._relative(str(error)), "stopped"
        else:
            log.exception("page action failed", exc_info=error)
            message, status = f"{type(error).__name__}: {self._relative(str(error))}", "failed"
        with self.state:
            self.state.error, self.state.status, self.state.busy = message, status, self.jobs.busy
            self.state.memory_mib = rss_mib()

    def _relative(self, message: str) -> str:
        """Messages name files relative to the data and output folders: the page need not know where they are."""
        return message.replace(f"{self.data.root}/", "").replace(f"{self.out.root}/", "")

    def _show_progress(self, label: str, done: int, total: int) -> None:
        with self.state:
            self.state.progress = round(100.0 * done / total, 1) if total else 0
            self.state.status = f"{label}: {done}/{total}" if total else f"{label}..."

    def _run(self, label: str, work, on_done: Callable[[Any], None],
             on_error: Callable[[BaseException], None] | None = None) -> None:
        """Run `work(progress, cancel)` on the Logic's worker; `on_done(result)` (or `on_error(error)`, by default:
        show it) on the event loop."""
        def done(result) -> None:
            try:
                on_done(result)
            except Exception as error:  # noqa: BLE001
                self._fail(error)
                return
            with self.state:
                self.state.busy, self.state.memory_mib = self.jobs.busy, rss_mib()

        with self.state:
            self.state.busy, self.state.error, self.state.progress, self.state.status = True, "", 0, f"{label}..."
        self.jobs.run(label, work, done, on_error or self._fail)

    def _finish(self, status: str) -> None:
        with self.state:
            self.state.status, self.state.progress = status, 100

    def _require_volume(self) -> Volume:
        if self.volume is None:
            raise BrainDINOError("volume", "no volume loaded; choose one in the list")
        return self.volume

    def _path(self, name: str) -> Path:
        return self.config.sample if name == SAMPLE_NAME else self.data.resolve(name)

    # ---- volume --------------------------------------------------------------------------------------------

    def _on_volume_name(self, volume_name, **_) -> None:
        if volume_name:
            asyncio.get_event_loop().create_task(self._load_volume(volume_name))

    async def _load_volume(self, name: str) -> None:
        """Read the file off the event loop (a big volume takes seconds), then build its node on it."""
        try:
            path = self._path(name)
            self._show_progress(f"reading {name}", 0, 0)
            volume = await asyncio.to_thread(read_volume, path)
            self._replace_volume(volume, path.name)
        except Exception as error:  # noqa: BLE001  a bad file is a message, never a dead server
            self._fail(error)
            return
        with self.state:
            self.state.error, self.state.progress = "", 0
            self.state.status = f"loaded {name}: {volume.shape[2]} x {volume.shape[1]} x {volume.shape[0]} voxels"
            self.state.memory_mib = rss_mib()

    def _replace_volume(self, volume: Volume, name: str) -> None:
        scene = self.slicer_app.scene
        for node in [self.node, *self.nodes.values()]:
            if node is not None:
                scene.RemoveNode(node)
        self.nodes, self.maps, self.classes, self.point_lps = {}, {}, {}, None
        self._wanted_point = self._whole_similarity = None
        self.volume = volume
        self.node = mrml.volume_to_node(volume, scene=scene, name=name)
        self.slicer_app.display_manager.show_volume_in_slice_background(self.node)
        self.slicer_app.display_manager.show_volume_in_slice_foreground(None)
        self.views.fit_to_content()
        with self.state:
            self.state.overlays, self.state.overlay, self.state.click_report = [], None, ""
            self.state.structures, self.state.predictions, self.state.brush = [], [], "off"

    # ---- model and features --------------------------------------------------------------------------------

    def _policy(self, device_type: str):
        chosen = self.state.resolution
        if chosen != AS_STARTED:
            return PRESETS[chosen]
        return self.config.policy(device_type) if self.config.policy else default_policy(device_type)

    def _with_features(self, label: str, layers_for: Callable[[], tuple[int, ...]], then,
                       on_done: Callable[[Any], None], on_error: Callable[[BaseException], None] | None = None) -> None:
        """Load the chosen model if needed, get the features (memory, cache or encoder), run `then(features,
        progress, cancel)` on the worker, and hand its result to `on_done` on the event loop."""
        volume = self._require_volume()
        model, resolution = self.state.model_name, self.state.resolution
        source = model if model == "demo" or model == self.config.model else str(self.data.resolve(model))

        def work(progress, cancel):
            if self._model_key != (source, resolution):
                open_model(self.logic, source, self.config.device, self._policy, self.config.batch_size,
                           self.config.precision)
                self._model_key = (source, resolution)
            return then(self.logic.features(volume, layers_for(), progress, cancel), progress, cancel)

        def done(result) -> None:
            self.state.model_info = self.logic.describe_model()
            on_done(result)
        self._run(label, work, done, on_error)

    def compute(self) -> None:
        """Features with the blocks segmentation needs too (so every later action reuses them), then PCA."""
        started = time.perf_counter()

        def show(result) -> None:
            features, rgb = result
            self._show_map("pca", rgb)
            self._finish(f"features of {features.num_slices} slices in {time.perf_counter() - started:.1f} s; "
                         "PCA colours shown")
        self._with_features("features", self.logic.segmentation_layers,
                            lambda features, progress, cancel: (features, self.logic.pca_map(features)), show)

    def cancel(self) -> None:
        self.jobs.cancel()

    # ---- maps ----------------------------------------------------------------------------------------------

    def show_pca(self) -> None:
        self._with_features("PCA colours", tuple, lambda features, *_: self.logic.pca_map(features),
                            lambda rgb: (self._show_map("pca", rgb), self._finish("PCA colours shown")))

    def show_attention(self) -> None:
        """Last-block attention (its own forward passes: progress and cancel as for the features)."""
        volume = self._require_volume()
        self._with_features("attention", tuple,
                            lambda features, progress, cancel: self.logic.attention_map(volume, progress, cancel),
                            lambda attention: (self._show_map("attention", attention), self._finish("attention shown")))

    def show_clusters(self) -> None:
        count = int(self.state.clusters)
        self._with_features(f"{count} clusters", tuple, lambda features, *_: self.logic.cluster_map(features, count),
                            lambda clusters: (self._show_map("clusters", clusters),
                                              self._finish(f"{count} clusters shown")))

    def _show_map(self, name: str, values: Volume) -> None:
        """Show a map through the Logic (foreground: PCA, similarity, attention; label layer: clusters)."""
        show = {"pca": self.logic.show_pca, "similarity": self.logic.show_similarity,
                "attention": self.logic.show_attention}.get(name)
        if show is None:
            self.nodes[name] = self.logic.show_clusters(values, self.node, self.nodes.get(name))
            self._on_clusters_visible(True)
        else:
            self.nodes[name] = show(values, self.node, self.nodes.get(name), float(self.state.opacity))
        self.maps[name] = values
        with self.state:
            self.state.clusters_visible = self.state.clusters_visible or name == "clusters"
            if name in FOREGROUNDS:
                self.state.overlays = [{"title": t, "value": k} for k, t in FOREGROUNDS.items() if k in self.nodes]
                self.state.overlay = name

    def _on_overlay(self, overlay, **_) -> None:
        node = self.nodes.get(overlay)
        if node is not None:
            mrml.show_in_slice_views(self.slicer_app.scene, foreground=node)

    def _on_opacity(self, opacity, **_) -> None:
        mrml.set_foreground_opacity(self.slicer_app.scene, float(opacity))

    def _on_clusters_visible(self, clusters_visible, **_) -> None:
        for composite in self.slicer_app.scene.GetNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetLabelOpacity(0.5 if clusters_visible else 0.0)

    # ---- similarity to a clicked point ---------------------------------------------------------------------

    def on_click(self, view: str, ras: np.ndarray) -> None:
        """A click in any view (not while painting) sets the similarity point. Clicks that arrive while a map is
        computed are collapsed into the latest, so the picture never lags behind a burst of clicks."""
        if self.volume is None or self.state.brush != "off":
            return
        if "pca" not in self.maps and "similarity" not in self.maps:
            self.state.click_report = "compute features first; then a click shows the similarity to that point"
            return
        self._wanted_point = (view, ras)
        if not self._similarity_running:
            self._next_similarity()

    def _next_similarity(self) -> None:
        """The newest clicked point's similarity on the planes the views show, at once; the whole volume's (for
        scrolling and saving) once the views have drawn the planes, unless another click came meanwhile."""
        if self._wanted_point is not None:
            (view, ras), self._wanted_point = self._wanted_point, None
            self._similarity_on_planes(view, ras)
            return
        self._similarity_running = False
        if self._whole_similarity is not None:
            if self._whole_timer is not None:
                self._whole_timer.cancel()
            self._whole_timer = asyncio.get_running_loop().call_later(WHOLE_MAP_DELAY_S, self._similarity_everywhere)

    def _similarity_on_planes(self, view: str, ras: np.ndarray) -> None:
        self._similarity_running = True
        lps = ras_to_lps(ras)
        clicked = time.perf_counter()
        planes = self.views.displayed_planes(self._require_volume().geometry)

        def then(features, progress, cancel):
            started = time.perf_counter()
            similarity = self.logic.similarity_map(features, lps) if planes is None else \
                self.logic.similarity_planes(features, lps, planes)
            return similarity, time.perf_counter() - started, features

        def show(result) -> None:
            similarity, seconds, features = result
            shown = time.perf_counter()
            self._show_map("similarity", similarity)
            if planes is not None:  # until the whole map follows, Save computes it
                self.maps["similarity"] = partial(self.logic.similarity_map, features, lps)
                self._whole_similarity = lps
            self.point_lps = lps
            from ..maps.similarity import voxel_of_point
            seed = voxel_of_point(similarity.geometry, lps)
            peak = peak_voxel(similarity)
            self.state.click_report = (
                f"{view} click at RAS ({', '.join(f'{v:.3f}' for v in ras)}) = voxel {seed}: similarity "
                f"{float(similarity.array[seed]):.3f} there, highest {float(similarity.array[peak]):.3f} "
                f"at voxel {peak}{'' if planes is None else ' of the planes shown'}; "
                f"map {seconds:.3f} s, shown {time.perf_counter() - shown:.3f} s, "
                f"total {time.perf_counter() - clicked:.3f} s")
            self._finish("similarity shown")
            self._next_similarity()
        self._similarity_job("similarity", then, show)

    def _similarity_everywhere(self) -> None:
        """The whole volume's map of the last point; given up as soon as another click waits."""
        self._whole_timer = None
        if self._similarity_running or self._whole_similarity is None:
            return
        lps, self._whole_similarity = self._whole_similarity, None
        self._similarity_running = True
        started = time.perf_counter()

        def then(features, progress, cancel):
            return self.logic.similarity_map(features, lps, cancel=lambda: cancel() or self._wanted_point is not None)

        def show(similarity: Volume) -> None:
            self._show_map("similarity", similarity)
            if self.state.status.startswith(label):  # background work: never overwrite what another action said
                self._finish(f"similarity of the whole volume shown in {time.perf_counter() - started:.1f} s")
            self._next_similarity()
        label = "similarity of the whole volume"
        self._similarity_job(label, then, show)

    def _similarity_job(self, label: str, then, show: Callable[[Any], None]) -> None:
        def failed(error: BaseException) -> None:
            if isinstance(error, CancelledError) and self._wanted_point is not None:
                self._next_similarity()  # a newer click stopped it: map that one
                return
            self._similarity_running = False
            self._fail(error)
        try:
            self._with_features(label, tuple, then, show, failed)
        except BrainDINOError as error:
            failed(error)

    # ---- few-shot segmentation from painted slices ---------------------------------------------------------

    def _painted(self):
        """The segmentation the user paints in (made on first use, with one structure), active in the editor."""
        editor = self.slicer_app.segmentation_editor
        node = self.nodes.get("painted")
        if node is None:
            node = editor.create_empty_segmentation_node()
            node.SetName(f"{self.node.GetName()} painted")
            self.nodes["painted"] = node
            editor.set_active_segmentation(node, self.node)
            self._add_segment(self.state.structure or "structure 1")
            from slicer import vtkSegmentation

            node.GetSegmentation().AddObserver(vtkSegmentation.SourceRepresentationModified,
                                               lambda *_: self._show_painted())
        return node

    def _show_painted(self) -> None:
        """Say which axial slices hold paint, after each stroke the server applied (a stroke's mouse events and
        the page's buttons travel on different channels: this is what tells that a stroke has landed)."""
        try:
            painted = self.logic.painted_labels(self.nodes.get("painted"), self.node)
            self.state.painted_status = f"painted axial slices {', '.join(map(str, painted.slice_indices))}"
        except BrainDINOError:
            self.state.painted_status = "nothing painted"
        self.state.flush()

    def _add_segment(self, name: str) -> None:
        editor = self.slicer_app.segmentation_editor
        editor.add_empty_segment(segment_name=name)
        with self.state:
            self.state.structures = editor.get_segment_names()
            self.state.structure = ""

    def add_structure(self) -> None:
        """A new structure (segment) to paint; painting continues in it."""
        self._require_volume()
        painted_exists = "painted" in self.nodes
        self._painted()
        if painted_exists:
            self._add_segment(self.state.structure or f"structure {len(self.state.structures) + 1}")

    def _on_brush(self, brush, brush_mm, **_) -> None:
        """"paint" or "erase" with trame-slicer's segment editor brush (its diameter in mm), "off" to click."""
        from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectPaint
        from trame_slicer.segmentation.paint_effect_parameters import BrushDiameterMode

        editor = self.slicer_app.segmentation_editor
        if brush == "off" or self.volume is None:
            editor.deactivate_effect()
            self.state.brush_status = ""
            return
        self._painted()
        effect = editor.set_active_effect_type(SegmentationEffectPaint if brush == "paint" else SegmentationEffectErase)
        effect.set_brush_diameter(float(brush_mm), BrushDiameterMode.Absolute)
        # Said once the brush is active: a stroke sent before would arrive as clicks (mouse events and state
        # changes travel on different channels).
        self.state.brush_status = f"{'painting' if brush == 'paint' else 'erasing'} with a {float(brush_mm):g} mm brush"

    def load_labels(self) -> None:
        """A label file from the data folder (a few painted axial slices, `braindino few-shot --labels`) into the
        painted segmentation, where it can be edited before learning."""
        volume = self._require_volume()
        name = self.state.labels_name
        if not name:
            raise BrainDINOError("labels", "choose a label file in the list first")
        from ..heads.painted import find_label_table, painted_labels, read_label_table

        path = self._path(name)
        labels = read_label_volume(path)
        table = find_label_table(path)
        painted = painted_labels(labels, read_label_table(table) if table else (), source=name)
        if labels.geometry != volume.geometry:
            raise BrainDINOError(name, "is not on the grid of the loaded volume")
        self.state.brush = "off"
        node = self._painted()
        self.logic.show_segmentation(painted.labels, self.node, painted.classes, node, name=node.GetName())
        self.slicer_app.segmentation_editor.set_active_segmentation(node, self.node)
        with self.state:
            self.state.structures = self.slicer_app.segmentation_editor.get_segment_names()
            self.state.status = (f"{name}: {', '.join(painted.class_names)} on axial slices "
                                 f"{', '.join(map(str, painted.slice_indices))}")

    def learn(self) -> None:
        """Fit a head on the painted slices and segment the whole volume (the Logic's paint-and-learn path)."""
        volume = self._require_volume()
        self.state.brush = "off"
        painted = self.logic.painted_labels(self.nodes.get("painted"), self.node)
        started = time.perf_counter()

        def show(result) -> None:
            self._show_segmentation("few-shot", result.labels, painted.classes)
            self._finish(f"few-shot: {', '.join(painted.class_names)} learned from axial slices "
                         f"{', '.join(map(str, painted.slice_indices))} in {time.perf_counter() - started:.1f} s")
        self._with_features(f"learning from {len(painted.slice_indices)} slices", tuple,
                            lambda features, progress, cancel: self.logic.learn_from_painted(volume, painted, progress,
                                                                                             cancel), show)

    def _show_segmentation(self, name: str, labels: Volume, classes) -> None:
        self.nodes[name] = self.logic.show_segmentation(labels, self.node, classes, self.nodes.get(name),
                                                       name=f"{self.node.GetName()} {name}")
        self.maps[name], self.classes[name] = labels, tuple(classes)

    # ---- fitted heads --------------------------------------------------------------------------------------

    def apply_head(self) -> None:
        """A segmentation head gives a segmentation overlay; a subject head adds a row to the predictions."""
        volume = self._require_volume()
        name = self.state.head_name
        if not name:
            raise BrainDINOError("head", "choose a head file in the list first")
        head = self.logic.load_head(self.data.resolve(name))
        if head.card.task == "segmentation":
            self._with_features(f"segmenting with {name}", lambda: tuple(head.card.layers),
                                lambda features, progress, cancel: self.logic.segment_with_head(head, volume, progress,
                                                                                              cancel),
                                lambda labels: (self._show_segmentation("head", labels, head.card.classes),
                                                self._finish(f"segmented with {name}")))
            return

        def show(prediction: dict) -> None:
            row = {"volume": self.node.GetName(), "head": name, **flatten(prediction)}
            rows = [r for r in self.state.predictions if (r["volume"], r["head"]) != (row["volume"], name)] + [row]
            columns = list(dict.fromkeys(key for r in rows for key in r))
            with self.state:
                self.state.predictions = [{key: _cell(r.get(key)) for key in columns} for r in rows]
                self.state.prediction_columns = [{"title": key, "key": key} for key in columns]
            self._finish(f"predicted with {name}")
        self._with_features(f"predicting with {name}", lambda: tuple(head.card.layers),
                            lambda features, progress, cancel: self.logic.predict_subject(head, volume, progress,
                                                                                         cancel), show)

    # ---- saving --------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write every map and segmentation, the predictions and a report picture into the output folder."""
        volume = self._require_volume()
        if not self.maps and not self.state.predictions:
            raise BrainDINOError("save", "nothing to save yet; compute features or a map first")
        stem = self.node.GetName().split(".")[0]
        point = self.point_lps if self.point_lps is not None else volume.geometry.index_to_lps(
            (np.array(volume.shape) - 1)[None] / 2.0)[0]
        maps, classes, predictions = dict(self.maps), dict(self.classes), list(self.state.predictions)
        self._whole_similarity = None  # Save maps the whole volume itself, and the views then show that map
        title = f"BrainDINO: {self.state.model_info}"

        def work(progress, cancel) -> tuple[list[Path], dict[str, Volume]]:
            complete = {name: values() if callable(values) else values for name, values in maps.items()}
            return save_outputs(self.out, stem, volume, complete, classes, predictions, point, title), complete

        def show(result: tuple[list[Path], dict[str, Volume]]) -> None:
            written, complete = result
            for name, values in maps.items():
                if callable(values) and self.maps.get(name) is values:  # no newer click replaced it meanwhile
                    self._show_map(name, complete[name])
            self.state.saved = ", ".join(path.name for path in written)
            self._finish(f"saved {len(written)} files into the output folder")
        self._run("saving", work, show)


def _cell(value):
    """A table cell for the page: numbers rounded for reading, everything else as text."""
    if isinstance(value, float):
        return round(value, 4)
    return value if isinstance(value, (int, str)) or value is None else str(value)
