"""The BrainDINO demo: everything the engine shows, on the bundled Colin27 T1, in one run on a CPU.

Steps: load the model -> features of the sample -> PCA colours -> similarity to a named anatomical point
(the left putamen) -> k-means clusters -> few-shot segmentation of the brain's lobes from a handful of
labelled axial slices (labels: the bundled AAL atlas merged into lobes), scored with Dice on the slices it
was not shown -> the PCA and the few-shot Dice again at the old resolution (224 px on every slice), to show
what the physical resolution buys -> the volumes and one report picture in the output folder. Each step is
timed.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atlas import AAL_TABLE, COLIN27_AAL, COLIN27_T1, merge_aal_into_lobes
from .atomic import write_text_atomic
from .cache import FeatureCache
from .errors import BrainDINOError
from .features import VolumeFeatures
from .heads import FewShotResult, few_shot_segment
from .heads.metrics import dice_per_class
from .map_defaults import MAP_DEFAULTS
from .maps import SimilarityIndex, cluster_map, pca_map
from .montage import OverlayStyle, Panel, save_report
from .resolution import LEGACY, ResolutionPolicy
from .session import FeatureSession
from .volume import Volume, ras_to_lps, read_volume, write_volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedPoint:
    """An anatomical landmark: what it is and where (RAS mm, Slicer's convention)."""

    name: str
    ras: tuple[float, float, float]

    @property
    def lps(self) -> np.ndarray:
        return ras_to_lps(self.ras)


# Inside AAL's Putamen_L on Colin27 (MNI space): 85% of the 7x7x7 mm cube around it is putamen.
LEFT_PUTAMEN = NamedPoint("left putamen", (-26.0, 2.0, 2.0))

@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on. The defaults are the bundled sample and model; tests shrink them."""

    volume: Path = COLIN27_T1
    atlas: Path = COLIN27_AAL
    atlas_table: Path = AAL_TABLE
    model: str | Path = "demo"
    device: str | None = "cpu"
    policy: ResolutionPolicy | None = None  # None: the device's default resolution
    precision: str = "auto"  # inference.py: int8 on an x86 CPU, bf16 on CUDA; "fp32" for the reference
    batch_size: int | None = None
    point: NamedPoint = LEFT_PUTAMEN
    clusters: int = MAP_DEFAULTS.clusters
    labelled_slices: int = 5
    compare_with: ResolutionPolicy | None = LEGACY  # also run PCA and few-shot at this resolution, to compare


@dataclass
class DemoResult:
    outputs: dict[str, Path] = field(default_factory=dict)  # what -> file
    seconds: dict[str, float] = field(default_factory=dict)  # step -> wall-clock seconds
    dice: dict[str, float] = field(default_factory=dict)  # lobe -> Dice on the slices the head was not shown
    dice_compared: dict[str, float] = field(default_factory=dict)  # the same at `compare_with`'s resolution


def spread_slices(labels: np.ndarray, count: int) -> list[int]:
    """`count` axial slices evenly spread over the middle 80% of the labelled extent."""
    present = np.flatnonzero(labels.any(axis=(1, 2)))
    low, high = present[0], present[-1]
    positions = np.linspace(low + 0.1 * (high - low), high - 0.1 * (high - low), count)
    return sorted({int(round(p)) for p in positions})


def lobe_few_shot(features: VolumeFeatures, lobes: np.ndarray, names: list[str], count: int,
                  layers: Sequence[int]) -> tuple[FewShotResult, list[int], dict[str, float]]:
    """Few-shot lobe segmentation from `count` labelled axial slices (`spread_slices`), and the Dice of each lobe
    on every slice it was not shown: (result, labelled slices, {lobe: Dice})."""
    shown = spread_slices(lobes, count)
    result = few_shot_segment(features, lobes, shown, class_names=names, layers=layers)
    unseen = np.setdiff1d(np.arange(lobes.shape[0]), shown)
    predicted = np.rint(result.labels.array[unseen]).astype(np.int64)
    dice = dice_per_class(predicted, lobes[unseen], range(1, len(names)))
    return result, shown, {names[value]: score for value, score in dice.items()}


def read_lobes(config: DemoConfig, volume: Volume) -> tuple[np.ndarray, list[str]]:
    """The atlas merged into lobe labels on the volume's grid, and the lobe names by label value."""
    atlas = read_volume(config.atlas)
    if atlas.geometry != volume.geometry:
        raise BrainDINOError(config.atlas, f"is not on the grid of {config.volume}")
    return merge_aal_into_lobes(np.rint(atlas.array).astype(np.int64), config.atlas_table)


def run_demo(out: str | Path, config: DemoConfig = DemoConfig(), cache: FeatureCache | None = None,
             on_step: Callable[[str, float], None] | None = None) -> DemoResult:
    """Run every step of the demo, writing into the folder `out`; `on_step(name, seconds)` after each."""
    out = Path(out)
    result = DemoResult()

    @contextmanager
    def step(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        result.seconds[name] = time.perf_counter() - started
        log.info("%s: %.1f s", name, result.seconds[name])
        if on_step:
            on_step(name, result.seconds[name])

    def write(what: str, volume: Volume, name: str) -> Volume:
        result.outputs[what] = write_volume(volume, out / name)
        return volume

    with step("load model and sample"):
        session = FeatureSession.open(config.model, config.device, config.policy, cache, config.batch_size,
                                      config.precision)
        volume = read_volume(config.volume)
        lobes, names = read_lobes(config, volume)
    with step("features"):
        features = session.features(volume, session.segmentation_layers)
    with step("PCA map"):
        pca = write("PCA colours (RGB)", pca_map(features).rgb, "pca_rgb.nii.gz")
    point_slug = config.point.name.replace(" ", "_")
    with step(f"similarity to the {config.point.name}"):
        similarity = write(f"similarity to the {config.point.name}", SimilarityIndex(features).map(config.point.lps),
                           f"similarity_{point_slug}.nii.gz")
    with step("cluster map"):
        clusters = write(f"{config.clusters} feature clusters", cluster_map(features, k=config.clusters),
                         "clusters.nii.gz")
    with step("few-shot lobe segmentation"):
        segmentation, shown, result.dice = lobe_few_shot(features, lobes, names, config.labelled_slices,
                                                         session.segmentation_layers)
        labels = write(f"lobes from {len(shown)} labelled slices", segmentation.labels, "fewshot_lobes.nii.gz")
        table = "\n".join(f"{value} {name}" for value, name in enumerate(names)) + "\n"
        write_text_atomic(out / "fewshot_lobes.txt", table)
        result.outputs["lobe names"] = out / "fewshot_lobes.txt"
    if config.compare_with is not None:
        with step("PCA and few-shot at the old resolution"):
            old = FeatureSession.for_encoder(session.encoder, config.compare_with, cache, config.batch_size)
            old_features = old.features(volume, old.segmentation_layers)
            old_pca = pca_map(old_features).rgb
            _, _, result.dice_compared = lobe_few_shot(old_features, lobes, names, config.labelled_slices,
                                                       old.segmentation_layers)
    with step("report picture"):
        head = features.foreground
        lobe_names = dict(enumerate(names))
        panels = [
            Panel(f"{Path(config.volume).name}: + = {config.point.name}", None),
            Panel(f"PCA of the features (RGB = components 1-3): {session.policy.describe()}", pca,
                  OverlayStyle("rgb", alpha=0.8), head),
            Panel(f"cosine similarity to the {config.point.name}", similarity,
                  OverlayStyle("scalar", cmap="inferno", vmax=1.0, label="similarity"), head),
            Panel(f"{config.clusters} k-means clusters", clusters, OverlayStyle("labels", alpha=0.5)),
            Panel(f"few-shot lobes ({len(shown)} labelled slices)", labels,
                  OverlayStyle("labels", alpha=0.5, names={k: v for k, v in lobe_names.items() if k})),
        ]
        if config.compare_with is not None:
            panels.insert(2, Panel(f"the same at the old resolution: {config.compare_with.describe()}", old_pca,
                                   OverlayStyle("rgb", alpha=0.8), head))
        title = f"BrainDINO demo: {session.describe()}"
        result.outputs["report picture"] = save_report(volume, panels, out / "report.png", config.point.lps, title)
    return result
