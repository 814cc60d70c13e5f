"""Honest synthetic training data (napari_qsm.nn.synth, ``SynthConfig.honest``): the patch field is not the
inversion's discrete forward model of the patch χ, and the default (honest off) is unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from napari_qsm.nn.synth import Head, SynthConfig, fine_grid_field, fine_grid_kernel, phase_per_ppm, sample_pair
from nn_test_helpers import blob_volume, np_conv, np_dipole, rel_demeaned as _rel


def _np_field(chi, voxel_size, b0, pshape):
    """D ∗ χ zero-padded to ``pshape`` (numpy real FFTs), cropped back."""
    return np_conv(chi.astype(np.float64), np_dipole(pshape, voxel_size, b0), pshape)


def _head(shape=(40, 40, 40), vs=(1.0, 1.0, 1.0)):
    chi, mask = blob_volume(shape)
    mag = np.where(mask, 1.0, 0.1).astype(np.float32)
    return Head(chi=chi, mask=mask, magnitude=mag, labels=mask.astype(np.int16), voxel_size=vs, seed=0)


B0 = np.array([0.3, -0.2, 0.93]) / np.linalg.norm([0.3, -0.2, 0.93])


def test_fine_grid_kernel_is_the_voxel_average_of_a_finer_grid():
    """The closed-form alias sum equals a brute-force "replicate χ 2x, discrete D on the fine grid, average
    each voxel" written out in numpy; factor 1 is the plain discrete kernel, and it differs from factor 2."""
    chi, mask = blob_volume((24, 24, 24))
    vs = (1.0, 0.8, 1.6)
    fine = np.repeat(np.repeat(np.repeat(chi, 2, 0), 2, 1), 2, 2)
    ff = _np_field(fine, tuple(v / 2 for v in vs), B0, tuple(4 * n for n in chi.shape))
    brute = ff.reshape(24, 2, 24, 2, 24, 2).mean(axis=(1, 3, 5))
    got = fine_grid_field(chi, vs, B0, factor=2)
    m = mask
    assert _rel(got, brute, m) < 1e-4
    discrete = _np_field(chi, vs, B0, tuple(2 * n for n in chi.shape))
    assert _rel(fine_grid_field(chi, vs, B0, factor=1), discrete, m) < 1e-4
    assert _rel(got, discrete, m) > 0.02
    # replicate-then-average of a constant kernel is the identity: Σ of the alias weights is 1
    H = fine_grid_kernel((16, 16, 16), vs, B0, factor=(2, 2, 3)).numpy()
    assert np.all(np.abs(H) <= 2.0 / 3.0 + 1e-5) and abs(float(H[0, 0, 0])) < 1e-7


def test_default_is_unchanged():
    """honest is off by default; the default field is the discrete forward model (+ the single-echo noise)."""
    cfg = SynthConfig(patch=(32, 32, 32), min_mask_fraction=0.1)
    assert cfg.honest is False and SynthConfig.from_dict({}).honest is False
    head = _head()
    s = sample_pair(head, np.random.default_rng(3), cfg, augment=False, snr=None, b0_direction=B0)
    m = s.mask > 0.5
    ref = _np_field(s.chi, s.voxel_size, B0, (64, 64, 64)) * m
    assert _rel(s.field, ref, m) < 1e-4
    s2 = sample_pair(head, np.random.default_rng(3), cfg, augment=False, snr=100.0, b0_direction=B0)
    ppp = phase_per_ppm(cfg.b0_tesla, cfg.te)
    mean_mag = float(s2.magnitude[m].mean())
    expect = np.minimum(1.0, mean_mag / (100.0 * np.maximum(s2.magnitude, 1e-6))) / ppp
    assert np.allclose(s2.noise_std, expect, rtol=1e-5)
    z = (s2.field - s.field)[m] / s2.noise_std[m]
    assert 0.9 < z.std() < 1.1
    assert "honest" not in s.info


@pytest.mark.parametrize("vs, protocol", [((1.0, 1.0, 1.0), "research"), ((0.75, 0.75, 3.0), "clinical")])
def test_honest_field_is_not_the_inversion_forward_model(vs, protocol):
    """honest=True: noise-free, the fitted field is the finer-grid field (not the discrete D ∗ χ of the
    patch); with noise, the fitted N_std describes the field's noise; the echo protocol follows the voxel."""
    head = _head(vs=vs)
    cfg = SynthConfig(patch=(32, 32, 32), min_mask_fraction=0.1, honest=True)
    s = sample_pair(head, np.random.default_rng(5), cfg, augment=False, snr=None, b0_direction=B0)
    m = s.mask > 0.5
    discrete = _np_field(s.chi, vs, B0, (64, 64, 64)) * m
    fine = fine_grid_field(s.chi, vs, B0, factor=2) * m
    assert s.info["honest"] and s.info["echo_protocol"] == protocol
    assert _rel(s.field, fine, m) < 1e-3               # the fit recovers the fine-grid field exactly
    d = _rel(s.field, discrete, m)
    assert 0.02 < d < 0.5, d                            # model error: not the inversion's kernel, still χ's field
    sn = sample_pair(head, np.random.default_rng(5), cfg, augment=False, snr=40.0, b0_direction=B0)
    assert np.array_equal(sn.chi, s.chi)
    z = (sn.field - s.field)[m] / sn.noise_std[m]
    assert 0.8 < z.std() < 1.25
    assert np.isfinite(sn.field).all() and np.all(sn.field[~m] == 0)


def test_honest_config_round_trip():
    cfg = SynthConfig.from_dict({"honest": True, "honest_factor": 3, "honest_r2_base": [10, 20]})
    assert cfg.honest and cfg.honest_factor == 3 and cfg.honest_r2_base == (10, 20)
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg
