"""Slicer's axial, coronal and sagittal slice views of a trame-slicer app, side by side in the page.

Each view is rendered off-screen on the server and streamed to the page as pictures (trame-rca); the page
sends mouse events back. Three things here are not trame-slicer's defaults, each for a measured reason:
- no multisampling: trame-slicer asks for 8x MSAA, which costs about 3x per render on a software renderer
  (Mesa llvmpipe) and gains nothing for 2-D slices;
- a re-render whenever a slice logic changes: trame-slicer re-renders when its own setters or a displayable
  manager ask, but the engine's MRML adapter changes composite nodes and voxels directly, which would
  otherwise leave the page showing the old picture;
- a click (press and release at the same place, not a drag) reports its point in RAS, through the slice
  node's XY-to-RAS matrix, to `on_click`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from trame.widgets import html
from trame_slicer.app.logic import connect_slice_view_slider_to_state
from trame_slicer.app.ui.slider import Slider
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, SliceView, ViewLayoutDefinition

from .. import mrml
from ..features import Planes
from ..volume import Geometry

VIEW_NAMES = {"Red": "axial", "Green": "coronal", "Yellow": "sagittal"}  # Slicer's view ids
CLICK_TOLERANCE_PX = 3  # a press and release further apart are a drag (window/level), not a click
FRAMES_PER_SECOND = 30  # every view, not only the one under the mouse (trame-slicer's default is 10 for those)


class SliceViews:
    """The three slice views of `slicer_app`, laid out side by side; clicks go to `on_click(view_name, ras)`."""

    def __init__(self, slicer_app: SlicerApp, server, on_click: Callable[[str, np.ndarray], None]):
        self.slicer_app = slicer_app
        self.on_click = on_click
        self._pressed: dict[str, tuple[int, int]] = {}
        register_rca_factories(slicer_app.view_manager, server, slice_view_ui_f=self._decorate,
                               blur_fps=FRAMES_PER_SECOND, target_fps=FRAMES_PER_SECOND)
        self.layouts = LayoutManager(slicer_app.scene, slicer_app.view_manager, server)
        views = [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                 ViewLayoutDefinition.sagittal_view()]
        self.layouts.register_layout("braindino", Layout(LayoutDirection.Horizontal, views))
        self.layouts.set_layout("braindino")

    def build(self, layout) -> None:
        """Put the views into the page (inside the layout's content area)."""
        self.layouts.initialize_layout_grid(layout)

    def views(self) -> list[SliceView]:
        return list(self.slicer_app.view_manager.get_slice_views())

    def displayed_planes(self, geometry: Geometry) -> Planes | None:
        """The voxel planes of a volume on `geometry` that the views show now (None if one is oblique to it)."""
        return mrml.displayed_planes([view.get_view_node() for view in self.views()], geometry)

    def fit_to_content(self) -> None:
        for view in self.views():
            view.fit_view_to_content()

    def _decorate(self, server, view_id: str, view: SliceView) -> None:
        """Called by trame-slicer inside each view's container: a slice slider, a marker the tests find the view
        by, and the observers described in the module docstring."""
        html.Div(classes=f"view-marker view-{view_id}", style="display:none")
        with html.Div(style="position:absolute;bottom:0;left:0;width:100%"):
            Slider(typed_state=connect_slice_view_slider_to_state(server, view), dense=True, theme="dark")
        view.render_window().SetMultiSamples(0)
        slice_logic = self.slicer_app.app_logic.GetSliceLogic(view.get_view_node())
        slice_logic.AddObserver("ModifiedEvent", lambda *_: view.schedule_render())
        interactor = view.interactor()
        interactor.AddObserver("LeftButtonPressEvent", lambda *_: self._press(view_id, view), 1.0)
        interactor.AddObserver("LeftButtonReleaseEvent", lambda *_: self._release(view_id, view), 1.0)

    def _press(self, view_id: str, view: SliceView) -> None:
        self._pressed[view_id] = view.interactor().GetEventPosition()

    def _release(self, view_id: str, view: SliceView) -> None:
        pressed = self._pressed.pop(view_id, None)
        x, y = view.interactor().GetEventPosition()
        if pressed is None or max(abs(x - pressed[0]), abs(y - pressed[1])) > CLICK_TOLERANCE_PX:
            return
        ras = view.get_view_node().GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3]
        self.on_click(VIEW_NAMES.get(view_id, view_id), np.asarray(ras, dtype=np.float64))
