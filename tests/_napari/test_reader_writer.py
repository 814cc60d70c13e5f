"""NIfTI reader and writer: every kind of file, geometry in the metadata, round trips, bad files."""

import json

import nibabel as nib
import numpy as np
import pytest

from napari_qsm._napari.layers import DISPLAY_AXES, to_canonical
from napari_qsm._napari.reader import napari_get_reader, read_nifti
from napari_qsm._napari.writer import write_image, write_labels
from napari_qsm.core.io import b0_from_affine, read_volume, sidecar_path

from napari_test_helpers import OBLIQUE_B0, save_stored


@pytest.fixture
def errors(monkeypatch):
    """Record napari error notifications instead of showing them."""
    seen = []
    import napari.utils.notifications as nt
    monkeypatch.setattr(nt, "show_error", lambda msg: seen.append(str(msg)))
    return seen


def _one(path):
    reader = napari_get_reader(str(path))
    assert reader is not None
    out = reader(str(path))
    assert len(out) == 1
    return out[0]


def test_reader_declines_foreign_files(tmp_path):
    for name in ("image.tif", "notes.txt", "volume.nii.bak", "data.mgz"):
        p = tmp_path / name
        p.write_bytes(b"\x00" * 10)
        assert napari_get_reader(str(p)) is None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.tif")]) is None
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader([]) is None


def test_field_reads_as_canonical_image(oblique_files, oblique_phantom):
    data, kw, typ = _one(oblique_files["field"])
    ph = oblique_phantom
    assert typ == "image" and data.dtype == np.float32
    # stored P-S-L on disk; the layer is canonical (i, j, k) presented as (k, j, i)
    np.testing.assert_array_equal(to_canonical(data, kw["metadata"]["axes"]), ph.field)
    assert data.shape == tuple(np.array(ph.shape)[list(DISPLAY_AXES)])
    md = kw["metadata"]
    assert md["role"] == "field" and md["axes"] == list(DISPLAY_AXES)
    np.testing.assert_allclose(md["voxel_size"], ph.voxel_size, rtol=1e-5)
    np.testing.assert_allclose(md["b0_direction"], OBLIQUE_B0, atol=1e-5)
    np.testing.assert_allclose(md["affine"], ph.affine, atol=1e-4)
    assert md["path"].endswith("sub-01_field.nii.gz")
    assert kw["scale"] == pytest.approx(tuple(np.array(ph.voxel_size)[list(DISPLAY_AXES)]), rel=1e-5)
    assert kw["translate"] == pytest.approx(tuple(ph.affine[:3, 3][list(DISPLAY_AXES)]), abs=1e-4)
    assert kw["units"] == ("mm", "mm", "mm")
    assert kw["axis_labels"] == ("I→S", "P→A", "L→R")  # axial slices on the slider
    lo, hi = kw["contrast_limits"]
    assert lo == pytest.approx(-hi) and 0 < hi < 1


def test_mask_and_labels_read_as_labels(tmp_path, oblique_files, oblique_phantom):
    data, kw, typ = _one(oblique_files["mask"])
    assert typ == "labels" and kw["metadata"]["role"] == "mask"
    assert set(np.unique(data)) == {0, 1}
    # a float 0/1 mask is a mask too
    p = save_stored(oblique_phantom.mask.astype(np.float32), oblique_phantom.affine, tmp_path / "brain.nii.gz")
    assert _one(p)[2] == "labels"
    # integer label maps, with names from phantom.json next to them
    p = save_stored(oblique_phantom.labels, oblique_phantom.affine, tmp_path / "seg.nii.gz", dtype=np.int16)
    (tmp_path / "phantom.json").write_text(json.dumps({"label_names": {"1": "white matter", "2": "cortex"}}))
    data, kw, typ = _one(p)
    assert typ == "labels" and kw["metadata"]["role"] == "labels"
    assert "white matter" in kw["features"]["name"]
    # a magnitude is an image even when stored as integers
    mag = (oblique_phantom.magnitude * 1000).astype(np.int16)
    p = save_stored(mag, oblique_phantom.affine, tmp_path / "mag.nii.gz", dtype=np.int16)
    data, kw, typ = _one(p)
    assert typ == "image" and data.dtype == np.float32 and kw["metadata"]["role"] == "magnitude"


def test_multi_echo_gives_one_layer_per_echo(tmp_path, oblique_phantom):
    ph = oblique_phantom
    echoes = np.stack([ph.magnitude * np.exp(-e * 0.1) for e in range(3)], axis=-1).astype(np.float32)
    img = nib.Nifti1Image(echoes, ph.affine)
    nib.save(img, str(tmp_path / "gre_mag.nii.gz"))
    (tmp_path / "gre_mag.json").write_text(json.dumps({"EchoTime": [0.005, 0.010, 0.015],
                                                       "MagneticFieldStrength": 3}))
    out = napari_get_reader(str(tmp_path / "gre_mag.nii.gz"))(str(tmp_path / "gre_mag.nii.gz"))
    assert [kw["name"] for _, kw, _ in out] == ["gre_mag echo 1", "gre_mag echo 2", "gre_mag echo 3"]
    for e, (data, kw, typ) in enumerate(out):
        assert typ == "image"
        np.testing.assert_allclose(to_canonical(data), echoes[..., e])
        assert kw["metadata"]["echo"] == e and kw["metadata"]["echo_time"] == pytest.approx(0.005 * (e + 1))


def test_complex_data_gives_magnitude_and_phase(tmp_path, oblique_phantom):
    ph = oblique_phantom
    z = (ph.magnitude * np.exp(1j * ph.field * 10)).astype(np.complex64)
    nib.save(nib.Nifti1Image(z, ph.affine), str(tmp_path / "complex.nii"))
    out = read_nifti(str(tmp_path / "complex.nii"))
    assert [kw["name"] for _, kw, _ in out] == ["complex magnitude", "complex phase"]
    # the phase of complex echoes is a raw phase, not a local field
    assert [kw["metadata"]["role"] for _, kw, _ in out] == ["magnitude", "phase"]


# File name -> role. Only a local field gets "field" (the dock's default field); a raw phase is an input
# of the front end ("phase"), a B0 / field map still holds the background field ("total_field").
ROLE_BY_NAME = [
    ("phase", "phase"),
    ("sub-01_echo-2_part-phase_MEGRE", "phase"),
    ("unwrapped_phase", "phase"),
    ("sub-01_ph", "phase"),
    ("fieldmap", "total_field"),
    ("sub-01_fieldmap", "total_field"),
    ("b0map", "total_field"),
    ("sub-01_B0_map", "total_field"),
    ("total_field", "total_field"),
    ("sub-01_tfs", "total_field"),
    ("iFreq", "total_field"),
    ("localfield", "field"),
    ("sub-01_local_field", "field"),
    ("sub-01_desc-local_field", "field"),
    ("lfs", "field"),
    ("RDF", "field"),
    ("tissue_phase", "field"),
    ("sub-01_field", "field"),
    ("field", "field"),
    ("sub-01_part-mag_MEGRE", "magnitude"),
    ("iMag", "magnitude"),
    ("sub-01_part-imag_MEGRE", "image"),   # imaginary part: neither magnitude nor field
    ("Image", "image"),                    # napari's default layer name is not a magnitude
]


@pytest.mark.parametrize("name, role", ROLE_BY_NAME)
def test_role_from_file_name(tmp_path, name, role):
    """The reader routes each name to its role (a float volume, so the name alone decides)."""
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(6, 7, 5)).astype(np.float32)
    p = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 2.0, 1.0])), str(p))
    data, kw, typ = _one(p)
    assert typ == "image" and kw["metadata"]["role"] == role
    lo, hi = kw["contrast_limits"]
    if role in ("phase", "total_field", "field"):
        assert lo == pytest.approx(-hi)  # signed maps: symmetric window


def test_corrupted_file_is_a_notification_not_a_traceback(tmp_path, errors):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not gzip at all" * 20)
    out = napari_get_reader(str(bad))(str(bad))
    assert out == [(None,)]  # napari's "nothing to add" sentinel
    assert errors and "broken.nii.gz" in errors[0]
    truncated = tmp_path / "trunc.nii"
    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4)), str(good))
    truncated.write_bytes(good.read_bytes()[:600])
    assert read_nifti(str(truncated)) == [(None,)]
    assert len(errors) == 2


def test_viewer_open_bad_and_good_files(make_napari_viewer, oblique_files, tmp_path, errors):
    viewer = make_napari_viewer()
    bad = tmp_path / "broken.nii"
    bad.write_bytes(b"\x00" * 50)
    viewer.open(str(bad), plugin="napari-qsm")
    assert len(viewer.layers) == 0 and errors
    viewer.open([str(oblique_files["field"]), str(oblique_files["mask"])], plugin="napari-qsm", stack=False)
    assert [type(lay).__name__ for lay in viewer.layers] == ["Image", "Labels"]
    assert viewer.dims.axis_labels[0] == "I→S"  # axial slices on the slider
    field = viewer.layers[0]
    assert tuple(str(u) for u in field.units) == ("millimeter",) * 3


def test_writer_round_trip_keeps_source_orientation(tmp_path, oblique_files):
    data, kw, typ = _one(oblique_files["field"])
    attrs = dict(kw)
    out = write_image(str(tmp_path / "copy.nii.gz"), data * 2, attrs)
    assert out == [str(tmp_path / "copy.nii.gz")]
    src, dst = nib.load(str(oblique_files["field"])), nib.load(out[0])
    np.testing.assert_allclose(dst.affine, src.affine, atol=1e-5)  # written as stored (P-S-L), same affine
    np.testing.assert_allclose(np.asanyarray(dst.dataobj), 2 * np.asanyarray(src.dataobj), rtol=1e-6)
    prov = json.loads(sidecar_path(out[0]).read_text())
    assert prov["software"] == "napari-qsm" and prov["layer"]["source"].endswith("sub-01_field.nii.gz")
    # read back: same layer geometry
    data2, kw2, _ = _one(out[0])
    np.testing.assert_allclose(data2, data * 2, rtol=1e-6)
    assert kw2["scale"] == pytest.approx(kw["scale"]) and kw2["translate"] == pytest.approx(kw["translate"])


def test_writer_labels_and_plain_layers(tmp_path, oblique_files):
    data, kw, typ = _one(oblique_files["mask"])
    out = write_labels(str(tmp_path / "mask_copy.nii.gz"), data, kw)[0]
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(nib.load(str(oblique_files["mask"])).dataobj))
    # a layer with no napari-qsm metadata: numpy (z, y, x) order, scale in mm
    arr = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    out = write_image(str(tmp_path / "plain"), arr, {"name": "plain", "scale": (3.0, 1.0, 0.5),
                                                     "translate": (10.0, 20.0, 30.0), "metadata": {}})[0]
    assert out.endswith("plain.nii.gz")
    vol, aff, _ = read_volume(out)
    np.testing.assert_allclose(vol, to_canonical(arr))
    np.testing.assert_allclose(np.diag(aff)[:3], (0.5, 1.0, 3.0))
    np.testing.assert_allclose(aff[:3, 3], (30.0, 20.0, 10.0))
    np.testing.assert_allclose(b0_from_affine(aff), (0, 0, 1), atol=1e-9)


def test_writer_refuses_to_overwrite_its_source(oblique_files):
    data, kw, _ = _one(oblique_files["field"])
    before = oblique_files["field"].read_bytes()
    with pytest.raises(ValueError, match="never overwritten"):
        write_image(str(oblique_files["field"]), data, kw)
    assert oblique_files["field"].read_bytes() == before


def test_viewer_save_layer_through_plugin(make_napari_viewer, oblique_files, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(oblique_files["field"]), plugin="napari-qsm")
    out = tmp_path / "saved_field.nii.gz"
    viewer.layers.save(str(out), selected=False, plugin="napari-qsm")
    src = nib.load(str(oblique_files["field"]))
    back = nib.load(str(out))
    # the voxels, the affine (written in the source's stored orientation) and the provenance sidecar
    np.testing.assert_allclose(np.asanyarray(back.dataobj), np.asanyarray(src.dataobj), rtol=1e-6)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    prov = json.loads(sidecar_path(out).read_text())
    layer = prov["layer"]
    assert prov["software"] == "napari-qsm" and layer["name"] == viewer.layers[0].name
    assert layer["role"] == "field" and layer["source"].endswith("sub-01_field.nii.gz")
    np.testing.assert_allclose(layer["b0_direction"], OBLIQUE_B0, atol=1e-4)
