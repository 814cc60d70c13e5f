"""load_echoes: BIDS MEGRE folders, explicit lists, 4-D files, DICOM; phase units, B0, TE and every refusal."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.core.field import load as loadmod
from napari_qsm.core.field.load import detect_phase_units, load_echoes
from napari_qsm.core.field.records import Echoes
from napari_qsm.core.io import GAMMA_BAR_MHZ_PER_T, b0_from_affine
from napari_qsm.core.scan import ScanError

SHAPE = (6, 7, 5)
TE = (0.004, 0.008, 0.012)
# stored axes: i = right→left (flipped), j = posterior→anterior, k = inferior→superior; 1 x 1.5 x 2 mm
AFFINE = np.array([[-1.0, 0, 0, 10], [0, 1.5, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])


def _phase_rad(e, rng=None):
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    ph = 0.9 * (e + 1) * (i + 0.5 * j - 0.3 * k) + 0.2
    return np.angle(np.exp(1j * ph)).astype(np.float32)   # wrapped, fills (−π, π]


def _mag(e):
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    return (100.0 * np.exp(-0.2 * e) * (1 + i + 10 * j + 100 * k) / 500).astype(np.float32)


def _save(path, data, affine=AFFINE, dtype=None, slope=None, inter=None):
    img = nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data).astype(dtype), affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    nib.save(img, str(path))
    return path


def _sidecar(path, **keys):
    p = Path(str(path).replace(".nii.gz", ".json"))
    p.write_text(json.dumps(keys))


def _bids(root, units="siemens", manufacturer="Siemens", n=3, sidecar=None, te=TE, prefix="sub-01"):
    anat = Path(root) / prefix.split("_")[0] / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    for e in range(n):
        ph = _phase_rad(e)
        if units == "siemens":
            stored, dt = np.round(ph * 4096 / np.pi).clip(-4096, 4095), np.int16
        elif units == "mrad":
            stored, dt = np.round(ph * 1000), np.int16
        else:
            stored, dt = ph, np.float32
        m = _save(anat / f"{prefix}_echo-{e + 1}_part-mag_MEGRE.nii.gz", _mag(e))
        p = _save(anat / f"{prefix}_echo-{e + 1}_part-phase_MEGRE.nii.gz", stored, dtype=dt)
        side = {"EchoTime": te[e], "MagneticFieldStrength": 3, "ImagingFrequency": 123.2,
                "Manufacturer": manufacturer}
        side.update(sidecar or {})
        side = {k: v for k, v in side.items() if v is not None}
        _sidecar(m, **side)
        _sidecar(p, **side)
    return Path(root)


def _canon(a):
    """The stored array in nib.as_closest_canonical order (i flipped for AFFINE)."""
    return np.asarray(a)[::-1]


def test_bids_subject_folder_siemens(tmp_path):
    root = _bids(tmp_path)
    for where in (root, root / "sub-01", root / "sub-01" / "anat"):
        ech = load_echoes(where)
        assert isinstance(ech, Echoes) and ech.shape == SHAPE and ech.n_echoes == 3
    assert ech.te == TE
    assert ech.b0_tesla == pytest.approx(123.2 / GAMMA_BAR_MHZ_PER_T)          # 2.894 T, not 3
    assert "ImagingFrequency" in ech.vendor["b0_source"]
    assert ech.vendor["phase_units"] == "siemens" and ech.vendor["manufacturer"] == "Siemens"
    assert "auto" in ech.vendor["phase_units_source"]
    for e in range(3):   # canonical voxel order, radians, magnitudes kept
        assert np.allclose(ech.phase[..., e], _canon(_phase_rad(e)), atol=np.pi / 4096 + 1e-6)
        assert np.allclose(ech.magnitude[..., e], _canon(_mag(e)), rtol=1e-6)
    assert ech.voxel_size == (1.0, 1.5, 2.0)
    assert np.allclose(ech.affine, nib.as_closest_canonical(nib.Nifti1Image(np.zeros(SHAPE), AFFINE)).affine)
    assert np.allclose(ech.b0_direction, b0_from_affine(ech.affine))
    assert np.allclose(ech.nifti_info["original_affine"], AFFINE)           # for writing back
    assert len(ech.sources) == 6 and ech.sources[0].endswith("echo-1_part-mag_MEGRE.nii.gz")


def test_bids_echo_order_is_numeric_and_other_acquisitions_are_refused(tmp_path):
    te = tuple(0.002 * (k + 1) for k in range(11))
    root = _bids(tmp_path, n=11, te=te)
    ech = load_echoes(root)
    assert ech.te == te           # echo-10 and echo-11 after echo-9, not after echo-1
    _bids(tmp_path, prefix="sub-01_acq-fast")
    with pytest.raises(ScanError, match="2 MEGRE acquisitions"):
        load_echoes(root)


@pytest.mark.parametrize("units,manufacturer,expect", [
    ("rad", "", "rad"), ("siemens", "", "siemens"), ("mrad", "Philips", "mrad"), ("mrad", "", "mrad"),
])
def test_phase_units_detected_and_reported(tmp_path, units, manufacturer, expect):
    ech = load_echoes(_bids(tmp_path, units=units, manufacturer=manufacturer or None))
    assert ech.vendor["phase_units"] == expect
    assert ech.vendor["phase_scale"] == pytest.approx({"rad": 1, "siemens": np.pi / 4096, "mrad": 1e-3}[expect])
    assert np.allclose(ech.phase[..., 1], _canon(_phase_rad(1)), atol=2e-3)


def test_phase_header_scaling_is_honoured_and_explicit_units_win(tmp_path):
    for e in range(2):
        _save(tmp_path / f"m{e}.nii.gz", _mag(e))
        # integers with scl_slope = π/4096, scl_inter = 0: nibabel returns radians
        _save(tmp_path / f"p{e}.nii.gz", np.round(_phase_rad(e) * 4096 / np.pi), dtype=np.int16,
              slope=np.pi / 4096, inter=0.0)
    kw = dict(magnitude=[tmp_path / "m0.nii.gz", tmp_path / "m1.nii.gz"],
              phase=[tmp_path / "p0.nii.gz", tmp_path / "p1.nii.gz"], te=TE[:2], b0=3.0)
    ech = load_echoes(**kw)
    assert ech.vendor["phase_units"] == "rad"
    assert ech.vendor["phase_header_scaling"]["scl_slope"] == pytest.approx(np.pi / 4096)
    assert np.allclose(ech.phase[..., 0], _canon(_phase_rad(0)), atol=1e-3)
    # explicit units win (here deliberately "mrad": the radians are divided by 1000)
    ech2 = load_echoes(**kw, phase_units="mrad")
    assert ech2.vendor["phase_units"] == "mrad" and ech2.vendor["phase_units_source"] == "argument"
    assert np.allclose(ech2.phase, ech.phase / 1000, atol=1e-7)
    # phase sign
    ech3 = load_echoes(**kw, phase_sign=-1)
    assert np.allclose(ech3.phase, -ech.phase) and ech3.vendor["phase_sign"] == -1


def test_detect_phase_units_rules():
    assert detect_phase_units(np.array([-3.14159, 3.14159]))[0] == "rad"
    assert detect_phase_units(np.array([0.0, 6.2831]))[0] == "rad"
    assert detect_phase_units(np.array([-4096.0, 4095.0]))[0] == "siemens"
    assert detect_phase_units(np.array([-3142.0, 3141.0]))[0] == "mrad"
    assert detect_phase_units(np.array([-2000.0, 2000.0]), "SIEMENS")[0] == "siemens"
    assert detect_phase_units(np.array([-2000.0, 2000.0]), "Philips Medical Systems")[0] == "mrad"
    for bad in ([-2000.0, 2000.0], [-9000.0, 9000.0], [-4.0, 4.0], [0.0, 100.0]):
        with pytest.raises(ScanError, match="neither radians"):
            detect_phase_units(np.array(bad))
    with pytest.raises(ScanError, match="neither radians"):
        detect_phase_units(np.array([-9000.0, 9000.0]), "Siemens")


def test_unknown_phase_range_is_refused_on_load(tmp_path):
    # a smooth, unwrapped map ×50: no saturation at both ends, no even spread → no evidence for rescale
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    ramp = [(0.4 * (e + 1) * (i + 0.5 * j - 0.3 * k) + 0.2).astype(np.float32) for e in range(2)]
    _save(tmp_path / "m.nii.gz", np.stack([_mag(0), _mag(1)], -1))
    _save(tmp_path / "p.nii.gz", np.stack(ramp, -1) * 50)
    with pytest.raises(ScanError, match="phase: values in .* neither radians.*--phase-units"):
        load_echoes(magnitude=tmp_path / "m.nii.gz", phase=tmp_path / "p.nii.gz", te=TE[:2], b0=3)


def test_4d_files_with_te_in_ms_and_field_strength_fallback(tmp_path):
    m = _save(tmp_path / "mag.nii.gz", np.stack([_mag(e) for e in range(3)], -1))
    p = _save(tmp_path / "phase.nii.gz", np.stack([_phase_rad(e) for e in range(3)], -1))
    with pytest.warns(UserWarning, match="milliseconds"):
        ech = load_echoes(magnitude=m, phase=p, te=[4, 8, 12], b0=7.0)
    assert ech.te == pytest.approx(TE) and ech.b0_tesla == 7.0 and ech.vendor["b0_source"] == "argument"
    assert "ms converted" in ech.vendor["te_source"]
    assert np.allclose(ech.phase[..., 2], _canon(_phase_rad(2)), atol=1e-6)
    # TE and B0 from the 4-D file's sidecar (EchoTime list; MagneticFieldStrength without ImagingFrequency)
    _sidecar(m, EchoTime=list(TE), MagneticFieldStrength=1.5)
    ech = load_echoes(magnitude=[m], phase=[p])
    assert ech.te == pytest.approx(TE) and ech.b0_tesla == 1.5
    assert ech.vendor["b0_source"] == "sidecar MagneticFieldStrength"
    # the argument wins over the sidecar
    assert load_echoes(magnitude=m, phase=p, b0=3.0).b0_tesla == 3.0


def _pair(tmp_path, n=2, mag_shape=SHAPE, ph_shape=SHAPE, ph_affine=AFFINE, nan=False, zero=False):
    ms, ps = [], []
    for e in range(n):
        mg = np.ones(mag_shape, np.float32) if not zero or e == 0 else np.zeros(mag_shape, np.float32)
        ph = np.zeros(ph_shape, np.float32)
        if nan and e == 1:
            ph[0, 0, 0] = np.nan
        ms.append(_save(tmp_path / f"m{e}.nii.gz", mg))
        ps.append(_save(tmp_path / f"p{e}.nii.gz", ph, affine=ph_affine))
    return ms, ps


@pytest.mark.parametrize("case,match", [
    ("shape", "shape .* differs"),
    ("affine", "affine differs"),
    ("count", "2 echoes but magnitude has 3"),
    ("te_missing", "echo times missing"),
    ("te_order", "strictly increasing"),
    ("te_count", "2 echo times for 3 echoes"),
    ("nan", "phase echo 2: NaN"),
    ("zero", "magnitude echo 2: all zero"),
    ("b0_missing", "field strength missing"),
    ("nothing", "nothing given"),
    ("only_mag", "phase: missing"),
    ("no_folder", "does not exist"),
    ("not_a_folder", "is not a folder"),
    ("empty_folder", "neither BIDS MEGRE files"),
    ("units", "phase_units: expected one of"),
    ("sign", "phase_sign: expected"),
    ("both", "not both"),
    ("bids_missing_phase", "differ"),
    ("sidecar_te_ms", "milliseconds"),
])
def test_bad_inputs_name_the_input(tmp_path, case, match):
    te3 = list(TE)
    if case == "shape":
        ms, ps = _pair(tmp_path, ph_shape=(6, 7, 4))
        call = dict(magnitude=ms, phase=ps, te=te3[:2], b0=3)
    elif case == "affine":
        ms, ps = _pair(tmp_path, ph_affine=np.diag([1.0, 1.5, 2.0, 1.0]))
        call = dict(magnitude=ms, phase=ps, te=te3[:2], b0=3)
    elif case == "count":
        ms, ps = _pair(tmp_path, n=3)
        call = dict(magnitude=ms, phase=ps[:2], te=te3, b0=3)
    elif case == "te_missing":
        ms, ps = _pair(tmp_path)
        call = dict(magnitude=ms, phase=ps, b0=3)
    elif case == "te_order":
        ms, ps = _pair(tmp_path)
        call = dict(magnitude=ms, phase=ps, te=[0.008, 0.004], b0=3)
    elif case == "te_count":
        ms, ps = _pair(tmp_path, n=3)
        call = dict(magnitude=ms, phase=ps, te=te3[:2], b0=3)
    elif case == "nan":
        ms, ps = _pair(tmp_path, nan=True)
        call = dict(magnitude=ms, phase=ps, te=te3[:2], b0=3)
    elif case == "zero":
        ms, ps = _pair(tmp_path, zero=True)
        call = dict(magnitude=ms, phase=ps, te=te3[:2], b0=3)
    elif case == "b0_missing":
        ms, ps = _pair(tmp_path)
        call = dict(magnitude=ms, phase=ps, te=te3[:2])
    elif case == "nothing":
        call = {}
    elif case == "only_mag":
        ms, ps = _pair(tmp_path)
        call = dict(magnitude=ms, te=te3[:2], b0=3)
    elif case == "no_folder":
        call = dict(inputs=tmp_path / "nope")
    elif case == "not_a_folder":
        ms, ps = _pair(tmp_path)
        call = dict(inputs=ms[0])
    elif case == "empty_folder":
        (tmp_path / "x.txt").write_text("hello")
        call = dict(inputs=tmp_path)
    elif case == "units":
        ms, ps = _pair(tmp_path)
        call = dict(magnitude=ms, phase=ps, te=te3[:2], b0=3, phase_units="degrees")
    elif case == "sign":
        ms, ps = _pair(tmp_path)
        call = dict(magnitude=ms, phase=ps, te=te3[:2], b0=3, phase_sign=2)
    elif case == "both":
        ms, ps = _pair(tmp_path)
        call = dict(inputs=tmp_path, magnitude=ms, phase=ps)
    elif case == "bids_missing_phase":
        root = _bids(tmp_path)
        next((root / "sub-01" / "anat").glob("*echo-3_part-phase_MEGRE.nii.gz")).unlink()
        call = dict(inputs=root)
    elif case == "sidecar_te_ms":   # sidecar TE in ms: converted with a warning, not refused
        root = _bids(tmp_path, te=(4.0, 8.0, 12.0))
        with pytest.warns(UserWarning, match=match):
            ech = load_echoes(root)
        assert ech.te == pytest.approx(TE)
        return
    with pytest.raises(ScanError, match=match):
        load_echoes(**call)


def test_echoes_record_validates():
    m = np.ones(SHAPE + (2,), np.float32)
    Echoes(magnitude=m, phase=np.zeros_like(m), te=TE[:2], b0_tesla=3)
    for kw, match in ((dict(te=TE), "3 echo times for 2"), (dict(te=(0.01, 0.005)), "strictly increasing"),
                      (dict(b0_tesla=-1), "b0_tesla"), (dict(phase=np.zeros(SHAPE + (3,))), "3 echoes but"),
                      (dict(magnitude=m * np.nan), "NaN"), (dict(magnitude=-m), "negative"),
                      (dict(te=(4.0, 8.0)), "milliseconds")):
        args = dict(magnitude=m, phase=np.zeros_like(m), te=TE[:2], b0_tesla=3)
        args.update(kw)
        with pytest.raises(ScanError, match=match):
            Echoes(**args)
    c = Echoes.from_complex(m * np.exp(0.5j), TE[:2], 3.0)
    assert np.allclose(c.phase, 0.5) and np.allclose(c.complex(), m * np.exp(0.5j))


# ----------------------------------------------------------------------------------------------- DICOM

def test_dicom_without_dcm2niix_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(loadmod, "dcm2niix_binary", lambda: None)
    with pytest.raises(ScanError, match="pip install dcm2niix"):
        loadmod.dicom_to_bids(tmp_path, tmp_path / "out")


def _write_dicom_series(folder, pydicom, n_echo=2, with_phase=True):
    """A tiny multi-echo Siemens-like GRE series (one file per slice, echo and part)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    study, frame = generate_uid(), generate_uid()
    series = {"M": generate_uid(), "P": generate_uid()}
    rows, cols, nsl = 8, 6, 4
    inst = 0
    for part in (("M", "P") if with_phase else ("M",)):
        for e in range(n_echo):
            for s in range(nsl):
                inst += 1
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
                meta.MediaStorageSOPInstanceUID = generate_uid()
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds = FileDataset(str(folder / f"im{inst:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
                ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
                ds.Modality, ds.Manufacturer, ds.PatientName, ds.PatientID = "MR", "SIEMENS", "Phantom", "P1"
                ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, frame
                ds.SeriesInstanceUID = series[part]
                ds.SeriesNumber = 5 if part == "M" else 6
                ds.SeriesDescription = "gre_me"
                ds.ImageType = ["ORIGINAL", "PRIMARY", part, "ND"]
                ds.InstanceNumber = e * nsl + s + 1
                ds.EchoNumbers, ds.EchoTime = e + 1, 4.0 * (e + 1)
                ds.RepetitionTime, ds.FlipAngle = 30.0, 15.0
                ds.ScanningSequence, ds.SequenceVariant = "GR", "SP"
                ds.MagneticFieldStrength, ds.ImagingFrequency = 3.0, 123.2
                ds.ImagePositionPatient = [0.0, 0.0, 2.0 * s]
                ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
                ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
                ds.Rows, ds.Columns = rows, cols
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
                if part == "M":
                    img = np.full((rows, cols), 1000 - 100 * e, np.uint16)
                    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
                else:   # Siemens phase: 0..4095 stored, slope 2, intercept −4096 → −4096..4094
                    img = np.full((rows, cols), 2048 + 512 * (e + 1), np.uint16)
                    ds.RescaleSlope, ds.RescaleIntercept = 2, -4096
                ds.PixelData = img.tobytes()
                ds.save_as(str(folder / f"im{inst:04d}.dcm"), enforce_file_format=True)


def test_dicom_folder_is_converted_with_dcm2niix(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    if loadmod.dcm2niix_binary() is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")
    dcm = tmp_path / "dicom"
    dcm.mkdir()
    _write_dicom_series(dcm, pydicom)
    ech = load_echoes(dcm)
    assert ech.n_echoes == 2 and ech.te == pytest.approx((0.004, 0.008))
    assert ech.b0_tesla == pytest.approx(123.2 / GAMMA_BAR_MHZ_PER_T)
    assert ech.vendor["converted_with"] == "dcm2niix" and ech.vendor["phase_units"] == "siemens"
    # stored 2048 + 512·(e+1) with slope 2, intercept −4096 → 1024·(e+1) → ×π/4096 = π/4·(e+1)
    assert np.allclose(ech.phase[..., 0], np.pi / 4, atol=1e-3)
    assert np.allclose(ech.phase[..., 1], np.pi / 2, atol=1e-3)
    assert np.allclose(ech.magnitude[..., 1], 900)
    assert ech.sources == (str(dcm.resolve()),)
    only_mag = tmp_path / "dicom_mag"
    only_mag.mkdir()
    _write_dicom_series(only_mag, pydicom, with_phase=False)
    with pytest.raises(ScanError, match="no gradient-echo series with both magnitude and phase"):
        load_echoes(only_mag)
