"""How the plugin's docks share napari's window.

The docks (QSM reconstruction, Field, Adapt network, Compare: the tab order, from
``qsm_dock_order``) are tall forms. Stacked one above
the other on the right they squeezed each other to a row apiece and pushed the window past the
screen, so every dock of this plugin joins the others as a tab (one tab bar on the right; napari's
own docks and other plugins' docks are left alone), and the window is kept inside the screen.

Each dock widget inherits :class:`QSMDock`; the arrangement happens when the dock is first shown,
so it holds however the dock was opened (Plugins menu, ``add_plugin_dock_widget``,
``napari-qsm view``). A dock the user floats or moves stays where they put it.

:func:`toggle_large` floats a dock as a large window over most of the screen (and docks it back):
the Compare dock uses it for its slice panel.
"""

from __future__ import annotations

from typing import Optional

from qtpy.QtCore import QRect, QTimer
from qtpy.QtWidgets import QDockWidget, QMainWindow, QWidget


def dock_of(widget: QWidget) -> Optional[QDockWidget]:
    """The QDockWidget that holds ``widget`` (None when it is not docked)."""
    w = widget.parentWidget() if widget is not None else None
    while w is not None and not isinstance(w, QDockWidget):
        w = w.parentWidget()
    return w


def _main_window(dock: QDockWidget) -> Optional[QMainWindow]:
    w = dock.parentWidget()
    while w is not None and not isinstance(w, QMainWindow):
        w = w.parentWidget()
    return w


def qsm_docks(window: QMainWindow) -> list:
    """The window's dock widgets that hold one of this plugin's docks, in tab order."""
    out = []
    for w in window.findChildren(QWidget):
        if isinstance(w, QSMDock):
            d = dock_of(w)
            if d is not None and d not in [x for _, x in out]:
                out.append((getattr(w, "qsm_dock_order", 9), d))
    return [d for _, d in sorted(out, key=lambda t: t[0])]


def _plugin_widgets(dock: QDockWidget) -> list:
    return [w for w in dock.findChildren(QWidget) if isinstance(w, QSMDock)]


def call_later(owner, ms: int, fn) -> None:
    """Call ``fn`` after ``ms`` ms on a single-shot timer that is ``owner``'s child: when ``owner`` is
    deleted first the call is dropped with it. When it fires the timer lets go of ``fn`` (and of what
    ``fn`` holds) at once, before it is deleted."""
    t = QTimer(owner)
    t.setSingleShot(True)

    def fire():
        try:
            t.timeout.disconnect()
        except (RuntimeError, TypeError):
            pass
        t.deleteLater()
        fn()

    t.timeout.connect(fire)
    t.start(int(ms))


def raise_dock(widget: QWidget) -> None:
    """Bring ``widget``'s dock to the front of its tab group."""
    try:
        dock = dock_of(widget)
        if dock is not None:
            dock.show()
            dock.raise_()
    except RuntimeError:  # the widget was deleted in the meantime
        pass


def available_geometry(widget: QWidget) -> Optional[QRect]:
    screen = widget.screen() if hasattr(widget, "screen") else None
    if screen is None:
        from qtpy.QtGui import QGuiApplication
        screen = QGuiApplication.primaryScreen()
    return screen.availableGeometry() if screen is not None else None


def _short_title(widget, dock: QDockWidget) -> None:
    """A tab title a person reads at a glance ("Compare", not "Compare (napari-qsm)")."""
    title = getattr(widget, "qsm_dock_title", None)
    if title and dock.windowTitle() != title:
        dock.setWindowTitle(title)


def fit_to_screen(window: QWidget) -> None:
    """Shrink (and move) the window so that it lies inside the screen's available area."""
    avail = available_geometry(window)
    if avail is None or window.isMaximized() or window.isFullScreen():
        return
    if window.layout() is not None:
        window.layout().activate()  # the minimum size the window keeps comes from its (updated) layout
    frame = window.frameGeometry()
    extra_w = max(0, frame.width() - window.width())
    extra_h = max(0, frame.height() - window.height())
    w = min(window.width(), avail.width() - extra_w)
    h = min(window.height(), avail.height() - extra_h)
    if (w, h) != (window.width(), window.height()):
        window.resize(w, h)
    frame = window.frameGeometry()
    x = min(max(frame.x(), avail.x()), avail.right() - frame.width() + 1)
    y = min(max(frame.y(), avail.y()), avail.bottom() - frame.height() + 1)
    if (x, y) != (frame.x(), frame.y()):
        window.move(x, y)


def arrange(widget: QWidget) -> None:
    """Tabify ``widget``'s dock with the plugin's other docks in the same area; keep the window on screen."""
    dock = dock_of(widget)
    if dock is None or dock.isFloating():
        return
    win = _main_window(dock)
    if win is None:
        return
    area = win.dockWidgetArea(dock)
    _short_title(widget, dock)
    group = [d for d in qsm_docks(win)
             if (d is dock or (not d.isFloating() and not d.isHidden())) and win.dockWidgetArea(d) == area]
    # tabify in the plugin's order (reconstruction, field, adapt, compare): each joins the first one's tabs
    moved = []
    anchor = group[0]
    prev = anchor
    for d in group[1:]:
        if anchor not in win.tabifiedDockWidgets(d):
            win.tabifyDockWidget(prev, d)
            moved.append(d)
        prev = d
    if moved:
        # several opened at once (napari-qsm view): the one the data call for (raw echoes: Field), else the
        # first; one opened later: show it
        wanted = [d for d in group if any(w.wants_front() for w in _plugin_widgets(d))]
        front = (wanted[0] if wanted else anchor) if len(moved) > 1 else moved[0]
        front.show()
        front.raise_()
    fit_to_screen(win)
    # the layout takes the smaller minimum (tabs, not a stack) on the next passes: fit again then
    call_later(win, 50, lambda: _safe_fit(win))


def _safe_fit(win) -> None:
    try:
        fit_to_screen(win)
    except RuntimeError:
        pass


def toggle_large(widget: QWidget, large: bool, fraction: float = 0.85) -> bool:
    """Float ``widget``'s dock as a window over ``fraction`` of the screen (``large``) or dock it back.

    Returns whether the dock is now large (False when the widget is not in a dock).
    """
    dock = dock_of(widget)
    if dock is None:
        return False
    if not large:
        if dock.isFloating():
            dock.setFloating(False)
            win = _main_window(dock)
            if win is not None:
                call_later(win, 0, lambda: _safe_fit(win))
        return False
    avail = available_geometry(dock)
    dock.setFloating(True)
    if avail is not None:
        w, h = int(avail.width() * fraction), int(avail.height() * fraction)
        dock.setGeometry(avail.x() + (avail.width() - w) // 2, avail.y() + (avail.height() - h) // 2, w, h)
    dock.show()
    dock.raise_()
    return True


class QSMDock:
    """Mixin for the plugin's dock widgets: join the others as a tab when first shown (see module doc)."""

    qsm_dock_order = 9
    qsm_dock_title: Optional[str] = None

    def wants_front(self) -> bool:
        """Whether the open data call for this dock first (opened with the others, it is shown in front)."""
        return False

    def showEvent(self, event) -> None:  # noqa: N802 - Qt name
        super().showEvent(event)
        if not getattr(self, "_qsm_arranged", False):
            self._qsm_arranged = True
            call_later(self, 0, lambda: _safe_arrange(self))


def _safe_arrange(widget) -> None:
    try:
        arrange(widget)
    except RuntimeError:  # the widget was deleted in the meantime
        pass
