"""The chain's through-origin refit (core/field/refit.py): physics on small grids.

A voxel whose field varies within it (a vein's wall: two compartments with different field and T2*) has a
phase that bends with TE. The free-intercept slope over late echoes follows the long-lived compartment; the
voxel-mean field (what the dipole model of voxel-mean χ predicts) is better met by the phase anchored at TE 0.
"""

import numpy as np
import pytest

from napari_qsm.core.field.fit import _gauss_smooth_complex, _wrap
from napari_qsm.core.field.pipeline import FieldRecipe, local_field
from napari_qsm.core.field.records import Echoes
from napari_qsm.core.field.refit import smooth_phase, through_origin

RAD_PER_PPM_S = 2 * np.pi * 42.577478 * 3.0      # ω per ppm at 3 T (rad/s)
TE = tuple(0.0126 + 0.0041 * k for k in range(7))  # the clinical slab's echoes: TE1/ΔTE = 3.07 (not an integer)


def _scene(delta=0.05, seed=0, shape=(24, 24, 12), vs=(1.0, 1.0, 2.0)):
    """Echoes of a field that wraps (±1.2 ppm, period 1.91 ppm), a curved receive phase, and a block of
    two-compartment voxels: half at f + δ with R2* 60 1/s, half at f − δ with R2* 18 (voxel mean f)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    f = 0.1 * (i - 12) + 0.03 * (j - 12) - 0.002 * (k - 6) ** 2
    phi0 = 0.7 + 0.05 * (i - 12) - 0.03 * (j - 12) + 0.002 * (i - 12) * (k - 6) + 0.0008 * (j - 12) ** 2
    pv = np.zeros(shape, bool)
    pv[6:18, 10:13, 3:9] = True
    S = np.zeros(shape + (len(TE),), complex)
    for e, t in enumerate(TE):
        one = 0.8 * np.exp(-18 * t) * np.exp(1j * RAD_PER_PPM_S * f * t)
        two = (0.5 * 0.75 * np.exp(-60 * t) * np.exp(1j * RAD_PER_PPM_S * (f + delta) * t)
               + 0.5 * 0.8 * np.exp(-18 * t) * np.exp(1j * RAD_PER_PPM_S * (f - delta) * t))
        S[..., e] = np.where(pv, two, one) * np.exp(1j * phi0)
    sig = 0.8 / 300
    S = S + rng.normal(0, sig, S.shape) + 1j * rng.normal(0, sig, S.shape)
    ech = Echoes(magnitude=np.abs(S).astype(np.float32), phase=np.angle(S).astype(np.float32), te=TE, b0_tesla=3.0,
                 affine=np.diag(list(vs) + [1.0]), voxel_size=vs, b0_direction=np.array([0, 0, 1.0]), name="pv")
    return ech, f, pv


def _err(field, f):
    e = field - f
    return e - np.median(e)


def test_chain_field_of_two_compartment_voxels_is_near_their_mean():
    # old code (free-intercept slope over 12.6–37 ms): −0.062 ppm at the two-compartment voxels, beyond −δ
    ech, f, pv = _scene()
    run = local_field(ech, FieldRecipe(), mask=np.ones(f.shape, bool), device="cpu")
    e = _err(run.total.field, f)
    assert run.provenance["unwrap_check"]["residual_jumps"] == 0
    assert abs(float(e[pv].mean())) < 0.045
    assert float(np.sqrt(np.mean(e[~pv] ** 2))) < 0.003        # elsewhere: noise and a smooth offset's remnant
    assert "refit" in run.total.provenance
    fit = run.provenance["steps"][0]                                  # the refit's time counts in the fit's step
    assert fit["family"] == "fit" and fit["refit_seconds"] == run.total.provenance["refit"]["seconds"]
    assert fit["seconds"] >= fit["refit_seconds"]


def test_refit_none_keeps_the_free_slope_and_origin_halves_its_bias():
    ech, f, pv = _scene()
    m = np.ones(f.shape, bool)
    free = local_field(ech, FieldRecipe(params={"fit": {"refit": "none"}}), mask=m, device="cpu").total
    orig = local_field(ech, FieldRecipe(), mask=m, device="cpu").total
    e_free, e_orig = _err(free.field, f), _err(orig.field, f)
    assert "refit" not in free.provenance
    assert abs(float(e_free[pv].mean())) > 0.05                    # the late-echo slope: the long-lived compartment
    assert abs(float(e_orig[pv].mean())) < 0.7 * abs(float(e_free[pv].mean()))
    # through the origin TE1 is a lever: a smaller standard error where the phase is linear in TE
    assert float(np.median(orig.noise_std[~pv])) < 0.8 * float(np.median(free.noise_std[~pv]))


def test_refit_is_blind_to_whole_wrap_periods_of_the_unwrapped_field():
    ech, f, pv = _scene()
    m = np.ones(f.shape, bool)
    free = local_field(ech, FieldRecipe(params={"fit": {"refit": "none"}}), mask=m, device="cpu").total
    period = 1.0 / (42.577478 * 3.0 * (TE[1] - TE[0]))                 # ppm
    a = through_origin(ech, free, m, device="cpu").field
    b = through_origin(ech, free.replace(field=free.field + np.float32(2 * period)), m, device="cpu").field
    d = (b - a)[m]
    assert float(np.std(d)) < 1e-4                                   # a constant offset, nothing else
    with pytest.raises(ValueError, match="unwrapped"):
        through_origin(ech, free.replace(wrapped=True), m)


@pytest.mark.parametrize("vs", [(1.0, 1.0, 1.0), (0.75, 0.75, 3.0)])
def test_smooth_phase_is_exact_for_a_linear_phase_up_to_the_mask_edge(vs):
    shape = (32, 32, 16)
    x = [np.arange(n, dtype=np.float32) * v for n, v in zip(shape, vs)]
    X = np.meshgrid(*x, indexing="ij")
    c = [n * v / 2 for n, v in zip(shape, vs)]
    ball = sum(((a - ci) / (0.45 * n * v)) ** 2 for a, ci, n, v in zip(X, c, shape, vs)) <= 1.0
    ball[:, :, 0] = True                                            # and a cut by the FOV border
    phase = _wrap(0.4 + 0.05 * X[0] - 0.03 * X[1] + 0.02 * X[2])   # rad/mm: a receive phase's gradient
    w = ball.astype(np.float32)
    got = smooth_phase(phase, w, 4.0, vs, device="cpu")
    plain = np.angle(_gauss_smooth_complex(w * np.exp(1j * phase), [4.0 / v for v in vs], "cpu"))
    err = np.abs(_wrap(got - phase))[ball]
    err_plain = np.abs(_wrap(plain - phase))[ball]
    assert float(err_plain.max()) > 0.1                              # the cut window's bias: ∇φ·(centroid offset)
    assert float(err.max()) < 0.005
