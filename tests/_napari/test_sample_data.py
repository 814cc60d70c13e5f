"""Sample data: the phantom presets load as field, mask, magnitude, true χ and labels layers."""

import time

import numpy as np
import pytest

from napari_qsm._napari.layers import b0_angle_deg, to_canonical

EXPECTED = ["true χ", "magnitude", "labels", "mask", "field"]


def test_phantom_1mm_sample_via_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    t0 = time.perf_counter()
    viewer.open_sample("napari-qsm", "phantom_1mm")
    seconds = time.perf_counter() - t0
    assert seconds < 60, f"sample took {seconds:.0f} s"
    assert [lay.name for lay in viewer.layers] == [f"phantom {n}" for n in EXPECTED]
    field = viewer.layers["phantom field"]
    assert field.data.shape == (112, 144, 128) and field.data.dtype == np.float32  # (k, j, i): axial slider
    assert tuple(field.scale) == (1.0, 1.0, 1.0)
    assert viewer.dims.axis_labels == ("I→S", "P→A", "L→R")
    # the magnitude is shown (the field is windowed, one click away); the view is the docks' (A up, R right)
    assert viewer.layers["phantom magnitude"].visible and not viewer.layers["phantom true χ"].visible
    assert not field.visible and field.contrast_limits[0] == pytest.approx(-field.contrast_limits[1])
    assert tuple(viewer.scene.camera.orientation2d) == ("up", "right")
    roles = [lay.metadata["role"] for lay in viewer.layers]
    assert roles == ["chi_true", "magnitude", "labels", "mask", "field"]
    assert type(viewer.layers["phantom mask"]).__name__ == "Labels"
    assert tuple(viewer.layers["phantom true χ"].contrast_limits) == (-0.15, 0.15)
    labels = viewer.layers["phantom labels"]
    assert "globus pallidus" in " ".join(map(str, labels.features["name"]))
    md = field.metadata
    assert md["sidecar"]["EchoTime"] > 0 and md["sidecar"]["MagneticFieldStrength"] > 0
    np.testing.assert_allclose(md["b0_direction"], (0, 0, 1), atol=1e-9)


def test_clinical_sample_is_anisotropic_and_oblique(monkeypatch):
    from napari_qsm._napari import sample_data
    from napari_qsm.core.sim import phantom

    monkeypatch.setitem(phantom.CLINICAL, "shape", (64, 72, 16))  # small for the test, same voxel size
    out = sample_data.make_phantom_clinical()
    names = [kw["name"] for _, kw, _ in out]
    assert names == [f"clinical {n}" for n in EXPECTED]
    data, kw, typ = out[-1]
    assert data.shape == (16, 72, 64)
    assert kw["scale"] == pytest.approx((3.0, 0.75, 0.75))
    md = kw["metadata"]
    assert b0_angle_deg(md["b0_direction"]) == pytest.approx(15.0, abs=1e-6)
    mask = to_canonical(out[3][0], md["axes"])
    assert mask.any() and mask.shape == (64, 72, 16)


def test_raw_head_sample_is_echo_first_like_the_reader(make_napari_viewer, qtbot, monkeypatch):
    """The raw multi-echo sample: 4-D echo-first layers with the reader's MEGRE metadata; the Field dock turns nothing."""
    from napari_qsm._napari import sample_data
    from napari_qsm._napari.field_sources import make_echo_first, source_echo_times
    from napari_qsm._napari.field_widget import FieldWidget
    from napari_qsm._napari.reader import echoes_layer_data
    from napari_qsm.core.sim import phantom
    from napari_test_helpers import add_layer_data

    made = []
    real = phantom.make_phantom
    monkeypatch.setattr(phantom, "make_phantom", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    shape, vs = (24, 28, 24), (6.0, 6.0, 6.0)  # small for the test (the sample: 64×76×64 at 2.5 mm)
    viewer = make_napari_viewer()
    out = sample_data.make_raw_head(shape=shape, voxel_size=vs)
    assert [kw["name"] for _, kw, _ in out] == ["raw head magnitude", "raw head phase"]
    ref = echoes_layer_data(made[0].to_echoes(name="raw head"))  # what the reader makes of the same echoes
    for (data, kw, _), (rdata, rkw, _) in zip(out, ref):
        assert data.shape == (5, 24, 28, 24) and data.dtype == np.float32  # (echo, k, j, i)
        np.testing.assert_array_equal(data, rdata)
        assert set(rkw["metadata"]) <= set(kw["metadata"])
        md = kw["metadata"]
        assert md["echo_axis"] == 0 and md["n_echoes"] == 5 and md["b0_tesla"] == pytest.approx(3.0)
        assert md["echo_times"] == md["te"] == md["sidecar"]["EchoTime"] and len(md["te"]) == 5
        assert md["sidecar"]["MagneticFieldStrength"] == pytest.approx(3.0)
        assert kw["axis_labels"][0] == "echo" and tuple(kw["scale"]) == (1.0, 6.0, 6.0, 6.0)
    assert out[1][1]["metadata"]["units"] == "rad" and out[1][1]["metadata"]["role"] == "phase"
    mag, pha = add_layer_data(viewer, out)
    assert tuple(viewer.scene.camera.orientation2d) == ("up", "right")
    assert viewer.dims.axis_labels[0] == "echo" and viewer.dims.not_displayed == (0, 1)  # echo and slice sliders
    w = FieldWidget(viewer)
    src = w.magnitude_source()
    assert src.layer is mag and src.echo_axis == 0 and w.phase_source().layer is pha
    assert source_echo_times(src) == pytest.approx(mag.metadata["te"])
    assert w.b0_spin.value() == pytest.approx(3.0)
    assert not make_echo_first(mag) and not make_echo_first(pha)  # nothing to turn
