"""Layers <-> core: a reconstruction from layers equals the one from the files (oblique, anisotropic)."""

import numpy as np
import pytest
from napari.layers import Image, Labels

from napari_qsm._napari.layers import (layer_geometry, result_layer_data, scan_from_layers, to_canonical,
                                       to_layer_order)
from napari_qsm._napari.reader import read_nifti
from napari_qsm.core.io import load_scan
from napari_qsm.methods import reconstruct
from napari_qsm.core.scan import ScanError


def _layers(paths):
    out = {}
    for key in ("field", "mask", "magnitude"):
        (data, kw, typ), = read_nifti(str(paths[key]))
        out[key] = (Labels if typ == "labels" else Image)(data, **kw)
    return out


def test_reconstruction_from_layers_equals_files_oblique_anisotropic(oblique_files, oblique_phantom):
    files_scan = load_scan(oblique_files["field"], oblique_files["mask"], oblique_files["magnitude"])
    lay = _layers(oblique_files)
    layer_scan = scan_from_layers(lay["field"], lay["mask"], lay["magnitude"])
    # the layers present (k, j, i); the core gets (i, j, k) with voxel size and B0 in that frame
    assert lay["field"].data.shape == files_scan.shape[::-1]
    assert layer_scan.shape == files_scan.shape
    np.testing.assert_allclose(layer_scan.voxel_size, files_scan.voxel_size, rtol=1e-6)
    np.testing.assert_allclose(layer_scan.b0_direction, files_scan.b0_direction, atol=1e-9)
    assert abs(files_scan.b0_direction[2]) < 0.95  # really oblique
    assert len(set(np.round(files_scan.voxel_size, 3))) == 3  # really anisotropic
    np.testing.assert_array_equal(layer_scan.field, files_scan.field)
    np.testing.assert_array_equal(layer_scan.mask, files_scan.mask)
    for method in ("tkd", "tsvd"):
        r_files = reconstruct(files_scan, method, device="cpu")
        r_layers = reconstruct(layer_scan, method, device="cpu")
        np.testing.assert_allclose(r_layers.chi, r_files.chi, rtol=0, atol=1e-7)
        data, kw = result_layer_data(r_layers, lay["field"], scan=layer_scan)
        np.testing.assert_allclose(data, to_layer_order(r_files.chi), atol=1e-7)
        assert kw["scale"] == pytest.approx(tuple(lay["field"].scale))
        assert kw["translate"] == pytest.approx(tuple(lay["field"].translate))
        assert kw["metadata"]["provenance"]["method"] == method
        assert kw["contrast_limits"] == (-0.15, 0.15) and kw["colormap"] == "gray"
    # and the phantom truth is recovered in the right frame (TKD correlates with true χ)
    r = reconstruct(layer_scan, "tkd", device="cpu")
    m = files_scan.mask
    assert np.corrcoef(r.chi[m], oblique_phantom.chi[m])[0, 1] > 0.6


def test_wrong_b0_permutation_would_differ(oblique_files):
    """Guard: treating the layer frame as the voxel frame (no un-permuting) changes the result."""
    lay = _layers(oblique_files)
    good = scan_from_layers(lay["field"], lay["mask"])
    g = layer_geometry(lay["field"])
    from napari_qsm.core.scan import Scan
    naive = Scan(field=lay["field"].data, mask=lay["mask"].data, voxel_size=tuple(g.voxel_size),
                 b0_direction=g.b0_direction)
    a = reconstruct(good, "tkd", device="cpu").chi
    b = to_canonical(reconstruct(naive, "tkd", device="cpu").chi)
    assert np.abs(a - b).max() > 1e-3


def test_foreign_layers_and_mismatches():
    rng = np.random.default_rng(0)
    field = Image(rng.normal(0, 0.02, (10, 12, 14)).astype(np.float32), scale=(2.0, 1.0, 0.5))
    mask = Labels(np.ones((10, 12, 14), np.uint8), scale=(2.0, 1.0, 0.5))
    g = layer_geometry(field)
    assert not g.known
    np.testing.assert_allclose(g.voxel_size, (0.5, 1.0, 2.0))  # numpy (z, y, x) order assumed
    scan = scan_from_layers(field, mask)
    assert scan.shape == (14, 12, 10)
    np.testing.assert_allclose(scan.b0_direction, (0, 0, 1))  # along the slice axis
    with pytest.raises(ScanError, match="mask"):
        scan_from_layers(field, Labels(np.ones((10, 12, 13), np.uint8)))
    with pytest.raises(ScanError, match="mask: empty"):
        scan_from_layers(field, Labels(np.zeros((10, 12, 14), np.uint8), scale=(2.0, 1.0, 0.5)))
    with pytest.raises(ScanError, match="voxel size"):
        scan_from_layers(field, Labels(np.ones((10, 12, 14), np.uint8), scale=(1.0, 1.0, 1.0)))
    with pytest.raises(ScanError, match="needs the field strength"):
        scan_from_layers(field, mask, units="hz")
    with pytest.raises(ScanError, match="no layer"):
        scan_from_layers(None, mask)
