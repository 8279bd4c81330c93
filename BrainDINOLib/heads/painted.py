"""Few-shot segmentation from painted slices: the path shared by `braindino few-shot` and Slicer's paint-and-learn.

A user paints a few axial slices of the volume at hand (a label volume on its grid, or a Slicer segmentation);
every slice holding any painted voxel is a labelled slice, on which unpainted voxels are background; every
other slice is predicted. Class names and colours come with the labels: from the segments in Slicer, or from
a label table beside a label file (`read_label_table`).
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BrainDINOError
from ..session import FeatureSession
from ..volume import READABLE_SUFFIXES, Volume
from .card import ClassInfo, default_colour
from .fewshot import FewShotResult, few_shot_segment

TABLE_SUFFIXES = (".txt", ".ctbl", ".label")


@dataclass(frozen=True)
class PaintedLabels:
    """A partially painted label volume read back for few-shot learning.

    `labels` is an integer `Volume` on the painted volume's canonical grid (0 = background); `slice_indices`
    are the axial slices (k) holding any painted voxel; `classes` name and colour the painted values.
    """

    labels: Volume
    slice_indices: tuple[int, ...]
    classes: tuple[ClassInfo, ...]

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]


def painted_labels(labels: Volume, classes: Sequence[ClassInfo] = (), source: str | Path = "labels") -> PaintedLabels:
    """Find the painted slices of a label volume and name its values (`classes` by value; missing values get
    `label <v>`). Refuses labels that are not non-negative integers, hold no painted slice or one class only."""
    array = labels.array
    if not np.issubdtype(array.dtype, np.integer):
        raise BrainDINOError(source, "is not a label volume (its values are not whole numbers)")
    if array.min() < 0:
        raise BrainDINOError(source, f"holds negative label values ({int(array.min())}); labels are 0 (background), "
                                     "1, 2, ...")
    painted = np.flatnonzero(array.reshape(array.shape[0], -1).any(axis=1))
    if not len(painted):
        raise BrainDINOError(source, "has no painted voxels: paint the structures on a few axial slices first")
    present = np.unique(array[painted]).tolist()
    if len(present) < 2:
        raise BrainDINOError(source, f"its painted slices hold a single class ({present[0]}): paint at least one "
                                     "structure and leave some background")
    values = [v for v in present if v != 0]
    if len(painted) == array.shape[0]:
        raise BrainDINOError(source, "is painted on every axial slice: leave the slices to predict empty")
    by_value = {c.value: c for c in classes}
    named = tuple(by_value.get(v, ClassInfo(v, f"label {v}", default_colour(v))) for v in values)
    return PaintedLabels(labels, tuple(int(k) for k in painted), named)


def check_painted_grid(labels: Volume, volume: Volume, source: str | Path | None = None) -> None:
    """Refuse painted labels (read from `source`) that are not on the grid of `volume`: size, spacing, origin and
    direction must all be the same."""
    if labels.shape != volume.shape or labels.geometry != volume.geometry:
        raise BrainDINOError(source or labels.source or "labels",
                             f"is not on the grid of {volume.source or 'the volume'} (size {labels.geometry.size} vs "
                             f"{volume.geometry.size}, or spacing, origin or direction differ)")


def learn_from_painted(session: FeatureSession, volume: Volume, painted: PaintedLabels, kind: str = "mlp",
                       cleanup: bool = False, progress: Callable[[int, int], None] | None = None,
                       cancel: Callable[[], bool] | None = None) -> FewShotResult:
    """Fit a few-shot head on the painted slices (the session's segmentation blocks) and segment `volume`."""
    check_painted_grid(painted.labels, volume)
    layers = session.segmentation_layers
    features = session.features(volume, layers, progress=progress, cancel=cancel)
    names = ["background", *painted.class_names]  # in label-value order, as the classes
    colours = {c.value: c.colour for c in painted.classes}
    return few_shot_segment(features, painted.labels.array, painted.slice_indices, class_names=names,
                            progress=progress, cancel=cancel, kind=kind, cleanup=cleanup, layers=layers,
                            colours=colours)


def find_label_table(labels_path: str | Path) -> Path | None:
    """The label table beside a label file: `<name>.txt`, `.ctbl` or `.label` (name without the image suffix)."""
    path = Path(labels_path)
    stem = next((path.name[:-len(s)] for s in READABLE_SUFFIXES if path.name.endswith(s)), path.stem)
    return next((t for s in TABLE_SUFFIXES if (t := path.with_name(stem + s)).is_file()), None)


def read_label_table(path: str | Path) -> tuple[ClassInfo, ...]:
    """Label values, names and colours from a text table, one label a line (`#` comments, blank lines skipped):

    - `value name` (a BrainDINO `.txt`, as `braindino few-shot` writes; names may hold spaces);
    - `value name R G B A` (a Slicer colour table, `.ctbl` / `.txt`);
    - `value R G B A visible mesh "name"` (an ITK-SNAP label description).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BrainDINOError(path, f"cannot read the label table ({error})") from None
    classes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            classes.append(_table_line(line))
        except ValueError:
            raise BrainDINOError(f"{path}, line {number}", f"is not a label line ({line.strip()[:60]!r}); expected "
                                                           "'value name', 'value name R G B A' or an ITK-SNAP "
                                                           "label line") from None
    return tuple(c for c in classes if c.value != 0)


def _table_line(line: str) -> ClassInfo:
    if '"' in line:  # ITK-SNAP: IDX R G B A VIS MSH "LABEL"
        fields = shlex.split(line)
        value, rgb, name = int(fields[0]), tuple(int(float(v)) for v in fields[1:4]), fields[-1]
        return ClassInfo(value, name, rgb)
    fields = line.split()
    value = int(fields[0])
    if len(fields) >= 6 and all(re.fullmatch(r"\d+", f) for f in fields[-4:]):  # Slicer: value name R G B A
        return ClassInfo(value, " ".join(fields[1:-4]), tuple(int(f) for f in fields[-4:-1]))
    if len(fields) < 2:
        raise ValueError(line)
    return ClassInfo(value, " ".join(fields[1:]), default_colour(value))
