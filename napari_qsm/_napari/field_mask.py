"""The Field dock's brain mask, corrected by hand: napari's labels tools plus Erode / Dilate.

After a run the brain mask is a Labels layer over the echoes. Painting it with napari's brush or
eraser, or pressing Erode / Dilate (one voxel, 6-connected), makes it the dock's mask layer: the
next Run skips the brain-mask step and uses it (a user mask always wins), and the hand-off gives
the other docks the mask that run erodes from it.
"""

from __future__ import annotations

import html
from typing import Optional

import numpy as np
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QVBoxLayout, QWidget

from .kit import DIM_COLOR, unwrap, wrap_label

__all__ = ["MaskTools", "NO_MASK", "morph_mask"]

NO_MASK = "(none: compute it)"


def morph_mask(mask: np.ndarray, op: str, voxels: int = 1) -> np.ndarray:
    """``mask`` (any array, > 0 inside) eroded or dilated by ``voxels`` 6-connected steps, as bool.

    Parameters
    ----------
    mask : ndarray
        The mask, in any axis order (a 6-connected step does not depend on it).
    op : {"erode", "dilate"}
    voxels : int
        Number of one-voxel steps.

    Returns
    -------
    ndarray of bool
    """
    from scipy import ndimage

    if op not in ("erode", "dilate"):
        raise ValueError(f"mask operation: expected 'erode' or 'dilate', got {op!r}")
    fn = ndimage.binary_erosion if op == "erode" else ndimage.binary_dilation
    return fn(np.asarray(mask) > 0, structure=ndimage.generate_binary_structure(3, 1), iterations=int(voxels))


class MaskTools:
    """Mixin of :class:`~napari_qsm._napari.field_widget.FieldWidget`: the mask tools row and what it does.

    Needs ``viewer``, ``mask_combo``, ``output_layers``, ``_refresh_masks`` and ``_fail``.
    """

    def _mask_tools_widget(self) -> QWidget:
        box = QWidget()
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.edit_mask_button = QPushButton("Correct by hand")
        self.edit_mask_button.setToolTip("Select the brain mask layer and napari's brush: paint to add voxels, "
                                         "erase (or paint label 0) to remove them; the next Run uses the result")
        self.erode_button = QPushButton("Erode")
        self.erode_button.setToolTip("Remove one voxel from the mask's surface (6-connected)")
        self.dilate_button = QPushButton("Dilate")
        self.dilate_button.setToolTip("Add one voxel to the mask's surface (6-connected)")
        for b in (self.edit_mask_button, self.erode_button, self.dilate_button):
            row.addWidget(b)
        lay.addLayout(row)
        self.mask_info = wrap_label("The brain mask appears here after a Run; correct it, then Run again.",
                                    DIM_COLOR, small=True)
        self.mask_info.setObjectName("mask_info")
        lay.addWidget(self.mask_info)
        self.edit_mask_button.clicked.connect(self.edit_mask)
        self.erode_button.clicked.connect(lambda: self.change_mask("erode"))
        self.dilate_button.clicked.connect(lambda: self.change_mask("dilate"))
        self._watched: set = set()
        return box

    def mask_layer(self):
        """The mask the tools act on: the chosen mask layer, else the last run's brain mask (None when neither)."""
        name = self.mask_combo.currentText()
        if name not in ("", NO_MASK) and name in self.viewer.layers:
            return self.viewer.layers[name]
        layer = self.output_layers.get("brain_mask")
        return layer if layer is not None and layer in self.viewer.layers else None

    def edit_mask(self) -> bool:
        """Select the mask layer with napari's paint brush; the next Run uses it."""
        layer = self.mask_layer()
        if layer is None:
            self._fail("mask: no brain mask yet; Run once, or choose a mask layer")
            return False
        layer.visible = True
        layers = self.viewer.layers
        index = layers.index(layer)
        if index != len(layers) - 1:  # on top, so that the brush strokes show over the maps
            layers.move(index, len(layers))
        self.viewer.layers.selection.active = layer
        layer.selected_label = 1
        layer.mode = "paint"
        self.use_mask(layer)
        return True

    def change_mask(self, op: str) -> bool:
        """Erode or dilate the mask layer by one voxel; the next Run uses it."""
        layer = self.mask_layer()
        if layer is None:
            self._fail("mask: no brain mask yet; Run once, or choose a mask layer")
            return False
        data = np.asarray(layer.data)
        layer.data = morph_mask(data, op).astype(data.dtype)
        self.use_mask(layer)
        return True

    def watch_mask(self, layer) -> None:
        """Painting ``layer`` with napari's labels tools makes it the mask of the next Run."""
        key = id(unwrap(layer))
        if key in self._watched:
            return
        self._watched.add(key)
        name = layer.name
        layer.events.paint.connect(lambda *_: self._painted(name))

    def _painted(self, name: str) -> None:
        if name in self.viewer.layers:
            self.use_mask(self.viewer.layers[name])

    def use_mask(self, layer) -> None:
        """Choose ``layer`` as the dock's mask layer: it replaces the brain-mask step from the next Run on."""
        self.watch_mask(layer)
        if self.mask_combo.currentText() != layer.name:
            self._refresh_masks()
            self.mask_combo.setCurrentText(layer.name)
        n = int(np.count_nonzero(np.asarray(layer.data)))
        self.mask_info.setText(f"{n:,} voxels in <b>{html.escape(layer.name)}</b>: the next Run uses this mask "
                               "instead of the brain-mask step.")

    def _mask_run_done(self, layer: Optional[object]) -> None:
        """After a run: watch the run's brain mask for corrections and say how to correct it."""
        if layer is None:
            return
        self.watch_mask(layer)
        if self.mask_combo.currentText() in ("", NO_MASK):
            self.mask_info.setText(f"<b>{html.escape(layer.name)}</b>: correct it by hand (napari's brush and "
                                   "eraser) or with Erode / Dilate; the next Run then uses it.")
