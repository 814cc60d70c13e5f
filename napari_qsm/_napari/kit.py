"""The Qt kit the plugin's docks share: colours, sections, scrolling bodies, labels, footers, notifications.

Public names only; each dock module imports what it needs from here.
"""

from __future__ import annotations

import html
from typing import Callable, Optional

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QFrame, QGroupBox, QHBoxLayout,
                            QLabel, QLineEdit, QPushButton, QScrollArea, QSizePolicy, QVBoxLayout, QWidget)

from ..core.device import available_devices
from .layer_roles import is_volume

__all__ = ["OK_COLOR", "WARN_COLOR", "ERR_COLOR", "DIM_COLOR", "NONE_TEXT", "notify_error", "notify_info", "section",
           "scrolling_body", "wrap_label", "weights_row", "pick_weights_file", "device_combo", "spin_box",
           "field_strength_spin", "run_footer", "show_failure", "relabel_form", "same_viewer", "unwrap", "viewer_docks",
           "hook_events", "VScrollArea", "LayerCombo"]

NONE_TEXT = "(none)"
OK_COLOR, WARN_COLOR, ERR_COLOR, DIM_COLOR = "#5cb85c", "#f0ad4e", "#e8635f", "#9a9a9a"


def notify_error(msg: str) -> None:
    """A napari error notification."""
    from napari.utils.notifications import show_error
    show_error(msg)


def notify_info(msg: str) -> None:
    """A napari information notification."""
    from napari.utils.notifications import show_info
    show_info(msg)


def same_viewer(a, b) -> bool:
    """Whether two viewer handles are the same viewer.

    napari gives every dock its own ``PublicOnlyProxy`` of the viewer: two docks' handles are equal
    but not identical, so ``is`` between them is always False. The proxies wrap the viewer itself.
    """
    return a is not None and b is not None and unwrap(a) is unwrap(b)


def unwrap(obj):
    """The object behind napari's ``PublicOnlyProxy`` (nested proxies too); ``obj`` itself when not a proxy."""
    seen = 0
    while hasattr(obj, "__wrapped__") and seen < 8:
        obj = obj.__wrapped__
        seen += 1
    return obj


def hook_events(widget: QWidget, hooks) -> list:
    """Connect (event emitter, bound method) pairs and disconnect them when ``widget`` is destroyed.

    A closed dock must leave no callback on the viewer. Only weak references to the methods' owners
    are kept here (napari's emitters hold bound methods weakly too), so the hooks never keep a closed
    dock alive. Returns the list of hooks; pairs appended to it later (and connected by the caller)
    are disconnected too.
    """
    hooks = [(e, cb) for e, cb in hooks if e is not None]
    for e, cb in hooks:
        e.connect(cb)
    weak = _WeakHooks()
    weak.extend(hooks)
    widget.destroyed.connect(weak.drop)
    return weak


class _WeakHooks(list):
    """The hooks of one widget, kept as (emitter, owner, method name) with weak references only."""

    def append(self, pair) -> None:
        import weakref

        emitter, cb = pair
        super().append((weakref.ref(unwrap(emitter)), weakref.ref(cb.__self__), cb.__name__))

    def extend(self, pairs) -> None:
        for pair in pairs:
            self.append(pair)

    def drop(self, *_) -> None:
        for emitter_ref, owner_ref, name in self:
            emitter, owner = emitter_ref(), owner_ref()
            if emitter is None or owner is None:  # gone already: napari forgets dead callbacks itself
                continue
            try:
                emitter.disconnect(getattr(owner, name))
            except Exception:  # already disconnected with the viewer
                pass
        self.clear()


def viewer_docks(viewer, cls) -> list:
    """The open widgets of class ``cls`` that work on ``viewer`` (in any window, docked or floating)."""
    from qtpy.QtWidgets import QApplication

    out = []
    for top in QApplication.topLevelWidgets():
        cands = ([top] if isinstance(top, cls) else []) + top.findChildren(cls)
        out += [w for w in cands if w not in out and same_viewer(getattr(w, "viewer", None), viewer)]
    return out


def section(title: str) -> tuple[QGroupBox, QVBoxLayout]:
    """A titled group box and its layout."""
    box = QGroupBox(title)
    lay = QVBoxLayout(box)
    lay.setContentsMargins(8, 6, 8, 8)
    lay.setSpacing(6)
    return box, lay


def scrolling_body(widget: QWidget) -> tuple:
    """Give a dock a vertically scrolling body: returns (outer layout, scroll area, body layout)."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = VScrollArea()
    outer.addWidget(scroll)
    inner = QWidget()
    scroll.setWidget(inner)
    body = QVBoxLayout(inner)
    body.setContentsMargins(6, 6, 6, 6)
    return outer, scroll, body


def wrap_label(text: str = "", color: Optional[str] = None, small: bool = False) -> QLabel:
    """A word-wrapping rich-text label, optionally coloured and small."""
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setTextFormat(Qt.TextFormat.RichText)
    lab.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    style = []
    if color:
        style.append(f"color: {color};")
    if small:
        style.append("font-size: 11px;")
    if style:
        lab.setStyleSheet(" ".join(style))
    return lab


def weights_row(tooltip: str, browse_tooltip: Optional[str] = None) -> tuple[QHBoxLayout, QLineEdit, QPushButton]:
    """A network-weights path field (empty = the built-in checkpoint) and its "…" browse button, in a row."""
    row = QHBoxLayout()
    edit = QLineEdit()
    edit.setPlaceholderText("built-in checkpoint")
    edit.setToolTip(tooltip)
    browse = QPushButton("…")
    browse.setMaximumWidth(30)
    if browse_tooltip:
        browse.setToolTip(browse_tooltip)
    row.addWidget(edit)
    row.addWidget(browse)
    return row, edit, browse


def pick_weights_file(parent: QWidget, title: str, edit: QLineEdit) -> None:
    """Ask for a weights file (.pt / .pth) and put its path into ``edit`` (unchanged when cancelled)."""
    path, _ = QFileDialog.getOpenFileName(parent, title, "", "PyTorch weights (*.pt *.pth)")
    if path:
        edit.setText(path)


def spin_box(name: str, lo: float, hi: float, value: float, *, decimals: int, suffix: str, tooltip: str,
             step: Optional[float] = None) -> QDoubleSpinBox:
    """A number field that reports a value only when typing ends (keyboard tracking off)."""
    spin = QDoubleSpinBox()
    spin.setObjectName(name)
    spin.setRange(lo, hi)
    spin.setDecimals(decimals)
    if step is not None:
        spin.setSingleStep(step)
    spin.setSuffix(suffix)
    spin.setValue(value)
    spin.setKeyboardTracking(False)
    spin.setToolTip(tooltip)
    return spin


def field_strength_spin(value: float, tooltip: str) -> QDoubleSpinBox:
    """The field strength B0 in tesla (0.05 … 21.1 T)."""
    return spin_box("b0_tesla", 0.05, 21.1, value, decimals=4, suffix=" T", step=0.1, tooltip=tooltip)


def device_combo() -> QComboBox:
    """Drop-down of the devices present on this machine (item data: the device value)."""
    combo = QComboBox()
    for value, label in available_devices():
        combo.addItem(label, value)
    combo.setToolTip("Where the numerics run (only devices present on this machine)")
    return combo


def run_footer(outer: QVBoxLayout, top: Optional[QWidget] = None,
               extra: Optional[QHBoxLayout] = None) -> tuple[QPushButton, QPushButton, QLabel]:
    """A dock's footer, always visible under its scrolling body: [top], Run / Cancel, [extra row], status.

    Returns (Run button, Cancel button (disabled until a run starts), status label).
    """
    footer = QFrame()
    footer.setFrameShape(QFrame.Shape.NoFrame)
    flay = QVBoxLayout(footer)
    flay.setContentsMargins(8, 4, 8, 6)
    if top is not None:
        flay.addWidget(top)
    buttons = QHBoxLayout()
    run_button = QPushButton("Run")
    cancel_button = QPushButton("Cancel")
    cancel_button.setEnabled(False)
    buttons.addWidget(run_button)
    buttons.addWidget(cancel_button)
    flay.addLayout(buttons)
    if extra is not None:
        flay.addLayout(extra)
    status = wrap_label("", small=True)
    status.setMinimumHeight(30)
    flay.addWidget(status)
    outer.addWidget(footer)
    return run_button, cancel_button, status


def show_failure(status: QLabel, msg: str) -> None:
    """A run could not start or failed: red line in the dock's status label, and a napari error notification."""
    status.setText(f"<span style='color:{ERR_COLOR}'>✗ {html.escape(msg)}</span>")
    notify_error(f"napari-qsm: {msg}")


def relabel_form(form, label: Callable[[str], str]) -> None:
    """Put ``label(name)`` on the rows of a generated parameter form (the tooltips stay the records' docs)."""
    for name in form.names():
        w = form.widget_for(name)
        for lay in form.findChildren(QFormLayout):
            lab = lay.labelForField(w)
            if isinstance(lab, QLabel):
                lab.setText(label(name))


class VScrollArea(QScrollArea):
    """Scroll area asking for the width its content needs (a horizontal bar only when squeezed)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)

    def _extra(self) -> int:
        return self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth() + 2

    def minimumSizeHint(self) -> QSize:
        w = self.widget()
        base = super().minimumSizeHint()
        if w is None:
            return base
        return QSize(w.minimumSizeHint().width() + self._extra(), base.height())

    def sizeHint(self) -> QSize:
        w = self.widget()
        if w is None:
            return super().sizeHint()
        hint = w.sizeHint()
        return QSize(hint.width() + self._extra(), min(hint.height(), 900))


class LayerCombo(QComboBox):
    """Drop-down of the viewer's 3-D layers that pass ``accept``; keeps the choice by name."""

    def __init__(self, viewer, accept, optional: bool = False, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.accept = accept
        self.optional = optional
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)

    def candidates(self) -> list:
        return [lay for lay in self.viewer.layers if is_volume(lay) and self.accept(lay)]

    def refresh(self) -> None:
        current = self.currentText()
        names = ([NONE_TEXT] if self.optional else []) + [lay.name for lay in reversed(self.candidates())]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentIndex(names.index(current))
        else:  # nothing chosen yet, or the chosen layer is gone: let the panel pick by role
            self.setCurrentIndex(0 if self.optional else -1)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self):
        name = self.currentText()
        if not name or name == NONE_TEXT or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def select(self, layer) -> None:
        name = NONE_TEXT if layer is None else layer.name
        i = self.findText(name)
        if i >= 0:
            self.setCurrentIndex(i)
