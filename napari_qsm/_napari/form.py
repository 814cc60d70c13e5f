"""A Qt form generated from a method's parameter record (:func:`napari_qsm.core.params.specs`).

No per-method code: each :class:`~napari_qsm.core.params.ParamSpec` becomes one row.

* bool → check box; ``choices`` → drop-down;
* int / float with a moderate range → spin box (range, step and decimals from the spec);
* numbers that also accept words (``allow``, e.g. λ = "auto") → editable drop-down;
* numbers spanning many decades, strings, anything else → text field.

Fields marked ``widget="hidden"`` get no row; fields marked ``widget="advanced"`` go into a folded
"Advanced" section under the others (one click opens it), so a dock shows the few parameters a
user changes and keeps the research knobs at hand.

Every row carries the spec's one-line doc (and range) as tooltip. Values are validated with the
core's own :func:`~napari_qsm.core.params.validate_value` as they are typed; a bad row turns red
and :meth:`ParamForm.errors` names it. :meth:`ParamForm.values` returns public-name values for
:func:`~napari_qsm.core.params.make_params`.
"""

from __future__ import annotations

import math
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QLineEdit,
                            QSpinBox, QToolButton, QVBoxLayout, QWidget)

from ..core.params import ParamError, ParamSpec, specs, validate_value

_BAD_STYLE = "border: 1px solid #d9534f;"


#: drop-down entries in words where the record's value is a code name (the value stays the item's data)
CHOICE_WORDS = {"dsbn": "QSMInvNet+ (DSBN)", "finetune": "QSMInvNet fine-tune", "uqsm": "uQSM (no labels)"}


def label_for(name: str) -> str:
    """A parameter name in words, capitalised, a unit suffix in brackets
    (``cg_max_iter`` → ``Cg max iter``, ``smv_mm`` → ``Smv (mm)``, ``memory_gb`` → ``Memory (GB)``)."""
    words = name.split("_")
    unit = words.pop() if len(words) > 1 and words[-1] in ("mm", "ms", "ppm", "gb") else None
    text = " ".join(words)
    text = text[:1].upper() + text[1:]
    return f"{text} ({'GB' if unit == 'gb' else unit})" if unit else text


def pretty_name(spec: ParamSpec) -> str:
    """Row label of a generated form (docks may put hand-written labels on top)."""
    return label_for(spec.name)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def tooltip(spec: ParamSpec) -> str:
    bits = [f"<b>{spec.name}</b>: {spec.doc}"]
    rng = []
    if spec.min is not None:
        rng.append(f"min {_fmt(spec.min)}")
    if spec.max is not None:
        rng.append(f"max {_fmt(spec.max)}")
    if spec.choices:
        rng.append("one of " + ", ".join(_fmt(c) for c in spec.choices))
    if spec.allow:
        rng.append("or " + ", ".join(spec.allow))
    rng.append(f"default {_fmt(spec.default)}")
    bits.append("(" + "; ".join(rng) + ")")
    return "<qt>" + " ".join(bits) + "</qt>"


def _n_decimals(v: float) -> int:
    text = f"{abs(v):.10g}"
    if "e" in text:
        exp = int(text.split("e")[1])
        return max(0, -exp)
    return len(text.split(".")[1]) if "." in text else 0


def _decimals_for(spec: ParamSpec) -> int:
    """Enough decimals to show the default and the minimum exactly (2 … 6)."""
    vals = [v for v in (spec.default, spec.min) if isinstance(v, (int, float)) and not isinstance(v, bool) and v]
    return int(min(6, max([2] + [_n_decimals(float(v)) for v in vals])))


def _spin_ok(spec: ParamSpec) -> bool:
    """A spin box suits a float with a finite range not spanning too many decades."""
    if spec.min is None or spec.max is None:
        return False
    lo = max(abs(spec.min), 10 ** -_decimals_for(spec))
    return spec.max / lo <= 1e5 and spec.max <= 1e5


class _Row:
    def __init__(self, spec: ParamSpec, widget: QWidget, get, set_, kind: str):
        self.spec = spec
        self.widget = widget
        self.get = get
        self.set = set_
        self.kind = kind


class ParamForm(QWidget):
    """Form for one parameter record class. ``changed`` fires on every edit."""

    changed = Signal()

    def __init__(self, params_cls=None, parent=None):
        super().__init__(parent)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(4)
        self._layout = QFormLayout()
        self._layout.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        outer.addLayout(self._layout)
        # the folded "Advanced" section: a toggle and a second form under it
        self.advanced_toggle = QToolButton()
        self.advanced_toggle.setObjectName("advanced_toggle")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_toggle.setAutoRaise(True)
        self.advanced_toggle.toggled.connect(self.show_advanced)
        outer.addWidget(self.advanced_toggle)
        self.advanced_box = QWidget()
        self._adv_layout = QFormLayout(self.advanced_box)
        self._adv_layout.setContentsMargins(12, 0, 0, 0)
        self._adv_layout.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        outer.addWidget(self.advanced_box)
        self.advanced_box.setVisible(False)
        self.advanced_toggle.setVisible(False)
        self._rows: list[_Row] = []
        self.params_cls = None
        if params_cls is not None:
            self.set_params_cls(params_cls)

    # -- building ---------------------------------------------------------------------------
    def set_params_cls(self, params_cls, values: dict | None = None) -> None:
        for lay in (self._layout, self._adv_layout):
            while lay.rowCount():
                lay.removeRow(0)
        self._rows = []
        self.params_cls = params_cls
        n_adv = 0
        for spec in specs(params_cls):
            if spec.widget == "hidden":
                continue
            row = self._make_row(spec)
            label = QLabel(pretty_name(spec))
            label.setToolTip(tooltip(spec))
            row.widget.setToolTip(tooltip(spec))
            row.widget.setObjectName(f"param_{spec.name}")
            if spec.widget == "advanced":
                self._adv_layout.addRow(label, row.widget)
                n_adv += 1
            else:
                self._layout.addRow(label, row.widget)
            self._rows.append(row)
        self.advanced_toggle.setText(f"Advanced ({n_adv})")
        self.advanced_toggle.setToolTip("Research parameters with sensible defaults; open to change them")
        self.advanced_toggle.setVisible(n_adv > 0)
        self.show_advanced(self.advanced_toggle.isChecked() and n_adv > 0)
        if values:
            self.set_values(values)
        self._revalidate()

    def _make_row(self, spec: ParamSpec) -> _Row:
        t = spec.type
        if t is bool:
            w = QCheckBox()
            w.setChecked(bool(spec.default))
            w.toggled.connect(self._on_edit)
            return _Row(spec, w, w.isChecked, lambda v: w.setChecked(bool(v)), "bool")
        if spec.choices:
            w = QComboBox()
            for c in spec.choices:
                w.addItem(CHOICE_WORDS.get(c, _fmt(c)) if isinstance(c, str) else _fmt(c), c)
            w.setCurrentIndex(max(0, list(spec.choices).index(spec.default)) if spec.default in spec.choices else 0)
            w.currentIndexChanged.connect(self._on_edit)

            def set_choice(v, w=w, spec=spec):
                for i in range(w.count()):
                    if w.itemData(i) == v or w.itemText(i) == _fmt(v):
                        w.setCurrentIndex(i)
                        return
            return _Row(spec, w, w.currentData, set_choice, "choice")
        if spec.allow and t in (int, float):
            w = QComboBox()
            w.setEditable(True)
            w.addItem(_fmt(spec.default))
            for a in spec.allow:
                if a != spec.default:
                    w.addItem(a)
            w.setCurrentIndex(0)
            w.currentTextChanged.connect(self._on_edit)
            return _Row(spec, w, lambda w=w: w.currentText().strip(), lambda v, w=w: w.setCurrentText(_fmt(v)), "text")
        if t is int and spec.min is not None and spec.max is not None and spec.max <= 2**31 - 1:
            w = QSpinBox()
            w.setRange(int(spec.min), int(spec.max))
            w.setValue(int(spec.default))
            w.setKeyboardTracking(False)
            w.valueChanged.connect(self._on_edit)
            return _Row(spec, w, w.value, lambda v, w=w: w.setValue(int(v)), "int")
        if t is float and _spin_ok(spec):
            w = QDoubleSpinBox()
            dec = _decimals_for(spec)
            w.setDecimals(dec)
            w.setRange(float(spec.min), float(spec.max))
            span = spec.max - spec.min
            step = 10 ** math.floor(math.log10(abs(spec.default))) / 10 if spec.default else 10 ** -dec
            w.setSingleStep(max(step, 10 ** -dec, span / 1e4))
            w.setValue(float(spec.default))
            w.setKeyboardTracking(False)
            w.valueChanged.connect(self._on_edit)
            return _Row(spec, w, w.value, lambda v, w=w: w.setValue(float(v)), "float")
        w = QLineEdit(_fmt(spec.default) if spec.default is not None else "")
        w.textChanged.connect(self._on_edit)
        return _Row(spec, w, lambda w=w: w.text().strip(), lambda v, w=w: w.setText(_fmt(v)), "text")

    # -- values ---------------------------------------------------------------------------
    def raw_values(self) -> dict:
        return {r.spec.name: r.get() for r in self._rows}

    def row_errors(self) -> dict:
        errs = {}
        for r in self._rows:
            try:
                validate_value(r.spec, r.get())
            except ParamError as exc:
                errs[r.spec.name] = str(exc)
            except Exception as exc:  # unexpected conversion problem
                errs[r.spec.name] = f"parameter '{r.spec.name}': {exc}"
        return errs

    def errors(self) -> list[str]:
        return list(self.row_errors().values())

    def values(self) -> dict:
        """Validated values by public name (raises ParamError naming the first bad one)."""
        out = {}
        for r in self._rows:
            out[r.spec.name] = validate_value(r.spec, r.get())
        return out

    def set_values(self, values: dict) -> None:
        by_name = {r.spec.name: r for r in self._rows}
        for k, v in (values or {}).items():
            if k in by_name:
                by_name[k].set(v)
        self._revalidate()

    def reset(self) -> None:
        for r in self._rows:
            r.set(r.spec.default)
        self._revalidate()

    def widget_for(self, name: str) -> QWidget:
        for r in self._rows:
            if r.spec.name == name:
                return r.widget
        raise KeyError(name)

    def names(self) -> list[str]:
        return [r.spec.name for r in self._rows]

    def advanced_names(self) -> list[str]:
        """Names of the rows in the folded "Advanced" section."""
        return [r.spec.name for r in self._rows if r.spec.widget == "advanced"]

    def show_advanced(self, show: bool = True) -> None:
        """Unfold (or fold) the "Advanced" section."""
        show = bool(show)
        if self.advanced_toggle.isChecked() != show:
            self.advanced_toggle.setChecked(show)  # re-enters through toggled
            return
        self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if show else Qt.ArrowType.RightArrow)
        self.advanced_box.setVisible(show)

    # -- validation ---------------------------------------------------------------------------
    def _on_edit(self, *_):
        self._revalidate()
        self.changed.emit()

    def _revalidate(self) -> None:
        errs = self.row_errors()
        for r in self._rows:
            bad = r.spec.name in errs
            r.widget.setStyleSheet(_BAD_STYLE if bad else "")
            tip = tooltip(r.spec)
            if bad:
                tip = tip[:-5] + f"<br><span style='color:#d9534f'>{errs[r.spec.name]}</span></qt>"
            r.widget.setToolTip(tip)
        if any(r.spec.widget == "advanced" and r.spec.name in errs for r in self._rows):
            self.show_advanced(True)  # a bad value is never folded away
