"""The Compare dock's picker: reference, mask, field and labels combos and the checkable results list.

Choices are guessed from the layers' metadata role (``role`` / ``kind``) or, failing that, their
names; they are kept by layer (renames are followed) and an explicit "(none)" the user chose is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (QAbstractItemView, QComboBox, QGridLayout, QLabel, QListView, QListWidget,
                            QListWidgetItem, QWidget)

from .geometry import meta

NONE = "(none)"
#: metadata roles of layers that are never offered as results (inputs, masks, raw phase, B0 maps, the echo
#: fit's R2*, a solver's live preview): only χ maps are results
_NOT_RESULTS = ("field", "magnitude", "noise_std", "mask", "labels", "phase", "total_field", "r2star", "preview")


def is_image(layer) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image) and layer.ndim == 3 and not getattr(layer, "rgb", False)


def is_labels(layer) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels) and layer.ndim == 3


def kind(layer) -> str:
    """The layer's metadata role (``role`` or ``kind``), lower case; "" when it has none."""
    md = meta(layer)
    for k in ("role", "kind"):
        v = md.get(k)
        if isinstance(v, str):
            return v.lower()
    return ""


def is_result(layer) -> bool:
    """A reconstruction (from the Reconstruct widget or a χ file), not the true χ."""
    return "provenance" in meta(layer) or kind(layer) == "chi"


def offered_as_result(layer) -> bool:
    """Whether the results list offers ``layer`` at all (unless the user checked it before)."""
    from ..layer_roles import map_role

    return kind(layer) not in _NOT_RESULTS and (kind(layer) or map_role(layer)) != "r2star"


def guess(layers, roles, words=()) -> Optional[str]:
    """First layer whose metadata role is in ``roles``, else whose name contains one of ``words``."""
    for lay in layers:
        if kind(lay) in roles:
            return lay.name
    for lay in layers:
        nm = lay.name.lower()
        if any(w in nm for w in words):
            return lay.name
    return None


class _FlowList(QListWidget):
    """The results list: checkable names side by side, wrapping, as tall as its lines (at most three)."""

    MAX_LINES = 3

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setFlow(QListView.Flow.LeftToRight)
        self.setWrapping(True)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setSpacing(2)
        self.fit_height()

    def fit_height(self) -> None:
        line = self.sizeHintForRow(0) if self.count() else self.fontMetrics().height() + 6
        line = max(line, self.fontMetrics().height() + 4) + 2 * self.spacing()
        bottom = 0
        for i in range(self.count()):
            r = self.visualItemRect(self.item(i))
            bottom = max(bottom, r.bottom() + self.verticalScrollBar().value() + 1)
        lines = max(1, min(self.MAX_LINES, int(round(bottom / line)) if bottom else 1))
        self.setFixedHeight(lines * line + 2 * self.frameWidth() + self.spacing())

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        if event.size().width() != event.oldSize().width():
            self.doItemsLayout()
            self.fit_height()


@dataclass
class Selection:
    reference: Optional[str]
    results: list
    mask: Optional[str]
    field: Optional[str]
    labels: Optional[str]


class Picker(QWidget):
    """Reference / Mask / Field / Labels combos over the results list, filled from the viewer."""

    #: the user (or a ``set_*`` call) changed the selection
    changed = Signal()
    #: a layer was renamed (the choices need a refresh)
    layerRenamed = Signal()

    def __init__(self, viewer, hidden: Callable[[], set], parent=None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._hidden = hidden           # names of layers the dock added itself (never offered)
        self._updating = False
        self._known_names: dict = {}    # id(layer) → name at the last refresh (to follow renames)
        self._name_hooked: set = set()
        self._user_set: set = set()     # combos the user set (an explicit "(none)" is kept)

        tips = {"reference": "Reference χ (e.g. the phantom's true χ, COSMOS or one method's result). "
                             "(none): score each result by its field residual.",
                "mask": "Metrics and demeaning use the voxels inside this mask ((none): whole volume).",
                "field": "Measured local field (ppm) for the field-consistency residual.",
                "labels": "Labels layer for region statistics (mean χ per label)."}
        for key, tip in tips.items():
            cb = QComboBox()
            cb.setToolTip(tip)
            cb.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            cb.setMinimumContentsLength(8)
            cb.currentIndexChanged.connect(self._emit_changed)
            cb.activated.connect(lambda _i, c=cb: self._user_set.add(c))
            setattr(self, f"{key}_combo", cb)
        self.results_list = _FlowList()
        self.results_list.setToolTip("Result layers to compare (checked ones).")
        self.results_list.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.results_list.itemChanged.connect(self._emit_changed)

        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(6)
        grid.setVerticalSpacing(3)
        for r, (lab, w1, lab2, w2) in enumerate((("Reference", self.reference_combo, "Mask", self.mask_combo),
                                                  ("Field", self.field_combo, "Labels", self.labels_combo))):
            grid.addWidget(QLabel(lab), r, 0)
            grid.addWidget(w1, r, 1)
            grid.addWidget(QLabel(lab2), r, 2)
            grid.addWidget(w2, r, 3)
        grid.addWidget(QLabel("Results"), 2, 0, Qt.AlignmentFlag.AlignTop)
        grid.addWidget(self.results_list, 2, 1, 1, 3)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)

    def _emit_changed(self, *args) -> None:
        if not self._updating:
            self.changed.emit()

    def _on_name(self, event=None) -> None:
        self.layerRenamed.emit()

    # ------------------------------------------------------------------ filling
    def image_layers(self) -> list:
        hidden = self._hidden()
        return [lay for lay in self.viewer.layers if is_image(lay) and lay.name not in hidden]

    def refresh(self) -> None:
        """Fill the choices from the viewer's layers, keeping (and following) what was chosen."""
        self._updating = True
        try:
            images = self.image_layers()
            names = [lay.name for lay in images]
            labels = [lay.name for lay in self.viewer.layers if is_labels(lay)]
            mask_names = names + [n for n in labels if n not in names]
            # follow renamed layers (choices are kept by layer, not by name)
            renamed = {}
            for lay in self.viewer.layers:
                old = self._known_names.get(id(lay))
                if old is not None and old != lay.name:
                    renamed[old] = lay.name
            self._known_names = {id(lay): lay.name for lay in self.viewer.layers}

            def fill(combo, options, guessed):
                cur = combo.currentText() if combo.count() else None
                cur = renamed.get(cur, cur)
                combo.clear()
                combo.addItems([NONE] + options)
                if cur and cur in options:
                    combo.setCurrentText(cur)
                elif combo in self._user_set and cur == NONE:
                    pass  # the user chose (none): keep it
                elif guessed in options:
                    combo.setCurrentText(guessed)

            non_results = [lay for lay in images if not is_result(lay)]
            fill(self.reference_combo, names, guess(non_results, ("chi_true",), ("truth", "reference", "cosmos")))
            fill(self.mask_combo, mask_names, guess([self.viewer.layers[n] for n in mask_names], ("mask",), ("mask",)))
            fill(self.field_combo, names, guess(non_results, ("field",), ("field",)))
            fill(self.labels_combo, labels, guess([self.viewer.layers[n] for n in labels], ("labels",),
                                                  ("label", "seg", "atlas", "parc")))
            self._fill_results(images, renamed)
            # layer renames refresh the choices
            for lay in self.viewer.layers:
                if id(lay) not in self._name_hooked:
                    lay.events.name.connect(self._on_name)
                    self._name_hooked.add(id(lay))
        finally:
            self._updating = False

    def _fill_results(self, images, renamed) -> None:
        """Checkable list; keep check states, default = layers that carry provenance."""
        lst = self.results_list
        checked = {renamed.get(lst.item(i).text(), lst.item(i).text()): lst.item(i).checkState()
                   for i in range(lst.count())}
        lst.clear()
        skip = {self.mask_combo.currentText(), self.field_combo.currentText()}
        for lay in images:
            if (lay.name in skip or not offered_as_result(lay)) and lay.name not in checked:
                continue
            it = QListWidgetItem(lay.name)
            it.setFlags(it.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            if lay.name in checked:
                st = checked[lay.name]
            else:
                st = Qt.CheckState.Checked if is_result(lay) else Qt.CheckState.Unchecked
            it.setCheckState(st)
            lst.addItem(it)
        lst.fit_height()

    # ------------------------------------------------------------------ choosing
    def set_choice(self, which: str, name: Optional[str]) -> None:
        """Choose layer ``name`` (None: "(none)") in the ``which`` combo (reference, mask, field, labels)."""
        combo = getattr(self, f"{which}_combo")
        self._user_set.add(combo)
        combo.setCurrentText(name or NONE)

    def set_results(self, names) -> None:
        names = set(names)
        self._updating = True
        try:
            for i in range(self.results_list.count()):
                it = self.results_list.item(i)
                it.setCheckState(Qt.CheckState.Checked if it.text() in names else Qt.CheckState.Unchecked)
        finally:
            self._updating = False
        self.changed.emit()

    def selection(self) -> Selection:
        def val(cb):
            t = cb.currentText()
            return None if (not t or t == NONE) else t

        ref = val(self.reference_combo)
        results = [self.results_list.item(i).text() for i in range(self.results_list.count())
                   if self.results_list.item(i).checkState() == Qt.CheckState.Checked]
        results = [r for r in results if r != ref]
        return Selection(reference=ref, results=results, mask=val(self.mask_combo),
                         field=val(self.field_combo), labels=val(self.labels_combo))
