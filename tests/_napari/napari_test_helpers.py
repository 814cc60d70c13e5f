"""Shared helpers of the napari plugin tests (constants, NIfTI writing, a slow test method)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_qsm.core.params import param
from napari_qsm.core.progress import Reporter

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "napari.yaml"

TINY_SHAPE = (32, 36, 28)
TINY_VS = (1.5, 1.5, 1.8)  # anisotropic; the phantom needs ≥ 40 mm of field of view
RAW_SHAPE, RAW_VS = (40, 48, 40), (4.0, 4.0, 4.0)  # the raw multi-echo head of the Field dock tests
OBLIQUE_B0 = np.array([0.25, -0.30, 0.92]) / np.linalg.norm([0.25, -0.30, 0.92])
# Stored (on-disk) orientation of the oblique files: sagittal-like, P-S-L, so that reading them
# reorients (permutes and flips) the axes.
STORED_AXCODES = ("P", "S", "L")


def save_stored(data, canonical_affine, path, axcodes=STORED_AXCODES, dtype=np.float32):
    """Write a canonical-frame array to ``path`` stored in another voxel orientation."""
    img = nib.Nifti1Image(np.asarray(data, dtype), canonical_affine)
    target = nib.orientations.axcodes2ornt(axcodes)
    img = img.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(canonical_affine), target))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return Path(path)


def add_layer_data(viewer, layer_data):
    out = []
    for data, kw, typ in layer_data:
        out.append(getattr(viewer, f"add_{typ}")(data, **kw))
    return out


# -- a slow, cancellable test method exercising every kind of parameter ---------------------------

@dataclass
class SlowParams:
    steps: int = param(50, "number of steps", min=1, max=100000)
    delay: float = param(0.02, "seconds per step", min=0.0, max=1.0)
    mode: str = param("a", "a mode", choices=("a", "b"))
    strength: float | str = param(1.0, "a number or 'auto'", min=0.0, max=1e6, allow=("auto",))
    flag: bool = param(False, "a switch")
    fail_at: int = param(0, "raise at this step (0 = never)", min=0, max=100000)
    secret: int = param(7, "not shown", widget="hidden")


def _slow_run(scan, p: SlowParams, *, device, progress=None, cancel=None, **_):
    rep = Reporter(progress, cancel, total=p.steps, stage="slow")
    for i in range(p.steps):
        time.sleep(p.delay)
        if p.fail_at and i + 1 == p.fail_at:
            raise RuntimeError(f"slowtest failed on purpose at step {i + 1}")
        rep(i + 1, f"slow step {i + 1}/{p.steps}", preview=scan.field * 0.5 if i % 5 == 0 else None,
            loss=1.0 / (i + 1))
    return {"chi": scan.field * scan.mask, "extras": {"residual": scan.field * 0.0, "note": "ok"}}


def start_ticks(interval_ms: int = 20):
    """Start a QTimer that appends ``time.perf_counter()`` to a list every ``interval_ms``.

    Returns (timer, ticks): keep the timer referenced while it runs, pass ``ticks`` to
    :func:`assert_responsive`, and stop the timer when done.
    """
    from qtpy.QtCore import QTimer

    ticks: list = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(interval_ms)
    return timer, ticks


def assert_responsive(qtbot, ticks: list, seconds: float = 4.0, max_gap: float = 3.0) -> None:
    """A 20 ms QTimer appending to ``ticks`` kept firing during ``seconds`` of a background run.

    A solver on the GUI thread blocks the event loop for the whole run (one gap as long as the
    window). On this shared, loaded 2-core machine a background run only thins the ticks out
    (gaps up to ~1-2 s were seen, from CPU and GIL contention), so the check is a generous bound on
    the largest gap plus a minimum tick count.
    """
    t0 = time.perf_counter()
    qtbot.wait(int(seconds * 1000))
    t1 = time.perf_counter()
    recent = [t0] + [t for t in ticks if t0 <= t <= t1] + [t1]
    gaps = np.diff(recent)
    assert len(recent) - 2 >= 10, f"only {len(recent) - 2} timer ticks in {seconds} s"
    assert gaps.max() < max_gap, f"event loop blocked for {gaps.max():.2f} s during the run"


def form_row_labels(form) -> list[str]:
    """The row label texts of a generated ParamForm, one per parameter that has a labelled row."""
    from qtpy.QtWidgets import QFormLayout, QLabel

    texts = []
    for name in form.names():
        for lay in form.findChildren(QFormLayout):
            lab = lay.labelForField(form.widget_for(name))
            if isinstance(lab, QLabel):
                texts.append(lab.text())
    return texts
