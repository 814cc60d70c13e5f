"""The Adapt dock with several open scans of one protocol (issue 15): a multi-select of field layers, each paired
with its mask; one adaptation, a χ layer per scan; and the uqsm mode offered by the generated form."""

import numpy as np
import pytest

pytest.importorskip("napari_qsm.nn.adapt")
torch = pytest.importorskip("torch")

from napari_qsm._napari.adapt_widget import AdaptWidget  # noqa: E402


def test_adapt_dock_takes_several_scans_of_a_protocol(phantom_viewer, qtbot, tiny_checkpoint, tmp_path):
    v = phantom_viewer
    f0, m0 = v.layers["phantom field"], v.layers["phantom mask"]
    # a second scan of the protocol: another field (B0 from its own layer geometry) with its own mask
    v.add_image(np.roll(f0.data, 2, axis=0) * 0.8, name="scan2 field", scale=f0.scale, metadata=dict(f0.metadata))
    v.add_labels(np.asarray(m0.data).astype(np.uint8), name="scan2 mask", scale=m0.scale, metadata=dict(m0.metadata))
    w = AdaptWidget(v)
    v.window.add_dock_widget(w, name="Adapt network")
    qtbot.waitUntil(lambda: "ready" in w.inputs.message.text(), timeout=5000)
    assert "uqsm" in [w.form.widget_for("mode").itemData(k) for k in range(w.form.widget_for("mode").count())]
    names = [w.protocol.list.item(k).text() for k in range(w.protocol.list.count())]
    main = w.inputs.field_combo.layer().name      # the dock's own field is not offered again
    assert main in ("phantom field", "scan2 field") and names == [{"phantom field", "scan2 field"}.difference({main}).pop()]
    w.protocol.select(names)
    w.weights_edit.setText(str(tiny_checkpoint))
    w.form.set_values({"patch": 32, "synth_batch": 0, "steps": 2, "preview_every": 0})
    n = len(v.layers)
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=180000)
    assert "to 2 scans" in w.status.text(), w.status.text()
    assert len(v.layers) == n + 2
    out = w.save_weights(tmp_path / "site.pt")
    import json
    card = json.loads(out.with_suffix(".json").read_text())
    assert len(card["scan_fingerprints"]) == 2


def test_adapt_dock_protocol_scan_without_mask_is_refused(phantom_viewer, qtbot, tiny_checkpoint):
    v = phantom_viewer
    v.add_image(np.zeros((5, 6, 7), np.float32), name="odd field")   # no mask of its shape is open
    w = AdaptWidget(v)
    v.window.add_dock_widget(w, name="Adapt network")
    w.inputs.field_combo.select(v.layers["phantom field"])
    qtbot.waitUntil(lambda: "ready" in w.inputs.message.text(), timeout=5000)
    w.protocol.select(["odd field"])
    w.weights_edit.setText(str(tiny_checkpoint))
    n = len(v.layers)
    assert not w.run()
    assert "odd field" in w.status.text() and "mask" in w.status.text()
    assert len(v.layers) == n and not w.runner.running


def test_adapt_dock_protocol_box_says_when_no_other_scan_is_open(phantom_viewer, qtbot):
    """With only the dock's own field open the protocol box shows a line in words, not an empty list."""
    v = phantom_viewer
    w = AdaptWidget(v)
    v.window.add_dock_widget(w, name="Adapt network")
    qtbot.waitUntil(lambda: "ready" in w.inputs.message.text(), timeout=5000)
    assert w.protocol.list.count() == 0
    assert w.protocol.empty.isVisibleTo(w) and not w.protocol.list.isVisibleTo(w)
    f0 = v.layers["phantom field"]
    v.add_image(f0.data * 0.8, name="scan2 field", scale=f0.scale, metadata=dict(f0.metadata))
    assert w.protocol.list.count() == 1
    assert w.protocol.list.isVisibleTo(w) and not w.protocol.empty.isVisibleTo(w)
