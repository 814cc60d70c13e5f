"""The reader on raw echoes: a BIDS MEGRE folder → 4-D magnitude and phase layers with TE and B0 for the Field dock."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest


def test_bids_folder_opens_as_echo_layers(raw_bids, tmp_path):
    from napari_qsm._napari.layers import to_canonical
    from napari_qsm._napari.reader import napari_get_reader
    from napari_qsm.core.field.load import load_echoes

    assert napari_get_reader(str(tmp_path)) is None  # a folder without echoes is declined
    for folder in (raw_bids, raw_bids / "anat"):  # subject or anat folder
        reader = napari_get_reader(str(folder))
        assert reader is not None
    out = reader(str(raw_bids))
    assert [typ for _, _, typ in out] == ["image", "image"]
    (mag, mkw, _), (pha, pkw, _) = out
    ref = load_echoes(str(raw_bids))
    assert mag.shape[0] == pha.shape[0] == ref.n_echoes and mkw["metadata"]["echo_axis"] == 0
    md = pkw["metadata"]
    assert md["role"] == "phase" and md["units"] == "rad" and md["vendor"]["phase_units"] == "siemens"
    assert md["echo_times"] == pytest.approx(list(ref.te)) and md["b0_tesla"] == pytest.approx(ref.b0_tesla)
    assert len(mkw["scale"]) == 4 and mkw["axis_labels"][0] == "echo"
    np.testing.assert_allclose(to_canonical(pha[2], md["axes"]), ref.phase[..., 2])
    assert np.abs(pha).max() <= np.pi + 1e-3


def test_viewer_open_folder_feeds_the_field_dock(make_napari_viewer, raw_bids):
    from napari_qsm._napari.field_widget import FieldWidget

    viewer = make_napari_viewer()
    viewer.open(str(raw_bids), plugin="napari-qsm")
    w = FieldWidget(viewer)
    assert w.magnitude_source().layer.metadata["role"] == "magnitude"
    assert w.phase_source().layer.metadata["role"] == "phase"
    side = json.loads(next((raw_bids / "anat").glob("*echo-3_part-mag_MEGRE.json")).read_text())
    assert w.echo_times()[2] == pytest.approx(side["EchoTime"])
    echoes = w.build_echoes()
    assert echoes.vendor["phase_units"] == "rad"  # already scaled by the loader
    assert echoes.n_echoes == 5


def test_4d_files_give_per_echo_layers_the_dock_takes_as_one_source(make_napari_viewer, raw_bids, tmp_path):
    """A 4-D magnitude/phase pair (echo last, EchoTime list in the sidecar): per-echo layers, grouped by the dock."""
    from napari_qsm._napari.field_widget import FieldWidget
    from napari_qsm.core.field.load import load_echoes

    ref = load_echoes(str(raw_bids))
    paths = {}
    for part, arr in (("mag", ref.magnitude), ("phase", ref.phase)):
        p = tmp_path / f"gre_{part}.nii.gz"
        nib.save(nib.Nifti1Image(arr, ref.affine), str(p))
        p.with_name(f"gre_{part}.json").write_text(json.dumps({"EchoTime": list(ref.te),
                                                               "MagneticFieldStrength": ref.b0_tesla}))
        paths[part] = p
    viewer = make_napari_viewer()
    for p in paths.values():
        viewer.open(str(p), plugin="napari-qsm")
    assert len(viewer.layers) == 10
    assert viewer.layers["gre_mag echo 2"].metadata["echo_times"] == pytest.approx(list(ref.te))
    w = FieldWidget(viewer)
    assert w.magnitude_source().n_echoes == 5 and w.phase_source().n_echoes == 5
    assert w.magnitude_source().layers[0].name == "gre_mag echo 1"
    assert w.b0_spin.value() == pytest.approx(ref.b0_tesla)
    echoes = w.build_echoes()
    np.testing.assert_allclose(echoes.phase, ref.phase, atol=1e-6)
    np.testing.assert_allclose(echoes.magnitude, ref.magnitude)
    assert echoes.te == pytest.approx(ref.te)


def test_open_folder_button_reads_in_a_worker(make_napari_viewer, qtbot, raw_bids, tmp_path):
    from napari_qsm._napari.field_widget import FieldWidget

    viewer = make_napari_viewer()
    w = FieldWidget(viewer)
    assert "No echoes yet" in w.echo_info.text()
    assert w.open_folder(raw_bids)
    qtbot.waitUntil(lambda: not w.loader.running, timeout=30000)
    assert w.magnitude_source().layer.name == "sub-phantom_MEGRE magnitude"
    assert w.phase_source().layer.name == "sub-phantom_MEGRE phase"
    assert "5 echoes" in w.echo_info.text() and "✓" in w.status.text()
    # a folder without echoes: an error in the status line, no layer
    n = len(viewer.layers)
    assert w.open_folder(tmp_path)
    qtbot.waitUntil(lambda: not w.loader.running, timeout=30000)
    assert "neither BIDS MEGRE" in w.status.text() and len(viewer.layers) == n
