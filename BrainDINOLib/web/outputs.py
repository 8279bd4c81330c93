"""What the page's Save button writes: every map and segmentation of the loaded volume on its exact grid, the
class tables, the predictions and one report picture, all inside the output folder and each written atomically."""
from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomic
from ..montage import OverlayStyle, Panel, save_report
from ..volume import Volume, write_volume
from .safety import OutputFolder

TITLES = {"pca": "PCA of the features (RGB = components 1-3)", "similarity": "cosine similarity to the point",
          "attention": "last-block attention", "clusters": "k-means clusters",
          "few-shot": "few-shot segmentation from painted slices", "head": "segmentation by the head"}


def _style(name: str, classes: Sequence) -> OverlayStyle:
    if name == "pca":
        return OverlayStyle("rgb", alpha=0.8)
    if name in ("similarity", "attention"):
        return OverlayStyle("scalar", cmap="inferno", vmax=1.0 if name == "similarity" else None, label=name)
    return OverlayStyle("labels", alpha=0.5, names={c.value: c.name for c in classes})


def _csv(rows: Sequence[Mapping[str, object]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def save_outputs(out: OutputFolder, stem: str, volume: Volume, maps: Mapping[str, Volume],
                 classes: Mapping[str, Sequence], predictions: Sequence[Mapping[str, object]],
                 point_lps: np.ndarray, title: str) -> list[Path]:
    """Write `<stem>_<map>.nii.gz` for each map, `<stem>_<map>.txt` class tables, `<stem>_predictions.csv` and
    `<stem>_report.png` (one row per map, through `point_lps`); return the paths written."""
    written = [write_volume(values, out.path(f"{stem}_{name}.nii.gz")) for name, values in maps.items()]
    for name, table in classes.items():
        path = out.path(f"{stem}_{name}.txt")
        write_text_atomic(path, "".join(f"{c.value} {c.name}\n" for c in table))
        written.append(path)
    if predictions:
        path = out.path(f"{stem}_predictions.csv")
        write_text_atomic(path, _csv(predictions))
        written.append(path)
    panels = [Panel(stem, None)] + [Panel(TITLES.get(name, name), values, _style(name, classes.get(name, ())))
                                    for name, values in maps.items()]
    written.append(save_report(volume, panels, out.path(f"{stem}_report.png"), point_lps, title))
    return written
