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
    from napari_qsm.core import phantom

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
