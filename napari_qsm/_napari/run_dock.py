"""The dock base: one job at a time in a worker, with Run / Cancel, a status line and progress.

:class:`RunDock` is what the Reconstruct, Field and Adapt docks share: a scrolling body, a footer
with Run / Cancel and a status line, the worker (:class:`~napari_qsm._napari.workers.JobRunner`:
napari progress bar, cancel, never blocking the event loop), failures shown as a red line and a
notification, progress records shown with :meth:`~napari_qsm.core.progress.Progress.format`.
"""

from __future__ import annotations

import html
from typing import Callable, Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHBoxLayout, QWidget

from ..core.params import ParamError, make_params
from .docks import QSMDock, call_later
from .kit import WARN_COLOR, run_footer, scrolling_body, show_failure
from .workers import JobRunner

__all__ = ["RunDock", "PreviewLayer", "scan_and_params"]


class RunDock(QSMDock, QWidget):
    """Base of the docks that run one job at a time (see module doc).

    Subclasses build their sections into ``self.body``, call :meth:`add_footer` once, and list the
    widgets a run disables in :meth:`running_widgets`.
    """

    min_width = 320

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.runner = JobRunner(napari_viewer)
        self._outer, self._scroll, self.body = scrolling_body(self)
        runner = self.runner
        self.destroyed.connect(lambda *_: runner.cancel(detach=True))  # dock closed: stop the run

    def add_footer(self, top: Optional[QWidget] = None, extra: Optional[QHBoxLayout] = None) -> None:
        """Run / Cancel and the status line, always visible under the scrolling body."""
        self.run_button, self.cancel_button, self.status = run_footer(self._outer, top=top, extra=extra)
        self.run_button.setObjectName("run_button")
        self.cancel_button.setObjectName("cancel_button")
        self.status.setObjectName("status_label")
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)

    # -- sizing -------------------------------------------------------------------------------
    def _fit_width(self) -> None:
        """Ask the dock for the width the content needs, so nothing is clipped on the right."""
        self.setMinimumWidth(max(self.min_width, self._scroll.minimumSizeHint().width()))

    def showEvent(self, event) -> None:  # noqa: N802 - Qt name
        super().showEvent(event)
        # the napari style sheet (fonts, padding) applies once the dock is shown: measure again
        call_later(self, 0, self._fit_width)

    # -- running ------------------------------------------------------------------------------
    def run(self) -> bool:  # pragma: no cover - every dock has its own
        raise NotImplementedError

    def running_widgets(self) -> list:
        """The widgets a run disables (besides Run)."""
        return []

    def start(self, job: Callable, description: str, status: str, on_result: Callable, *,
              on_progress: Optional[Callable] = None, total: Optional[int] = None) -> None:
        """Run ``job(progress)`` in the worker; ``status`` (HTML) shows until the first progress record."""
        self._set_running(True)
        self.status.setText(status)
        self.runner.start(job, description=description, total=total, on_progress=on_progress or self._on_progress,
                          on_result=on_result, on_error=self._on_error, on_cancelled=self._on_cancelled,
                          on_finished=self._on_finished)

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for w in self.running_widgets():
            w.setEnabled(not running)

    def _on_progress(self, p) -> None:
        self.status.setText(html.escape(p.format()))

    def _on_finished(self) -> None:
        self._set_running(False)

    def _fail(self, msg: str) -> None:
        show_failure(self.status, msg)

    def cancel(self) -> None:
        if self.runner.running:
            self.status.setText("cancelling…")
            self.runner.cancel()

    def _on_error(self, exc) -> None:
        msg = str(exc) if isinstance(exc, ValueError) and str(exc) else f"{type(exc).__name__}: {exc}"
        self._fail(msg)

    def _on_cancelled(self) -> None:
        self.status.setText(f"<span style='color:{WARN_COLOR}'>cancelled</span>; nothing was added")


def scan_and_params(dock, params_cls, errors: tuple = (ParamError, ValueError)) -> Optional[tuple]:
    """(Scan from ``dock.inputs``, parameter record from ``dock.form``), or None after ``dock._fail(why)``."""
    scan = dock.inputs.validate()
    if scan is None:
        dock._fail(dock.inputs.last_error or "invalid inputs")
        return None
    try:
        params = make_params(params_cls, dock.form.values())
    except errors as exc:
        dock._fail(str(exc))
        return None
    return scan, params


class PreviewLayer:
    """A temporary image layer showing a solver's preview (χ estimate) while it runs."""

    def __init__(self, viewer, name: str, min_interval: float = 0.7):
        self.viewer = viewer
        self.name = name
        self.layer = None
        self.min_interval = min_interval
        self._last = 0.0

    def update(self, array, reference_layer) -> None:
        import time

        from .layers import CHI_CONTRAST, derived_layer_kwargs, layer_geometry, to_layer_order

        now = time.perf_counter()
        if now - self._last < self.min_interval:
            return
        self._last = now
        geom = layer_geometry(reference_layer)
        data = to_layer_order(np.asarray(array, np.float32), geom.axes)
        if self.layer is not None and self.layer in self.viewer.layers and self.layer.data.shape == data.shape:
            self.layer.data = data
            return
        kw = derived_layer_kwargs(reference_layer, name=self.name, role="preview")
        self.layer = self.viewer.add_image(data, colormap="gray", contrast_limits=CHI_CONTRAST, **kw)
        bar = getattr(self.layer, "colorbar", None)  # a χ estimate: its ±0.15 ppm scale, as the result's
        if bar is not None:
            bar.visible = True

    def show_progress(self, p, reference_layer) -> None:
        """Show the χ preview a Progress record carries, if any (a preview problem never breaks the run)."""
        if p.preview is None or np.ndim(p.preview) != 3:
            return
        try:
            self.update(p.preview, reference_layer)
        except Exception:
            pass

    def remove(self) -> None:
        if self.layer is not None and self.layer in self.viewer.layers:
            self.viewer.layers.remove(self.layer)
        self.layer = None

