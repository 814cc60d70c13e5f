"""The Compare dock's *Side by side* mode: the results (then the reference) in the top row of napari's
grid (``viewer.canvas.grid``), their difference maps (or field residuals) underneath, contrast linked
per row; *Restore view* undoes exactly what it changed."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ...core import compare as core
from .geometry import canonical, in_layer_frame, like
from .picker import kind

_DIVERGING = None
_DIFF_PREFIXES = ("Δ ", "residual ")


def diverging_colormap():
    """napari Colormap of matplotlib's RdBu_r (blue negative, white zero, red positive)."""
    global _DIVERGING
    if _DIVERGING is None:
        import matplotlib
        from napari.utils.colormaps import Colormap

        cols = matplotlib.colormaps["RdBu_r"](np.linspace(0, 1, 256))
        _DIVERGING = Colormap(colors=cols, name="RdBu_r (difference)")
    return _DIVERGING


class ViewState:
    """What "Side by side" changed, so that "Restore view" undoes exactly that."""

    def __init__(self, viewer) -> None:
        g = viewer.canvas.grid
        self.grid = dict(enabled=g.enabled, shape=tuple(g.shape), stride=g.stride, spacing=g.spacing)
        cam = viewer.scene.camera
        self.camera = dict(center=tuple(cam.center), zoom=float(cam.zoom), angles=tuple(cam.angles),
                           orientation=tuple(getattr(cam, "orientation", ())))
        self.visible = {id(lay): bool(lay.visible) for lay in viewer.layers}
        self.layers = list(viewer.layers)
        self.selection = set(viewer.layers.selection)
        self.active = viewer.layers.selection.active
        self.contrast = {}
        self.name_overlay = {}
        self.added: list = []
        self.links = []


class SideBySide:
    """Grid mode of one viewer: :meth:`open`, :meth:`apply_contrast`, :meth:`restore`."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.state: Optional[ViewState] = None

    @property
    def active(self) -> bool:
        return self.state is not None

    def added_names(self) -> set:
        """Names of the layers grid mode added (the dock does not offer them as choices)."""
        return set() if self.state is None else {lay.name for lay in self.state.added}

    def open(self, results: list, reference, mask_for: Callable, demean: bool, offsets: dict, residuals: dict,
             chi_window: tuple, diff_limit: float) -> None:
        """Results in the top row (then the reference), their difference maps below.

        ``mask_for(shape)``: the chosen mask in the voxel frame (or None); ``offsets``: result name →
        demeaning offset (ppm); ``residuals``: result name → field residual map (used without a
        reference). On an error the state is kept, so that :meth:`restore` undoes the partial change.
        """
        from napari.experimental import layers_linked

        v = self.viewer
        state = ViewState(v)
        # results in the order of the layer list (that is the grid order)
        order = {id(lay): i for i, lay in enumerate(v.layers)}
        results = sorted(results, key=lambda lay: order[id(lay)])
        lo, hi = chi_window
        dl = diff_limit
        try:
            for lay in v.layers:
                lay.visible = False
            chi_layers = list(results)
            diff_layers = []

            def add_diff(data, name, lay, **difference):
                d = v.add_image(data, name=name, colormap=diverging_colormap(), contrast_limits=(-dl, dl),
                                **like(lay, difference=difference))
                state.added.append(d)
                diff_layers.append(d)

            if reference is not None:
                ref_view = v.add_image(reference.data, name=f"{reference.name} (reference)", colormap="gray",
                                       contrast_limits=(lo, hi), **like(reference, role=kind(reference) or "chi"))
                state.added.append(ref_view)
                chi_layers.append(ref_view)
                refd = np.asarray(reference.data)
                for lay in results:
                    d = np.asarray(lay.data)
                    if d.shape != refd.shape:
                        continue
                    m = mask_for(canonical(lay).shape)
                    mm = None if m is None else in_layer_frame(m, lay)
                    diff = core.shown_difference(d, refd, mm, offsets.get(lay.name), demean)
                    add_diff(diff, f"Δ {lay.name}", lay, result=lay.name, reference=reference.name, demeaned=demean)
            elif residuals:
                for lay in results:
                    r = residuals.get(lay.name)
                    if r is not None:
                        add_diff(np.ascontiguousarray(in_layer_frame(r, lay)), f"residual {lay.name}", lay,
                                 result=lay.name, field_residual=True)
            for lay in results:
                state.contrast[id(lay)] = tuple(lay.contrast_limits)
                state.name_overlay[id(lay)] = (bool(lay.name_overlay.visible), float(lay.name_overlay.font_size))
                lay.contrast_limits = (lo, hi)
                lay.visible = True
            for lay in results + state.added:  # layer name in its grid cell
                lay.visible = True
                lay.name_overlay.font_size = 9
                lay.name_overlay.visible = True
            # one colour bar per group (ppm), in the cells of the reference and of the first difference
            for lay in ([state.added[0]] if reference is not None else []) + diff_layers[:1]:
                try:
                    lay.colorbar.position = "bottom_right"
                    lay.colorbar.visible = True
                except Exception:  # pragma: no cover - older napari without layer colour bars
                    pass
            for group in (chi_layers, diff_layers):
                if len(group) > 1:
                    cm = layers_linked(group, ("contrast_limits",))
                    cm.__enter__()
                    state.links.append(cm)
            grid = v.canvas.grid
            grid.stride = 1
            grid.shape = (2, len(chi_layers)) if diff_layers else (1, len(chi_layers))
            grid.enabled = True
            v.reset_view()
            v.layers.selection.active = results[0]
        finally:
            self.state = state

    def apply_contrast(self, chi_window: tuple, diff_limit: float) -> None:
        """The dock's χ window and difference limit on the grid's layers."""
        st = self.state
        if st is None:
            return
        lo, hi = chi_window
        dl = diff_limit
        for lay in st.added:
            if lay in self.viewer.layers:
                lay.contrast_limits = (-dl, dl) if lay.name.startswith(_DIFF_PREFIXES) else (lo, hi)
        for lay in self.viewer.layers:
            if id(lay) in st.contrast:
                lay.contrast_limits = (lo, hi)

    def restore(self) -> None:
        """Undo :meth:`open` exactly (added layers, grid, visibility, contrast, camera, selection)."""
        st = self.state
        if st is None:
            return
        v = self.viewer
        try:
            for cm in st.links:
                try:
                    cm.__exit__(None, None, None)
                except Exception:
                    pass
            for lay in st.added:
                if lay in v.layers:
                    v.layers.remove(lay)
            for lay in v.layers:
                if id(lay) in st.contrast:
                    lay.contrast_limits = st.contrast[id(lay)]
                if id(lay) in st.name_overlay:
                    lay.name_overlay.visible, lay.name_overlay.font_size = st.name_overlay[id(lay)]
                if id(lay) in st.visible:
                    lay.visible = st.visible[id(lay)]
            g = v.canvas.grid
            for k in ("enabled", "shape", "stride", "spacing"):
                setattr(g, k, st.grid[k])
            cam = v.scene.camera
            if st.camera["orientation"]:
                cam.orientation = st.camera["orientation"]
            for k in ("angles", "center", "zoom"):
                setattr(cam, k, st.camera[k])
            v.layers.selection.clear()
            v.layers.selection.update({lay for lay in st.selection if lay in v.layers})
            if st.active is not None and st.active in v.layers:
                v.layers.selection.active = st.active
        finally:
            self.state = None
