"""The "Adapt network" dock: a few adaptation steps on a tiny phantom, loss plot, preview, save/use, cancel."""

import json

import numpy as np
import pytest

pytest.importorskip("napari_qsm.nn.adapt")
torch = pytest.importorskip("torch")

from napari_qsm._napari.adapt_widget import AdaptWidget  # noqa: E402
from napari_qsm._napari.reconstruct_dock import QSMWidget  # noqa: E402
from napari_test_helpers import assert_responsive, form_row_labels, start_ticks  # noqa: E402

FAST = {"patch": 32, "synth_batch": 0, "preview_every": 1}


def _dock(viewer, qtbot, ckpt):
    w = AdaptWidget(viewer)
    viewer.window.add_dock_widget(w, name="Adapt network")
    qtbot.waitUntil(lambda: "ready" in w.inputs.message.text(), timeout=5000)
    w.weights_edit.setText(str(ckpt))
    return w


def test_adapt_end_to_end_save_and_use(phantom_viewer, qtbot, tiny_checkpoint, tmp_path):
    w = _dock(phantom_viewer, qtbot, tiny_checkpoint)
    assert {"steps", "lr", "lam_start", "lam_end", "mode"} <= set(w.form.names())  # generated form
    w.form.set_values(dict(FAST, steps=3))
    assert w.run()
    assert not w.run_button.isEnabled() and w.cancel_button.isEnabled() and not w.save_button.isEnabled()
    qtbot.waitUntil(lambda: "adapt (preview)" in phantom_viewer.layers, timeout=120000)
    qtbot.waitUntil(lambda: not w.runner.running, timeout=180000)
    assert "adapt (preview)" not in phantom_viewer.layers
    chi = phantom_viewer.layers[-1]
    assert chi.name.startswith("QSMInvNet+ adapted (3 steps)"), w.status.text()
    assert "adapted 3 steps" in w.status.text(), w.status.text()
    assert chi.metadata["provenance"]["method"] == "dsbn_adapt"
    assert chi.data.shape == phantom_viewer.layers["phantom field"].data.shape
    # the per-step time was measured on the first steps and is stated
    assert "per step" in w.estimate.text() and "3 steps take about" in w.estimate.text(), w.estimate.text()
    steps, lt = w.plot.series("L_T")
    assert list(steps) == [1, 2, 3] and np.all(np.isfinite(lt))
    _, lam = w.plot.series("lambda")
    assert lam[0] < lam[-1]  # λ schedule rises
    assert w.save_button.isEnabled() and w.use_button.isEnabled()
    out = w.save_weights(tmp_path / "adapted.pt")
    assert out.exists() and out.with_suffix(".json").exists()
    card = json.loads(out.with_suffix(".json").read_text())
    assert isinstance(card, dict) and card  # the JSON card (schema owned by napari_qsm.nn.adapt)
    target = w.use_weights()
    assert isinstance(target, QSMWidget)
    assert target.method().name == "dsbn" and target.weights_edit.text() == str(out)
    n = len(phantom_viewer.layers)
    assert target.inputs.input_names()["field"] == "phantom field"
    assert target.run()
    qtbot.waitUntil(lambda: not target.runner.running, timeout=120000)
    assert len(phantom_viewer.layers) == n + 1, (target.status.text(), target.inputs.input_names())
    assert phantom_viewer.layers[-1].metadata["provenance"]["method"] == "dsbn"


def test_adapt_cancel_keeps_state_and_gui_responsive(phantom_viewer, qtbot, tiny_checkpoint, tmp_path):
    w = _dock(phantom_viewer, qtbot, tiny_checkpoint)
    w.form.set_values(dict(FAST, steps=500, preview_every=0))
    timer, ticks = start_ticks()
    n = len(phantom_viewer.layers)
    assert w.run()
    qtbot.waitUntil(lambda: len(w.plot.rows) >= 1, timeout=120000)
    assert_responsive(qtbot, ticks)
    w.cancel_button.click()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=30000)
    timer.stop()
    assert "cancelled" in w.status.text()
    assert len(phantom_viewer.layers) == n
    assert w.adapted is not None and w.adapted.cancelled and w.save_button.isEnabled()
    assert w.save_weights(tmp_path / "partial.pt").exists()


def test_adapt_bad_weights_is_a_notification(phantom_viewer, qtbot, tmp_path, monkeypatch):
    seen = []
    import napari.utils.notifications as nt
    monkeypatch.setattr(nt, "show_error", lambda msg: seen.append(str(msg)))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    w = _dock(phantom_viewer, qtbot, bad)
    w.form.set_values(dict(FAST, steps=2))
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=30000)
    assert seen and "weights" in seen[-1]
    assert not w.save_button.isEnabled()


def test_adapt_uses_the_docks_b0_and_te(phantom_viewer, qtbot, tiny_checkpoint):
    """The phantom's field is in ppm: the B0 and TE typed into the dock reach the scan, set the phase scale
    of L_T when it follows the scan (rad_per_ppm=auto: 2π·γ̄·B0·TE; the default is the fixed reference) and
    are recorded in the χ layer's provenance."""
    w = _dock(phantom_viewer, qtbot, tiny_checkpoint)
    assert w.inputs.units() == "ppm" and w.inputs.b0t_spin.isVisibleTo(w) and w.inputs.te_spin.isVisibleTo(w)
    assert w.form.values()["rad_per_ppm"] == "reference"
    w.inputs.b0t_spin.setValue(7.0)
    w.inputs.te_spin.setValue(10.0)
    w.form.set_values(dict(FAST, steps=1, rad_per_ppm="auto"))
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=180000)
    assert w.adapted is not None, w.status.text()
    assert w.adapted.info["rad_per_ppm"] == pytest.approx(2 * np.pi * 42.577478 * 7.0 * 0.010, rel=1e-6)
    acq = phantom_viewer.layers[-1].metadata["provenance"]["acquisition"]
    assert acq["b0_tesla"] == pytest.approx(7.0) and acq["te"] == pytest.approx(0.010)
    assert acq["b0_from"] == acq["te_from"] == "entered"


def test_adapt_dock_simple_form_with_advanced_folded(phantom_viewer, qtbot, tiny_checkpoint):
    """Steps, mode and the data consistency after the network (as in the dsbn method's form; with weights and
    device) in sight; the research parameters folded under "Advanced"."""
    from napari_qsm.core.params import specs
    from napari_qsm.nn.adapt import AdaptParams

    w = _dock(phantom_viewer, qtbot, tiny_checkpoint)
    form = w.form
    simple = [n for n in form.names() if n not in form.advanced_names()]
    assert simple == ["steps", "mode", "consistency"]
    assert {"lam_start", "rad_per_ppm", "margin_mm", "lr", "consistency_mu"} <= set(form.advanced_names())
    assert form.names() == [s.name for s in specs(AdaptParams) if s.widget != "hidden"]  # nothing lost
    assert form.advanced_toggle.isVisibleTo(w) and form.advanced_toggle.text() == f"Advanced ({len(form.advanced_names())})"
    assert not form.widget_for("lam_start").isVisibleTo(w) and form.widget_for("steps").isVisibleTo(w)
    assert form.values()["lam_start"] == 30.0  # folded rows still count
    form.advanced_toggle.click()
    assert form.widget_for("lam_start").isVisibleTo(w)
    form.advanced_toggle.click()
    form.widget_for("rad_per_ppm").setCurrentText("banana")  # a bad folded value unfolds the section
    assert form.widget_for("rad_per_ppm").isVisibleTo(w) and form.errors()
    # what adaptation does, in plain words, and how the time is found out
    assert "fine-tunes the network" in w.about.text()
    assert "measured on the first steps" in w.estimate.text()


def test_adapt_time_estimate_from_the_first_steps(phantom_viewer, qtbot, tiny_checkpoint, monkeypatch):
    from napari_qsm._napari import adapt_widget
    from napari_qsm.core.progress import Progress

    monkeypatch.setattr(adapt_widget, "SECONDS_PER_STEP", {})
    w = _dock(phantom_viewer, qtbot, tiny_checkpoint)
    w.form.set_values({"steps": 200})
    w._timing = None
    for step, t in ((1, 9.0), (2, 11.0), (3, 13.0)):  # start-up in the first step, then 2 s a step
        w._measure(Progress(step=step, total=200, elapsed=t))
    assert "2.0 s per step" in w.estimate.text() and "6.6 min" in w.estimate.text(), w.estimate.text()
    w._update_estimate()
    assert "200 steps take about 6.7 min" in w.estimate.text(), w.estimate.text()


def test_adapt_rows_are_words(phantom_viewer, qtbot, tiny_checkpoint):
    """The Adapt dock's generated rows read as words too ("Steps", "Mode", "Learning rate"), not raw names; the
    data consistency reads as in the Reconstruct dock's dsbn form."""
    w = _dock(phantom_viewer, qtbot, tiny_checkpoint)
    texts = form_row_labels(w.form)
    assert len(texts) == len(w.form.names())
    assert not [t for t in texts if "_" in t or not t[:1].isupper()], texts
    assert {"Steps", "Mode", "Learning rate", "Data consistency (CG steps)", "Data consistency μ"} <= set(texts)


def test_adapt_error_and_cancel_handlers(phantom_viewer, qtbot, tiny_checkpoint):
    """Errors go through the shared RunDock handler (ValueError as its message, else with the type); a
    cancel before any step says "cancelled"; cancel with nothing running changes nothing."""
    from napari_qsm._napari.run_dock import RunDock

    w = _dock(phantom_viewer, qtbot, tiny_checkpoint)
    assert isinstance(w, RunDock)
    w._on_error(ValueError("field layer x is empty"))
    assert "field layer x is empty" in w.status.text() and "ValueError" not in w.status.text()
    w._on_error(RuntimeError("out of memory"))
    assert "RuntimeError: out of memory" in w.status.text()
    w._on_error(ValueError(""))
    assert "ValueError" in w.status.text()  # an empty message still says what went wrong
    w._on_cancelled()
    assert "cancelled" in w.status.text()
    before = w.status.text()
    w.cancel()  # nothing is running
    assert w.status.text() == before


def test_mode_drop_down_in_words(phantom_viewer, qtbot, tiny_checkpoint):
    """The mode drop-down shows words, keeps the record's code names as values."""
    w = _dock(phantom_viewer, qtbot, tiny_checkpoint)
    combo = w.form.widget_for("mode")
    texts = [combo.itemText(i) for i in range(combo.count())]
    assert texts == ["QSMInvNet+ (DSBN)", "QSMInvNet fine-tune", "uQSM (no labels)"]
    w.form.set_values({"mode": "uqsm"})
    assert w.form.values()["mode"] == "uqsm" and combo.currentText() == "uQSM (no labels)"
