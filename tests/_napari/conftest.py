"""Fixtures for the napari plugin tests: tiny phantoms, NIfTI files, the plugin manifest, a slow method.

napari needs a real (virtual) display here: pytest-xvfb starts Xvfb for the whole session.
Volumes are tiny (≈30³) so the suite stays light on a shared 2-core machine.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_qsm import methods as _methods  # noqa: E402
from napari_qsm.methods import Method, register_method  # noqa: E402
from napari_test_helpers import (MANIFEST, OBLIQUE_B0, RAW_SHAPE, RAW_VS, TINY_SHAPE, TINY_VS,  # noqa: E402
                                 SlowParams, _slow_run, add_layer_data, save_stored)

def pytest_collection_modifyitems(items):
    for item in items:
        if "_napari" in str(item.fspath):
            item.add_marker(pytest.mark.gui)


@pytest.fixture(scope="session", autouse=True)
def _qsm_plugin_registered():
    """Make the manifest known to npe2 even when the install cannot expose it (see test_manifest)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    try:
        pm.discover()
    except Exception:
        pass
    if "napari-qsm" not in {m.name for m in pm.iter_manifests()}:
        pm.register(PluginManifest.from_file(MANIFEST))
    yield


@pytest.fixture(scope="session")
def tiny_phantom():
    from napari_qsm.core.sim.phantom import make_phantom
    return make_phantom(TINY_SHAPE, TINY_VS, b0_direction=(0, 0, 1), seed=3, snr=100, device="cpu")


@pytest.fixture(scope="session")
def oblique_phantom():
    from napari_qsm.core.sim.phantom import make_phantom
    return make_phantom((30, 34, 26), (1.6, 1.5, 2.0), b0_direction=OBLIQUE_B0, seed=5, snr=100, device="cpu")


@pytest.fixture(scope="session")
def oblique_files(oblique_phantom, tmp_path_factory):
    """field / mask / magnitude of an oblique, anisotropic phantom stored sagittally (P-S-L)."""
    d = tmp_path_factory.mktemp("oblique")
    ph = oblique_phantom
    return {
        "field": save_stored(ph.field, ph.affine, d / "sub-01_field.nii.gz"),
        "mask": save_stored(ph.mask, ph.affine, d / "sub-01_mask.nii.gz", dtype=np.uint8),
        "magnitude": save_stored(ph.magnitude, ph.affine, d / "sub-01_magnitude.nii.gz"),
        "dir": d,
    }


@pytest.fixture(scope="session")
def raw_head():
    """The raw multi-echo head (4 mm, 5 echoes, honest signal with a background field), echoes kept."""
    from napari_qsm.core.sim.phantom import make_phantom
    return make_phantom(RAW_SHAPE, RAW_VS, seed=3, snr=50.0, device="cpu", honest=True, background=True,
                        keep_echoes=True)


@pytest.fixture(scope="session")
def raw_bids(raw_head, tmp_path_factory):
    """:func:`raw_head` written as a BIDS MEGRE subject folder (Siemens integer phase, JSON sidecars)."""
    from napari_qsm.core.sim.phantom import save_raw_bids

    out = tmp_path_factory.mktemp("bids")
    save_raw_bids(raw_head, out, phase_units="siemens")
    return out / "sub-phantom"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny (base width 4) QSMInvNet+ checkpoint for the Adapt dock tests."""
    torch = pytest.importorskip("torch")
    from napari_qsm.nn.unet import NetConfig, QSMInvNet

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("weights") / "tiny_dsbn.pt"
    torch.save(QSMInvNet(NetConfig(base_width=4)).state_dict(), str(p))
    return p


@pytest.fixture
def phantom_viewer(make_napari_viewer, tiny_phantom):
    """A viewer holding the tiny phantom's layers (true χ, magnitude, labels, mask, field)."""
    from napari_qsm._napari.sample_data import phantom_layer_data

    viewer = make_napari_viewer()
    add_layer_data(viewer, phantom_layer_data(tiny_phantom))
    return viewer


@pytest.fixture
def slow_method():
    m = register_method(Method("slowtest", "Slow test", SlowParams, _slow_run, long_running=True, order=999,
                               doc="test method: sleeps, reports progress, honours cancel"))
    yield m
    _methods._METHODS.pop("slowtest", None)
