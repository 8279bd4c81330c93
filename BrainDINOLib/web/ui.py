"""The page's layout: a side panel (volume and model, features, maps, similarity, few-shot painting, heads,
saving) beside the three slice views. Every control is bound to the page's state or to one of its actions
(`server.controller.<action>`); the ids are what the browser test finds them by."""
from __future__ import annotations

from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3

from .views import SliceViews

COMPACT = {"density": "compact", "hide_details": True}


def _section(title: str) -> None:
    html.Div(title, classes="text-subtitle-2 mt-4 mb-1")


def _button(text: str, action, element_id: str, **kwargs) -> None:
    v3.VBtn(text, click=action, id=element_id, size="small", classes="mr-2 mb-1", disabled=("busy",), **kwargs)


def build_page(server, views: SliceViews, title: str = "BrainDINO"):
    """Lay out the page on `server` (its state and controller were set up by `BrainDINOPage`)."""
    ctrl = server.controller
    with SinglePageWithDrawerLayout(server, full_height=True, width=360) as layout:
        layout.title.set_text(title)
        with layout.toolbar:
            v3.VSpacer()
            html.Div("{{ model_info }}", id="model-info", classes="text-caption mr-4")
        with layout.drawer, html.Div(classes="pa-3"):
            _section("Volume and model")
            v3.VSelect(label="Volume", items=("volumes",), v_model=("volume_name",), id="volume-select", **COMPACT)
            v3.VSelect(label="Model", items=("models",), v_model=("model_name",), id="model-select", classes="mt-2",
                       **COMPACT)
            v3.VSelect(label="Resolution", items=("resolutions",), v_model=("resolution",), id="resolution-select",
                       classes="mt-2", **COMPACT)
            _section("Features")
            _button("Compute features", ctrl.compute, "compute", color="primary")
            v3.VBtn("Cancel", click=ctrl.cancel, id="cancel", size="small", classes="mb-1", color="error",
                    disabled=("!busy",))
            v3.VProgressLinear(model_value=("progress",), height=8, classes="my-1", id="progress",
                               active=("busy",))
            html.Div("{{ status }}", id="status", classes="text-body-2")
            html.Div("{{ error }}", id="error", classes="text-body-2", style="color:#e53935")

            _section("Maps")
            _button("PCA colours", ctrl.show_pca, "show-pca")
            _button("Attention", ctrl.show_attention, "show-attention")
            with html.Div(classes="d-flex align-center"):
                _button("Clusters", ctrl.show_clusters, "show-clusters")
                v3.VTextField(v_model_number=("clusters",), type="number", min=2, max=64, label="k",
                              id="clusters-k", style="max-width:80px", **COMPACT)
                v3.VSwitch(v_model=("clusters_visible",), label="shown", id="clusters-switch", classes="ml-2",
                           **COMPACT)
            v3.VSelect(label="Overlay", items=("overlays",), v_model=("overlay",), id="overlay-select",
                       classes="mt-2", **COMPACT)
            v3.VSlider(label="Opacity", v_model=("opacity",), min=0, max=1, step=0.05, id="opacity", **COMPACT)
            html.Div("Click in any view: similarity to that point.", classes="text-caption")
            html.Div("{{ click_report }}", id="click-report", classes="text-body-2")

            _section("Few-shot segmentation")
            html.Div("Paint each structure on a few axial slices; the rest of each painted slice is background.",
                     classes="text-caption")
            with v3.VBtnToggle(v_model=("brush",), mandatory=True, density="compact", divided=True, border=True,
                               classes="my-1"):
                v3.VBtn("Click", value="off", id="brush-off", size="small")
                v3.VBtn("Paint", value="paint", id="brush-paint", size="small")
                v3.VBtn("Erase", value="erase", id="brush-erase", size="small")
            v3.VSlider(label="Brush mm", v_model=("brush_mm",), min=1, max=40, step=1, id="brush-mm",
                       thumb_label=True, **COMPACT)
            html.Div("{{ brush_status }}", id="brush-status", classes="text-caption")
            html.Div("{{ painted_status }}", id="painted-status", classes="text-caption")
            with html.Div(classes="d-flex align-center"):
                v3.VTextField(v_model=("structure",), label="new structure", id="structure-name", **COMPACT)
                _button("Add", ctrl.add_structure, "add-structure")
            html.Div("structures: {{ structures.join(', ') }}", id="structures", classes="text-body-2")
            with html.Div(classes="d-flex align-center mt-1"):
                v3.VSelect(label="or labels from a file", items=("label_files",), v_model=("labels_name",),
                           id="labels-select", **COMPACT)
                _button("Load", ctrl.load_labels, "load-labels")
            _button("Learn from painted slices", ctrl.learn, "learn", color="primary")

            _section("Fitted heads")
            with html.Div(classes="d-flex align-center"):
                v3.VSelect(label="Head file", items=("heads",), v_model=("head_name",), id="head-select", **COMPACT)
                _button("Apply", ctrl.apply_head, "apply-head")
            v3.VDataTable(items=("predictions",), headers=("prediction_columns",), id="predictions",
                          density="compact", hide_default_footer=True, v_show="predictions.length")

            _section("Outputs")
            _button("Save into the output folder", ctrl.save, "save")
            html.Div("{{ saved }}", id="saved", classes="text-caption")
            html.Div("server memory {{ memory_mib }} MiB", id="memory", classes="text-caption mt-2")
        with layout.content, html.Div(style="height:100%;display:flex"):
            views.build(layout)
    return layout
