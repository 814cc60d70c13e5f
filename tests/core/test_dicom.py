"""DICOM export: geometry and values survive DICOM → dcm2niix → NIfTI; clear errors, nothing written."""

import glob
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

pydicom = pytest.importorskip("pydicom")
from napari_qsm.core.io.dicom import DicomError, nifti_to_dicom, read_source_series, write_dicom_series  # noqa: E402

DCM2NIIX = shutil.which("dcm2niix")


def _oblique_chi(shape=(36, 40, 10)):
    rng = np.random.default_rng(1)
    vol = (rng.standard_normal(shape) * 0.04).astype(np.float32)
    vol[4:9, 6:12, 2:6] = 0.35
    vol[20:24, 20:30, 4:8] = -0.2
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("xyz", [14, -9, 25], degrees=True).as_matrix() @ np.diag([0.75, 0.9, 3.0])
    aff[:3, 3] = [-15.0, -22.0, 8.0]
    return vol, aff


def _dcm2niix(series, out):
    os.makedirs(out)
    r = subprocess.run([DCM2NIIX, "-z", "y", "-f", "x", "-o", str(out), str(series)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return nib.as_closest_canonical(nib.load(glob.glob(str(out / "*.nii.gz"))[0]))


@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not installed")
def test_round_trip_through_dcm2niix_keeps_geometry_and_values(tmp_path):
    vol, aff = _oblique_chi()
    src = tmp_path / "chi.nii.gz"
    img = nib.Nifti1Image(vol, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, src)
    files = nifti_to_dicom(src, tmp_path / "dicom")
    assert len(files) == vol.shape[2]
    ds = pydicom.dcmread(files[0])
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert float(ds.WindowWidth) > 0 and float(ds.RescaleSlope) > 0
    assert str(ds.PatientName) == "" and ds.StudyInstanceUID
    back = _dcm2niix(tmp_path / "dicom", tmp_path / "nii")
    ref = nib.as_closest_canonical(img)
    assert back.shape == ref.shape
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-3)
    assert ds.RescaleType == "ppb"  # χ in ppb: a window in ppm (< 1 wide) opens blank in viewers
    step = float(ds.RescaleSlope)
    assert np.max(np.abs(back.get_fdata() - 1000 * ref.get_fdata())) <= step / 2 + 1e-4


def test_window_opens_on_the_data_not_blank(tmp_path):
    vol, aff = _oblique_chi()
    files = write_dicom_series(vol, aff, tmp_path / "s", description="QSM test", units="ppm")
    ds = pydicom.dcmread(files[3])
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
    hi = float(ds.WindowCenter) + float(ds.WindowWidth) / 2
    inside = np.mean((values > lo) & (values < hi))
    assert 0.5 < inside <= 1.0  # most of the slice is shown in grey levels, neither all black nor all white
    assert float(ds.WindowWidth) >= 1  # PS3.3 C.11.2.1.2; viewers truncate the width to an integer
    assert float(ds.WindowWidth) <= 1000 * (vol.max() - vol.min())  # not wider than the data (ppb)


def test_like_copies_patient_and_study_and_checks_geometry(tmp_path):
    vol, aff = _oblique_chi()
    src = write_dicom_series(vol, aff, tmp_path / "source", description="GRE phase")
    for f in src:  # pretend a scanner wrote it: a patient and a study
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.StudyDescription = "Doe^Jane", "P123", "Brain QSM"
        ds.save_as(f)
    out = write_dicom_series(vol * 2, aff, tmp_path / "chi", description="QSM MEDI", like=tmp_path / "source")
    a, b = pydicom.dcmread(src[0]), pydicom.dcmread(out[0])
    assert str(b.PatientName) == "Doe^Jane" and b.PatientID == "P123"
    assert b.StudyInstanceUID == a.StudyInstanceUID and b.FrameOfReferenceUID == a.FrameOfReferenceUID
    assert b.SeriesInstanceUID != a.SeriesInstanceUID
    moved = aff.copy()
    moved[:3, 3] += 30.0
    with pytest.raises(DicomError, match="geometry"):
        write_dicom_series(vol, moved, tmp_path / "bad", description="x", like=tmp_path / "source")
    assert not (tmp_path / "bad").exists()


def test_errors_name_the_input_and_write_nothing(tmp_path):
    vol, aff = _oblique_chi()
    (tmp_path / "two").mkdir()
    write_dicom_series(vol, aff, tmp_path / "two" / "a", description="a")
    write_dicom_series(vol, aff, tmp_path / "two" / "b", description="b")
    with pytest.raises(DicomError, match="2 series"):
        read_source_series(tmp_path / "two")
    bare = tmp_path / "noaffine.nii.gz"
    img = nib.Nifti1Image(vol, None)
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, bare)
    with pytest.raises(DicomError, match="no orientation"):
        nifti_to_dicom(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(DicomError, match="not empty"):
        write_dicom_series(vol, aff, tmp_path / "full", description="x")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]


def test_other_maps_are_scaled_until_their_window_is_wide_enough(tmp_path):
    vol, aff = _oblique_chi()
    mag = np.abs(vol) * 2 + 0.1  # an a.u. map spanning ~0.3
    files = write_dicom_series(mag, aff, tmp_path / "m", description="SWI", signed_window=False, units="a.u.")
    ds = pydicom.dcmread(files[0])
    assert float(ds.WindowWidth) >= 10 and ds.RescaleType == "a.u. x 100"
    values = ds.pixel_array * float(ds.RescaleSlope)
    # the same slice (in-plane axes may be flipped into the scanner's layout)
    np.testing.assert_allclose(np.sort(values.ravel()), np.sort(100 * mag[:, :, 0].ravel()), atol=float(ds.RescaleSlope))


@pytest.mark.parametrize("perm, row, col", [((0, 1, 2), (1, 0, 0), (0, 1, 0)),     # axial slices
                                            ((1, 2, 0), (0, 1, 0), (0, 0, -1)),    # sagittal slices
                                            ((0, 2, 1), (1, 0, 0), (0, 0, -1))])   # coronal slices
def test_slices_are_stored_the_way_scanners_store_them(tmp_path, perm, row, col):
    vol = np.random.default_rng(0).standard_normal((8, 10, 6)).astype(np.float32)
    aff = np.eye(4)
    aff[:3, :3] = np.eye(3)[:, list(perm)] * np.array([1.0, 1.2, 2.0])  # RAS+ voxel axes, permuted
    files = write_dicom_series(vol, aff, tmp_path / "s", description="x")
    ds = pydicom.dcmread(files[0])
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [*row, *col], atol=1e-6)
