"""Real-data classes the front end used to misread silently (issue 24), one synthetic reproduction each.

Phase in an arbitrary float scale (±π/855, saturating), unsigned Siemens integers 0..4095, GE's flipped
sign, no air in the field of view (σ from the echo-fit residual), coil-combined magnitudes (sum of squares
of 8 channels: non-central χ), an ambiguous phase (error naming --phase-units, nothing written).
The signal: a smooth field with wraps, R2* decay, a receive-phase offset, textured proton density and
complex Gaussian noise of known σ per channel.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.core.field.fit import LinearFitParams, fit_linear
from napari_qsm.core.field.load import detect_phase_units, load_echoes
from napari_qsm.core.field.records import Echoes
from napari_qsm.core.io import GAMMA_BAR_MHZ_PER_T as GBAR
from napari_qsm.core.scan import ScanError

SHAPE = (32, 32, 24)
VS = (2.0, 2.0, 2.0)
TE = (0.004, 0.008, 0.012)
B0 = 2.89
SIGMA = 0.02
AFFINE = np.diag(list(VS) + [1.0])


def _smooth(rng, shape, scale=6.0):
    from scipy import ndimage
    return ndimage.gaussian_filter(rng.standard_normal(shape), scale, mode="wrap")


def _truth(air=True, seed=0):
    """(object mask, field ppm, R2* 1/s, receive phase rad, proton density) on SHAPE."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    obj = ((x ** 2 + y ** 2 + (z / 0.9) ** 2) < 0.72 ** 2) if air else np.ones(SHAPE, bool)
    field = (0.6 * x + 0.4 * y * y - 0.3 * z + 0.1 * np.sin(3 * x * y)).astype(np.float32)
    r2 = (20 + 10 * (x + 1)).astype(np.float32)
    po = (1.5 * np.sin(1.3 * x + 0.7 * y) + 0.8 * z + 2.0).astype(np.float32)
    tex = _smooth(rng, SHAPE, 2.0)
    pd = (1.0 + 0.3 * tex / tex.std()) * (1.0 + 0.2 * x)          # texture and a smooth intensity bias
    return obj, field, r2, po, np.clip(pd, 0.3, None).astype(np.float32)


def _clean(obj, field, r2, po, pd, te=TE):
    te = np.asarray(te)
    return (obj * pd)[..., None] * np.exp(-te * r2[..., None]) * np.exp(
        1j * (po[..., None] + 2 * np.pi * GBAR * B0 * field[..., None] * te))


def _noise(shape, sigma, rng):
    return sigma * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))


def _single_channel(air=True, seed=0, sigma=SIGMA):
    obj, field, r2, po, pd = _truth(air, seed)
    S = _clean(obj, field, r2, po, pd) + _noise(SHAPE + (len(TE),), sigma, np.random.default_rng(seed + 1))
    return Echoes.from_complex(S, TE, B0, voxel_size=VS), obj, field


def _coil_combined(n_coils=8, air=True, seed=0, sigma=SIGMA):
    """n channels with smooth complex sensitivities, each with noise σ; magnitude = root sum of squares of the
    channels, phase = the sensitivity-weighted (Roemer) combination, normalised so that its noise stays σ."""
    rng = np.random.default_rng(seed + 7)
    obj, field, r2, po, pd = _truth(air, seed)
    S = _clean(obj, field, r2, po, pd)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    sens = []
    for c in range(n_coils):
        a = 2 * np.pi * c / n_coils
        cx, cy = 1.3 * np.cos(a), 1.3 * np.sin(a)
        mag = np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (0.5 * z) ** 2) / (2 * 0.9 ** 2))
        sens.append(mag * np.exp(1j * (0.7 * c + 0.5 * x * np.cos(a) + 0.3 * y)))
    sens = np.stack(sens, -1)                                    # (i, j, k, coil)
    norm = np.sqrt((np.abs(sens) ** 2).sum(-1))
    sos = np.zeros(S.shape, np.float64)
    comb = np.zeros(S.shape, np.complex128)
    for c in range(n_coils):
        s_c = sens[..., c, None] * S + _noise(S.shape, sigma, rng)
        sos += np.abs(s_c) ** 2
        comb += np.conj(sens[..., c, None]) * s_c
    comb /= norm[..., None]
    ech = Echoes(magnitude=np.sqrt(sos).astype(np.float32), phase=np.angle(comb).astype(np.float32), te=TE,
                 b0_tesla=B0, voxel_size=VS)
    return ech, obj, field


def _inner(obj, margin=3):
    """The object without its outer voxels (where the field is not the point of these tests)."""
    from scipy import ndimage
    return ndimage.binary_erosion(obj, iterations=margin) if not obj.all() else obj


def _write_bids(root: Path, magnitude, stored_phase, manufacturer="napari-qsm test", dtype=np.float32):
    anat = Path(root) / "sub-01" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    for e, te in enumerate(TE):
        side = {"EchoTime": te, "MagneticFieldStrength": B0, "Manufacturer": manufacturer}
        for part, data, dt in (("mag", magnitude[..., e], np.float32), ("phase", stored_phase[..., e], dtype)):
            stem = anat / f"sub-01_echo-{e + 1}_part-{part}_MEGRE"
            nib.save(nib.Nifti1Image(np.asarray(data).astype(dt), AFFINE), str(stem) + ".nii.gz")
            Path(str(stem) + ".json").write_text(json.dumps(side))
    return Path(root)


def _total_field(ech):
    return fit_linear(ech, LinearFitParams(noise_sigma=SIGMA), device="cpu").field


# ----------------------------------------------------------------------------------------------- phase units

def test_arbitrary_float_scale_is_rescaled_and_gives_the_field(tmp_path, one_torch_thread):
    """Phase stored as ±π/855 (±0.0037), tissue everywhere: today taken for radians (χ 855× too small)."""
    ech, obj, _ = _single_channel(air=False)
    stored = ech.phase * np.float32(1 / 855)
    loaded = load_echoes(_write_bids(tmp_path, ech.magnitude, stored))
    f_ref, f = _total_field(ech), _total_field(loaded)
    m = _inner(obj)
    assert np.abs(f - f_ref)[m].max() < 1e-3 * np.abs(f_ref[m]).max()
    # min..max → −π..π: the phase is the radians' (up to the few-1e-4 rad gap at the range's ends)
    d = np.angle(np.exp(1j * (loaded.phase - ech.phase)))
    assert np.abs(d).max() < 2e-3
    assert loaded.vendor["phase_units"] == "rescale", loaded.vendor["phase_units_source"]
    assert "wrapped phase" in loaded.vendor["phase_units_source"]


def test_unsigned_siemens_integers_map_to_minus_pi_pi(tmp_path, one_torch_thread):
    """Siemens phase 0..4095 (unsigned 12 bit): today ×π/4096 puts it in [0, π] and halves the field."""
    ech, obj, _ = _single_channel(air=True)
    stored = np.mod(np.round((ech.phase + np.pi) * 4096 / (2 * np.pi)), 4096).astype(np.uint16)
    assert stored.min() == 0 and stored.max() == 4095
    root = _write_bids(tmp_path, ech.magnitude, stored, manufacturer="Siemens", dtype=np.uint16)
    for units in ("auto", "siemens", "siemens-unsigned"):
        loaded = load_echoes(root, phase_units=units)
        f_ref, f = _total_field(ech), _total_field(loaded)
        m = _inner(obj)
        assert np.abs(f - f_ref)[m].max() < 0.01 * np.abs(f_ref[m]).max()
        d = np.angle(np.exp(1j * (loaded.phase - ech.phase)))
        assert np.abs(d).max() < 2 * np.pi / 4096
        assert loaded.vendor["phase_units"] == "siemens-unsigned", loaded.vendor["phase_units_source"]
        assert loaded.vendor["phase_scale"] == pytest.approx(np.pi / 2048)


def test_signed_siemens_and_radians_still_detected():
    from napari_qsm.cli import PHASE_UNIT_CHOICES
    from napari_qsm.core.field.load import PHASE_UNITS, phase_to_radians
    assert PHASE_UNIT_CHOICES == PHASE_UNITS   # the command line offers every unit the loader knows
    v = np.linspace(-np.pi, np.pi, 5000)
    assert detect_phase_units(v)[0] == "rad"
    assert detect_phase_units(np.round(v * 4096 / np.pi).clip(-4096, 4095))[0] == "siemens"
    rad, facts = phase_to_radians(np.round(v * 4096 / np.pi).clip(-4096, 4095))
    assert facts["phase_scale"] == pytest.approx(np.pi / 4096) and np.abs(rad - v).max() < 1e-3


def test_ge_phase_sign_is_flipped_from_the_manufacturer(tmp_path):
    ech, _, _ = _single_channel(air=True)
    root = _write_bids(tmp_path, ech.magnitude, -ech.phase, manufacturer="GE MEDICAL SYSTEMS")
    loaded = load_echoes(root)
    assert loaded.vendor["phase_sign"] == -1 and "GE" in loaded.vendor["phase_sign_source"]
    assert np.abs(np.angle(np.exp(1j * (loaded.phase - ech.phase)))).max() < 1e-5
    kept = load_echoes(root, phase_sign=1)   # an explicit sign wins
    assert kept.vendor["phase_sign"] == 1 and np.allclose(kept.phase, -ech.phase, atol=1e-6)


def test_ambiguous_phase_stops_with_an_error_naming_phase_units_and_writes_nothing(tmp_path, capsys):
    """A smooth, unwrapped phase of ±0.5: neither filling 2π (radians) nor saturating (rescale)."""
    from napari_qsm.cli import main
    ech, obj, field = _single_channel(air=True)
    smooth = np.repeat((0.5 * field / np.abs(field).max())[..., None], len(TE), axis=3)
    root = _write_bids(tmp_path / "raw", ech.magnitude, smooth)
    with pytest.raises(ScanError, match="--phase-units"):
        load_echoes(root)
    out = tmp_path / "out"
    assert main(["field", str(root), "-o", str(out), "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--phase-units" in err and "rescale" in err
    assert not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------------------------------- noise

def test_noise_without_air_comes_from_the_fit_residual(one_torch_thread):
    """Tissue everywhere: today the 'air' corners are tissue and σ is the tissue signal."""
    ech, obj, _ = _single_channel(air=False)
    tf = fit_linear(ech, device="cpu")
    assert tf.provenance["noise_sigma_source"].startswith("echo-fit residual")
    assert tf.provenance["noise_sigma"] == pytest.approx(SIGMA, rel=0.2)
    # N_std then predicts the field's scatter (not 30x too large): ratio of the mean N_std to the true one
    ref = fit_linear(ech, LinearFitParams(noise_sigma=SIGMA), device="cpu")
    assert np.median(tf.noise_std / ref.noise_std) == pytest.approx(1.0, rel=0.2)


@pytest.mark.parametrize("coils,air", [(8, True), (8, False), (32, True)])
def test_coil_combined_sum_of_squares_noise(coils, air, one_torch_thread):
    """N channels combined by root sum of squares: in air |S| ~ σ·χ_2N, today's corner σ is √N too high (and the
    air's sum-of-squares floor √(2N)·σ must not pass for signal in the residual estimate)."""
    ech, obj, _ = _coil_combined(coils, air=air)
    tf = fit_linear(ech, device="cpu")
    assert tf.provenance["noise_sigma"] == pytest.approx(SIGMA, rel=0.2), tf.provenance["noise_sigma_source"]
    res = tf.provenance["noise_tests"]["residual_sigma"]
    assert res == pytest.approx(SIGMA, rel=0.2)
    if air:
        assert tf.provenance["noise_sigma_source"].startswith("FOV corners")
        assert tf.provenance["noise_tests"]["n_channels"] == pytest.approx(coils, rel=0.25)
    else:
        assert tf.provenance["noise_sigma_source"].startswith("echo-fit residual")


def test_air_corners_are_used_only_when_they_are_air():
    """Single channel in air: Rayleigh corners (N ≈ 1) agree with the residual; bright corners are refused."""
    from napari_qsm.core.field.noise import estimate_noise_sigma
    ech, _, _ = _single_channel(air=True)
    est = estimate_noise_sigma(ech.magnitude)
    assert est.source.startswith("FOV corners") and est.sigma == pytest.approx(SIGMA, rel=0.1)
    assert est.details["n_channels"] == pytest.approx(1.0, rel=0.2)
    tissue, _, _ = _single_channel(air=False)
    est = estimate_noise_sigma(tissue.magnitude)
    assert not est.source.startswith("FOV corners")
    assert not any(b["air"] for b in est.details["corners"])


# ----------------------------------------------------------------------------------------------- facts

def test_sidecar_b0_direction_is_in_the_stored_frame_and_load_scan_reads_it_back(tmp_path):
    """A permuted, flipped, oblique grid: the sidecar's B0Direction (stored frame) read by load_scan gives back the
    canonical direction the field was made with; B0 and ΔTE come from the sidecar, explicit values win."""
    from napari_qsm.core.field.facts import direction_to_stored, field_sidecar
    from napari_qsm.core.io import direction_to_canonical, load_scan, read_volume, sidecar_path, write_json
    from napari_qsm.core.field.records import TotalField

    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.array([[0, 0, -1.5, 20], [c * 2.0, -s, 0, -5], [s * 2.0, c, 0, 3], [0, 0, 0, 1.0]])
    shape = (6, 5, 4)
    field = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(field, aff), str(tmp_path / "local_field.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), aff), str(tmp_path / "mask.nii.gz"))
    data, can_aff, info = read_volume(tmp_path / "local_field.nii.gz")
    b_can = np.array([0.2, -0.3, 0.93])
    b_can /= np.linalg.norm(b_can)
    assert np.allclose(direction_to_canonical(direction_to_stored(b_can, aff), aff), b_can)
    total = TotalField(field=data, noise_std=np.ones_like(data), r2star=np.zeros_like(data), magnitude=np.ones_like(data),
                       te=(0.004, 0.009, 0.014), b0_tesla=6.98, delta_te=0.005, affine=can_aff, b0_direction=b_can,
                       provenance={"noise_sigma": 0.01, "noise_sigma_source": "test",
                                   "echoes": {"vendor": {"phase_units": "rescale", "phase_units_source": "auto: x"}}})
    write_json(sidecar_path(tmp_path / "local_field.nii.gz"), field_sidecar("local field", "ppm", total,
                                                                            original_affine=aff))
    scan = load_scan(tmp_path / "local_field.nii.gz", tmp_path / "mask.nii.gz")
    assert np.allclose(scan.b0_direction, b_can, atol=1e-9) and scan.source["b0_direction_source"] == "sidecar B0Direction"
    assert scan.b0_tesla == pytest.approx(6.98) and scan.te == pytest.approx(0.005)
    assert scan.source["field_facts"]["PhaseUnits"] == "rescale" and scan.source["field_facts"]["NoiseSigma"] == 0.01
    explicit = load_scan(tmp_path / "local_field.nii.gz", tmp_path / "mask.nii.gz", te=0.02, b0=3.0)
    assert explicit.te == 0.02 and explicit.b0_tesla == 3.0 and explicit.source["te_source"] == "argument"
