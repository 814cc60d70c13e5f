"""Echo fit: known field, R2*, receive-phase offsets and complex noise in → field, N_std, R2* out."""

import numpy as np
import pytest

from napari_qsm.core.field import fit as fitmod
from napari_qsm.core.field.fit import (LinearFitParams, NonlinearFitParams, fit_linear, fit_nonlinear, mcpc3ds,
                                       STEPS)
from napari_qsm.core.field.records import Echoes, TotalField
from napari_qsm.core.io import GAMMA_BAR_MHZ_PER_T as GBAR
from napari_qsm.core.params import ParamError, make_params, specs
from napari_qsm.core.scan import ScanError

B0 = 2.89
SHAPE = (24, 24, 20)
VS = (2.0, 2.0, 2.5)
RESEARCH_TE = np.array([0.004, 0.008, 0.012, 0.016, 0.020])     # TE1/ΔTE = 1
CLINICAL_TE = 0.0126 + 0.0041 * np.arange(7)                     # TE1/ΔTE = 3.07


def _grid():
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    return x, y, z


def _truth(field_scale=1.0, offset="strong"):
    x, y, z = _grid()
    obj = (x ** 2 + y ** 2 + (z / 0.9) ** 2) < 0.75 ** 2
    field = field_scale * (0.3 * x + 0.2 * y * y - 0.15 * z + 0.1 * np.sin(2 * x * y))   # ppm
    r2 = 20 + 10 * (x + 1)                                                                # 1/s
    if offset == "strong":
        po = 1.5 * np.sin(1.3 * x + 0.7 * y) + 0.8 * z + 2.0
    elif offset == "smooth":  # linear plus constant (what MCPC-3D-S's smoothing keeps exactly away from edges)
        po = 0.6 * x - 0.4 * y + 0.3 * z + 2.0
    else:  # constant: smoothing keeps it exactly, edges included
        po = np.full_like(x, 2.0)
    return obj, field.astype(np.float32), r2.astype(np.float32), po.astype(np.float32)


def _signal(te, obj, field, r2, po, sigma, seed, air=True):
    rng = np.random.default_rng(seed)
    te = np.asarray(te)
    S = obj[..., None] * np.exp(-te * r2[..., None]) * np.exp(
        1j * (po[..., None] + 2 * np.pi * GBAR * B0 * field[..., None] * te))
    noise = sigma * (rng.standard_normal(S.shape) + 1j * rng.standard_normal(S.shape))
    if not air:
        noise *= obj[..., None]   # zero-filled background: the corners say nothing about σ
    return Echoes.from_complex(S + noise, te, B0, voxel_size=VS)


def _draws(fn, params, te, n=24, sigma=0.02, **kw):
    obj, field, r2, po = _truth(**kw)
    out = [fn(_signal(te, obj, field, r2, po, sigma, seed), params, device="cpu") for seed in range(n)]
    return obj, field, r2, out


@pytest.mark.parametrize("fn,params,te", [
    (fit_linear, LinearFitParams(), RESEARCH_TE),
    (fit_linear, LinearFitParams(), CLINICAL_TE),
    (fit_nonlinear, NonlinearFitParams(), RESEARCH_TE),
    (fit_linear, LinearFitParams(intercept="zero"), RESEARCH_TE),
])
def test_fit_recovers_field_r2star_and_predicts_its_scatter(fn, params, te, one_torch_thread):
    # through the origin, any residual offset is a bias: MCPC-3D-S's smoothing leaves one at the object's
    # edge for a varying offset (see test_mcpc3ds_removes_a_smooth_offset for the interior), so a constant here
    kw = {"offset": "const"} if getattr(params, "intercept", "fit") == "zero" else {}
    obj, field, r2, out = _draws(fn, params, te, **kw)
    tf = out[-1]
    assert isinstance(tf, TotalField) and tf.field.shape == SHAPE
    f = np.stack([o.field[obj] for o in out])
    nstd = tf.noise_std[obj]
    # the estimate of σ (FOV corners) is the true one
    assert tf.provenance["noise_sigma"] == pytest.approx(0.02, rel=0.05)
    assert tf.provenance["noise_sigma_source"].startswith("FOV corners")
    # N_std matches the empirical scatter over noise draws (median ratio within 15 %)
    ratio = np.median(f.std(0, ddof=1) / nstd)
    assert 0.85 < ratio < 1.15, ratio
    # the field is recovered: error of the mean over draws ~ N_std/√n, no bias beyond that
    err = (f.mean(0) - field[obj]) / (nstd / np.sqrt(len(out)))
    assert np.sqrt(np.mean(err ** 2)) < 1.6, np.sqrt(np.mean(err ** 2))
    # single-draw error is of the predicted size
    single = np.sqrt(np.mean((f[0] - field[obj]) ** 2)) / np.sqrt(np.mean(nstd ** 2))
    assert 0.8 < single < 1.25, single
    # R2*: mean over draws within 1 1/s of the truth (true 20..40 1/s)
    r = np.stack([o.r2star[obj] for o in out]).mean(0)
    assert np.median(np.abs(r - r2[obj])) < 1.0
    # combined magnitude = RSS over echoes
    assert np.allclose(tf.magnitude[obj], np.sqrt((np.exp(-np.asarray(te) * r2[obj][:, None]) ** 2).sum(-1)),
                       rtol=0.1)


def test_intercept_zero_has_lower_noise_than_free_fit(one_torch_thread):
    obj, field, r2, po = _truth(offset="const")
    e = _signal(RESEARCH_TE, obj, field, r2, po, 0.02, 0)
    free = fit_linear(e, LinearFitParams(), device="cpu")
    zero = fit_linear(e, LinearFitParams(intercept="zero"), device="cpu")
    assert np.median(zero.noise_std[obj]) < 0.6 * np.median(free.noise_std[obj])


def test_r2star_is_clipped_to_500(one_torch_thread):
    obj, field, r2, po = _truth()
    e = _signal(RESEARCH_TE, obj, field, np.full(SHAPE, 800.0, np.float32), po, 0.0, 0)
    tf = fit_linear(e, device="cpu")
    assert tf.r2star[obj].max() == pytest.approx(500.0)
    e = _signal(RESEARCH_TE, obj, field, np.full(SHAPE, 300.0, np.float32), po, 0.0, 0)
    assert np.allclose(fit_nonlinear(e, device="cpu").r2star[obj], 300.0, rtol=1e-3)


@pytest.mark.parametrize("te", [RESEARCH_TE, CLINICAL_TE])
def test_mcpc3ds_removes_a_smooth_offset(te, one_torch_thread):
    obj, field, r2, po = _truth(field_scale=3.0, offset="smooth")   # field wraps echo 1 (TE1·ω up to ~6 rad)
    e = _signal(te, obj, field, r2, po, 0.0, 0)
    # a small object (48 mm): σ scaled down with it (the default 10 mm is for a head)
    corrected, offset = mcpc3ds(e, sigma_mm=4.0, device="cpu")
    from scipy.ndimage import binary_erosion
    inner = binary_erosion(obj, iterations=3)
    d = np.angle(np.exp(1j * (offset - po)))[inner]
    assert np.abs(d).max() < 0.05, np.abs(d).max()
    expect = 2 * np.pi * GBAR * B0 * field * te[0]
    d1 = np.angle(np.exp(1j * (corrected.phase[..., 0] - expect)))[inner]
    assert np.abs(d1).max() < 0.05
    assert "MCPC-3D-S" in corrected.vendor["phase_offsets"]
    # without offsets removed, echo 1 is off by the offset
    d0 = np.angle(np.exp(1j * (e.phase[..., 0] - expect)))[inner]
    assert np.abs(d0).max() > 1.0


def test_wrapped_outputs_wrap_cleanly_and_unwrapped_phase_input_does_not(one_torch_thread):
    obj, field, r2, po = _truth(field_scale=8.0)     # |ω·ΔTE| > π in places (period 2.03 ppm at ΔTE 4 ms)
    e = _signal(RESEARCH_TE, obj, field, r2, po, 0.0, 0)
    for tf in (fit_linear(e, device="cpu"), fit_nonlinear(e, device="cpu")):
        assert tf.wrapped
        per = tf.wrap_period_ppm
        assert per == pytest.approx(1 / (GBAR * B0 * 0.004))
        k = (tf.field - field)[obj] / per
        assert np.abs(field[obj]).max() > per / 2          # the test has wraps
        assert np.any(np.abs(k) > 0.5)
        assert np.abs(k - np.round(k)).max() < 1e-3       # the difference is whole wraps only
        assert np.abs(tf.field * tf.rad_per_ppm).max() <= np.pi + 1e-3
    # a spatially unwrapped phase (here the truth, offsets kept) gives the field without wraps
    true_phase = po[..., None] + 2 * np.pi * GBAR * B0 * field[..., None] * RESEARCH_TE
    for p in (LinearFitParams(), LinearFitParams(intercept="zero", offsets="none")):
        ph = true_phase - (po[..., None] if p.intercept == "zero" else 0)
        tf = fit_linear(e, p, unwrapped_phase=ph, device="cpu")
        assert not tf.wrapped
        assert np.abs(tf.field - field)[obj].max() < 1e-4


def test_noise_sigma_from_the_residual_when_the_background_is_zero(one_torch_thread):
    obj, field, r2, po = _truth()
    e = _signal(CLINICAL_TE, obj, field, r2, po, 0.02, 3, air=False)
    for fn in (fit_linear, fit_nonlinear):
        tf = fn(e, device="cpu")
        assert tf.provenance["noise_sigma_source"].startswith("echo-fit residual")
        assert tf.provenance["noise_sigma"] == pytest.approx(0.02, rel=0.12)
    # (N_std from σ alone: where the misfit scaling applies, N_std is the residual's, whatever σ)
    tf = fit_linear(e, LinearFitParams(noise_sigma=0.04, misfit_noise=0.0), device="cpu")
    assert tf.provenance["noise_sigma_source"] == "parameter"
    tf2 = fit_linear(e, LinearFitParams(noise_sigma=0.02, misfit_noise=0.0), device="cpu")
    assert np.allclose(tf.noise_std[obj], 2 * tf2.noise_std[obj], rtol=1e-5)


def test_nonlinear_converges_and_reports(one_torch_thread):
    obj, field, r2, po = _truth()
    e = _signal(RESEARCH_TE, obj, field, r2, po, 0.0, 0)
    msgs = []
    tf = fit_nonlinear(e, NonlinearFitParams(max_iter=30), progress=msgs.append, device="cpu")
    assert np.abs(tf.field - field)[obj].max() < 1e-4
    assert tf.provenance["iterations"] <= 30
    assert msgs and msgs[-1].message == "done"
    one = fit_nonlinear(_signal(RESEARCH_TE, obj, field, r2, po, 0.02, 0), NonlinearFitParams(max_iter=1),
                        device="cpu")
    assert one.provenance["iterations"] == 1


@pytest.mark.parametrize("fn,params", [(fit_linear, LinearFitParams), (fit_nonlinear, NonlinearFitParams)])
def test_n_std_follows_the_misfit_where_the_phase_is_not_linear_in_te(fn, params, one_torch_thread):
    # partial volume: a slab of voxels holds two compartments (60 % / 40 % of the signal) whose fields differ by
    # 0.15 ppm, so the phase of their sum is not linear in TE and its slope misses the voxels' mean field by far
    # more than σ predicts. N_std must say so there (× √misfit; the inversions weigh data by 1/N_std), and stay
    # σ's elsewhere. (√misfit measures the residual scatter, not the slope's bias: it narrows the gap, no more.)
    obj, field, r2, po = _truth(offset="const")
    x, _, _ = _grid()
    mixed = obj & (np.abs(x) < 0.2)
    te = np.asarray(RESEARCH_TE)
    rng = np.random.default_rng(5)
    ph = lambda f: np.exp(1j * (po[..., None] + 2 * np.pi * GBAR * B0 * f[..., None] * te))  # noqa: E731
    decay = np.exp(-te * r2[..., None])
    df = np.float32(0.15)
    S = obj[..., None] * decay * np.where(mixed[..., None], 0.6 * ph(field) + 0.4 * ph(field + df), ph(field))
    S = S + 0.01 * (rng.standard_normal(S.shape) + 1j * rng.standard_normal(S.shape))
    e = Echoes.from_complex(S, te, B0, voxel_size=VS)
    mean_field = np.where(mixed, field + df / 2, field)            # the volume-mean field each voxel holds
    new = fn(e, params(), device="cpu")
    old = fn(e, params(misfit_noise=0.0), device="cpu")
    z_new = np.abs(new.field - mean_field)[mixed] / new.noise_std[mixed]
    z_old = np.abs(new.field - mean_field)[mixed] / old.noise_std[mixed]
    assert np.median(z_old) > 8, np.median(z_old)                 # σ alone: the error is many N_std (11.5)
    assert np.median(z_new) < 0.6 * np.median(z_old), (np.median(z_new), np.median(z_old))   # 6.2: weights follow it
    pure = obj & (np.abs(x) > 0.4)
    same = np.isclose(new.noise_std[pure], old.noise_std[pure])
    assert same.mean() > 0.95, same.mean()                        # noise alone rarely passes misfit 3
    assert np.all(new.noise_std[obj] >= old.noise_std[obj] * (1 - 1e-6))
    assert np.array_equal(new.field, old.field)                   # only the weights change


def test_cancel_stops_the_fit():
    from napari_qsm.core.progress import CancelToken, Cancelled
    obj, field, r2, po = _truth()
    e = _signal(RESEARCH_TE, obj, field, r2, po, 0.02, 0)
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        fit_nonlinear(e, cancel=tok, device="cpu")
    with pytest.raises(Cancelled):
        fit_linear(e, cancel=tok, device="cpu")


def test_bad_inputs_are_refused():
    obj, field, r2, po = _truth()
    e = _signal(RESEARCH_TE, obj, field, r2, po, 0.02, 0)
    one = Echoes(magnitude=e.magnitude[..., :1], phase=e.phase[..., :1], te=[0.004], b0_tesla=B0)
    for fn in (fit_linear, fit_nonlinear):
        with pytest.raises(ScanError, match="at least 2 echoes"):
            fn(one)
        with pytest.raises(ScanError, match="Echoes record"):
            fn(e.complex())
    with pytest.raises(ScanError, match="unwrapped_phase: shape"):
        fit_linear(e, unwrapped_phase=e.phase[..., :2])
    with pytest.raises(ValueError, match="intercept='zero' needs"):
        fit_linear(e, LinearFitParams(intercept="zero", offsets="none"))
    with pytest.raises(ParamError):
        fit_linear(e, LinearFitParams(r2star_max=-1))
    with pytest.raises(ParamError):
        make_params(NonlinearFitParams, max_iter="0")
    with pytest.raises(ParamError):
        make_params(LinearFitParams, offsets="magic")


def test_steps_are_declared():
    assert [s.name for s in STEPS] == ["linear", "nonlinear"]
    assert all(s.family == "fit" for s in STEPS)
    assert [s.default for s in STEPS] == [True, False]
    assert "WRAPPED" in STEPS[1].doc
    d = {s.name: s.default for s in specs(NonlinearFitParams)}
    assert d["max_iter"] == 30 and d["tol"] == 1e-4
    assert {s.name: s.default for s in specs(LinearFitParams)}["r2star_max"] == 500.0
    assert fitmod.__doc__ and "Eckstein" in fitmod.__doc__


@pytest.mark.slow
def test_honest_phantom_echoes_give_its_field(one_torch_thread):
    """The phantom simulates echoes on a 2x finer grid (intra-voxel dephasing, T2* per tissue, a smooth
    receive phase, complex noise); the fit lands on its true field within the predicted N_std."""
    from napari_qsm.core.sim.phantom import make_phantom
    ph = make_phantom(shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0), seed=3, snr=40.0, device="cpu", honest=True,
                      keep_echoes=True, b0_tesla=B0)
    e = Echoes.from_complex(ph.echoes, ph.echo_times, B0, voxel_size=(4.0, 4.0, 4.0))
    m = ph.mask.astype(bool)
    for fn in (fit_linear, fit_nonlinear):
        tf = fn(e, device="cpu")
        # the head is in air: the corners test as air (single channel) and agree with the phantom's estimate
        assert tf.provenance["noise_sigma_source"].startswith("FOV corners")
        assert tf.provenance["noise_sigma"] == pytest.approx(ph.noise_sigma, rel=0.02)
        params_cls = LinearFitParams if fn is fit_linear else NonlinearFitParams
        # same σ, N_std from σ alone (no misfit scaling): the phantom's fit's N_std
        tf = fn(e, params_cls(noise_sigma=ph.noise_sigma, misfit_noise=0.0), device="cpu")
        d = (tf.field - ph.true_field)[m]
        assert np.abs(d).max() < tf.wrap_period_ppm / 2          # no wraps in this head
        rms = np.sqrt(np.mean(d ** 2)) / np.sqrt(np.mean(tf.noise_std[m] ** 2))
        assert rms < 1.5, rms
        assert np.median(np.abs(tf.r2star - ph.r2star)[m]) < 0.01   # same weighted log-linear fit
        if fn is fit_linear:   # the phantom's own fit (an independent implementation) agrees
            assert np.abs(tf.field - ph.field)[m].max() < 1e-4
            assert np.allclose(tf.noise_std[m], ph.noise_std[m], rtol=1e-3)
