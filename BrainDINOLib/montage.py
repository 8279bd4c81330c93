"""PNG pictures of a volume with a map overlaid: montages of axial, coronal and sagittal slices, and reports.

Display conventions are the radiological ones of Slicer's slice views, read straight off the canonical LPS
array `[k, j, i]`: axial slices with the patient's right on the image's left and anterior at the top;
coronal slices with superior at the top and the patient's right on the left; sagittal slices with
superior at the top and anterior on the left. Pixels are drawn with their physical aspect ratio.

Rendering uses matplotlib's object API on the Agg canvas (no pyplot, no display needed); files are
written atomically.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .atomic import write_bytes_atomic
from .volume import Volume

Plane = Literal["axial", "coronal", "sagittal"]
PLANES: tuple[Plane, ...] = ("axial", "coronal", "sagittal")
AXIS_OF_PLANE = {"axial": 0, "coronal": 1, "sagittal": 2}  # which array axis (k, j, i) a plane cuts


@dataclass(frozen=True)
class OverlayStyle:
    """How a map is drawn over the image.

    kind: "scalar" (colour map + colour bar), "rgb" (uint8 colours, e.g. PCA) or "labels" (one colour per
    label, 0 transparent, a legend when `names` are given). vmin/vmax default to the 1st/99th percentile of
    the map's non-zero voxels.
    """

    kind: Literal["scalar", "rgb", "labels"] = "scalar"
    cmap: str = "inferno"
    vmin: float | None = None
    vmax: float | None = None
    alpha: float = 0.6
    label: str = ""
    names: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Panel:
    """One row of a report: a title and an overlay (None shows the image alone), drawn where `mask` is true."""

    title: str
    overlay: Volume | None
    style: OverlayStyle = OverlayStyle()
    mask: np.ndarray | None = None


def plane_image(array: np.ndarray, plane: Plane, index: int) -> np.ndarray:
    """The 2-D slice of a canonical [k, j, i(, c)] array, oriented for display (see module docstring)."""
    if plane == "axial":
        return array[index]
    if plane == "coronal":
        return array[::-1, index]
    return array[::-1, :, index]


def plane_aspect(volume: Volume, plane: Plane) -> float:
    """Height / width of one displayed pixel, from the voxel spacing (i, j, k order)."""
    spacing_i, spacing_j, spacing_k = volume.geometry.spacing
    return {"axial": spacing_j / spacing_i, "coronal": spacing_k / spacing_i, "sagittal": spacing_k / spacing_j}[plane]


def point_in_plane(kji: np.ndarray, plane: Plane, depth: int) -> tuple[float, float]:
    """Where voxel (k, j, i) appears on a displayed slice: (x = column, y = row)."""
    k, j, i = kji
    if plane == "axial":
        return i, j
    if plane == "coronal":
        return i, depth - 1 - k
    return j, depth - 1 - k


def _window(array: np.ndarray) -> tuple[float, float]:
    """Grey-level window: 1st-99.5th percentile of the voxels above the volume's minimum."""
    values = array[array > array.min()]
    if values.size == 0:
        return float(array.min()), float(array.max()) + 1.0
    low, high = np.percentile(values[:: max(1, values.size // 1_000_000)], (1.0, 99.5))
    return float(low), float(max(high, low + 1e-6))


def _value_range(overlay: np.ndarray, style: OverlayStyle) -> tuple[float, float]:
    values = overlay[overlay != 0]
    if values.size == 0:
        values = overlay.ravel()
    low, high = np.percentile(values[:: max(1, values.size // 1_000_000)], (1.0, 99.0))
    low = style.vmin if style.vmin is not None else float(low)
    high = style.vmax if style.vmax is not None else float(high)
    return low, max(high, low + 1e-6)


def _label_colours(count: int) -> ListedColormap:
    """Distinct colours for labels 0..count (0 unused: drawn transparent)."""
    base = colormaps["tab20"].colors if count > 10 else colormaps["tab10"].colors
    return ListedColormap([base[(n - 1) % len(base)] for n in range(count + 1)])


class _Renderer:
    """Draws slices of one image with one overlay into axes, with consistent windows and colours."""

    def __init__(self, image: Volume, overlay: Volume | None, style: OverlayStyle, mask: np.ndarray | None = None):
        if overlay is not None and overlay.shape != image.shape:
            raise ValueError(f"overlay grid {overlay.shape} does not match the image grid {image.shape}")
        self.image, self.overlay, self.style, self.mask = image, overlay, style, mask
        self.grey = _window(image.array)
        if overlay is None:
            return
        if style.kind == "scalar":
            self.range = _value_range(overlay.array, style)
        elif style.kind == "labels":
            self.label_cmap = _label_colours(int(overlay.array.max()))

    def draw(self, axes, plane: Plane, index: int, point_kji: np.ndarray | None = None) -> None:
        aspect = plane_aspect(self.image, plane)
        axes.imshow(plane_image(self.image.array, plane, index), cmap="gray", vmin=self.grey[0], vmax=self.grey[1],
                    aspect=aspect, interpolation="bilinear")
        if self.overlay is not None:
            values = plane_image(self.overlay.array, plane, index)
            if self.mask is not None:
                hidden = ~plane_image(self.mask, plane, index)
                values = np.ma.masked_array(values, np.broadcast_to(hidden[..., None], values.shape)
                                            if values.ndim == 3 else hidden)
            self._draw_overlay(axes, values, aspect)
        if point_kji is not None and round(point_kji[AXIS_OF_PLANE[plane]]) == index:
            x, y = point_in_plane(point_kji, plane, self.image.shape[0])
            axes.plot([x], [y], marker="+", markersize=12, markeredgewidth=2, color="cyan")
        axes.set_axis_off()

    def _draw_overlay(self, axes, values: np.ndarray, aspect: float) -> None:
        style = self.style
        if style.kind == "rgb":
            shown = values.any(axis=-1, keepdims=True) & ~np.ma.getmaskarray(values)[..., :1]
            rgba = np.concatenate([np.ma.getdata(values), np.where(shown, round(255 * style.alpha), 0).astype(np.uint8)],
                                  axis=-1)
            axes.imshow(rgba, aspect=aspect, interpolation="nearest")
        elif style.kind == "labels":
            axes.imshow(np.ma.masked_equal(values, 0), cmap=self.label_cmap, vmin=0, vmax=self.label_cmap.N - 1,
                        alpha=style.alpha, aspect=aspect, interpolation="nearest")
        else:
            axes.imshow(values, cmap=style.cmap, vmin=self.range[0], vmax=self.range[1], alpha=style.alpha,
                        aspect=aspect, interpolation="bilinear")

    def add_key(self, figure: Figure, axes_list: list, inset: bool = False) -> None:
        """A colour bar (scalar maps) or a legend of named labels, beside `axes_list` (`inset`: drawn in the
        margin of the last axes instead of taking width from all of them)."""
        if self.overlay is None:
            return
        if self.style.kind == "scalar":
            mappable = ScalarMappable(Normalize(*self.range), colormaps[self.style.cmap])
            if inset:
                bar = figure.colorbar(mappable, cax=axes_list[-1].inset_axes([1.04, 0.05, 0.05, 0.9]))
            else:
                bar = figure.colorbar(mappable, ax=axes_list, fraction=0.04, pad=0.01)
            bar.set_label(self.style.label, color="white")
            bar.ax.tick_params(colors="white")
        elif self.style.kind == "labels" and self.style.names:
            handles = [Patch(color=self.label_cmap(label), label=name) for label, name in sorted(self.style.names.items())
                       if 0 < label < self.label_cmap.N]
            axes_list[-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7,
                                 frameon=False, labelcolor="white")


def _extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last index along `axis` where `mask` has any voxel (the whole axis if empty)."""
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    return (int(present[0]), int(present[-1])) if present.size else (0, mask.shape[axis] - 1)


def montage_indices(image: Volume, plane: Plane, count: int, through_kji: np.ndarray | None = None) -> list[int]:
    """`count` slice indices spread over the middle 70% of the head (one through a point if given)."""
    axis = AXIS_OF_PLANE[plane]
    low, high = _extent(image.array > _window(image.array)[0], axis)
    positions = np.linspace(low + 0.15 * (high - low), high - 0.15 * (high - low), count)
    if through_kji is not None:
        positions[count // 2] = through_kji[axis]
    return sorted({int(round(p)) for p in positions})


def _point_kji(image: Volume, point_lps: Sequence[float] | None) -> np.ndarray | None:
    if point_lps is None:
        return None
    return image.geometry.lps_to_index(np.asarray(point_lps, dtype=np.float64)[None])[0]


def _save(figure: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="black", bbox_inches="tight", pad_inches=0.2)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


def _figure(rows: int, cols: int, title: str) -> tuple[Figure, np.ndarray]:
    height = 2.4 * rows + 0.5
    figure = Figure(figsize=(2.3 * cols + 1.6, height), facecolor="black")
    axes = figure.subplots(rows, cols, squeeze=False,
                           gridspec_kw={"wspace": 0.02, "hspace": 0.12, "top": 1 - 0.55 / height, "bottom": 0.02})
    figure.suptitle(title, color="white", y=1 - 0.1 / height, va="top")
    return figure, axes


def save_montage(image: Volume, overlay: Volume | None, path: str | Path, style: OverlayStyle = OverlayStyle(),
                 title: str = "", slices_per_plane: int = 5, point_lps: Sequence[float] | None = None,
                 mask: np.ndarray | None = None) -> Path:
    """A PNG of `slices_per_plane` axial, coronal and sagittal slices (one row each) with `overlay` on top.

    With `point_lps` (LPS mm), the middle slice of each row passes through the point, marked with a cross.
    With `mask` (bool [Z, Y, X]), the overlay is drawn only there (e.g. on the head, not the background).
    """
    point = _point_kji(image, point_lps)
    renderer = _Renderer(image, overlay, style, mask)
    figure, axes = _figure(len(PLANES), slices_per_plane, title)
    for row, plane in enumerate(PLANES):
        indices = montage_indices(image, plane, slices_per_plane, point)
        for col in range(slices_per_plane):
            if col < len(indices):
                renderer.draw(axes[row, col], plane, indices[col], point)
            else:
                axes[row, col].set_axis_off()
        axes[row, 0].set_title(plane, color="white", fontsize=9, loc="left")
    renderer.add_key(figure, list(axes.ravel()))
    return _save(figure, path)


def save_report(image: Volume, panels: Sequence[Panel], path: str | Path, point_lps: Sequence[float],
                title: str = "") -> Path:
    """A PNG with one row per panel and one column per plane, all through the point `point_lps` (LPS mm)."""
    point = _point_kji(image, point_lps)
    figure, axes = _figure(len(panels), len(PLANES), title)
    for row, panel in enumerate(panels):
        renderer = _Renderer(image, panel.overlay, panel.style, panel.mask)
        for col, plane in enumerate(PLANES):
            index = int(np.clip(round(point[AXIS_OF_PLANE[plane]]), 0, image.shape[AXIS_OF_PLANE[plane]] - 1))
            renderer.draw(axes[row, col], plane, index, point)
        axes[row, 0].set_title(panel.title, color="white", fontsize=9, loc="left")
        renderer.add_key(figure, list(axes[row]), inset=True)
    return _save(figure, path)
