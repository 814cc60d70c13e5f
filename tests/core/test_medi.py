"""MEDI-L1: toolbox semantics (weights, gradient mask, adjoint, stop rule), convergence, accuracy, cancel, errors."""

import threading
import time

import numpy as np
import pytest
import torch

from napari_qsm.core.medi import (MEDIParams, data_weight, derive_csf_mask, divergence, estimate_noise_scale, gradient,
                                  gradient_mask, medi_l1, phase_scale)
from napari_qsm.core.methods import get_method, reconstruct
from napari_qsm.core.params import make_params
from napari_qsm.core.progress import CancelToken, Cancelled
from napari_qsm.core.metrics import nrmse_demeaned as nrmse
from napari_qsm.core.scan import Scan
from napari_qsm.core.tkd import truncated_inversion


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_phantom():
    from napari_qsm.core.phantom import make_phantom

    return make_phantom((32, 38, 32), (4.5, 4.5, 4.5), seed=5, snr=40)


def blob_problem(shape=(24, 26, 22), vs=(1.5, 1.5, 1.5), noise=0.0, seed=0):
    """Tiny piecewise-constant χ (two ellipsoids in a spherical 'brain'), its field and magnitude."""
    from napari_qsm.core.dipole import forward_field

    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * d for n, d in zip(shape, vs)], indexing="ij")
    r = np.sqrt(sum(x * x for x in g))
    mask = r < 0.42 * min(n * d for n, d in zip(shape, vs))
    chi = np.zeros(shape, np.float32)
    chi[((g[0] - 4) ** 2 / 16 + g[1] ** 2 / 9 + g[2] ** 2 / 25) < 1] = 0.1
    chi[((g[0] + 5) ** 2 / 9 + (g[1] - 3) ** 2 / 9 + g[2] ** 2 / 9) < 1] = -0.05
    chi *= mask
    field = forward_field(chi, vs, device="cpu") * mask
    if noise:
        field = field + noise * rng.standard_normal(shape).astype(np.float32) * mask
    mag = (1.0 - 3.0 * np.abs(chi)).astype(np.float32) * mask
    return chi, field.astype(np.float32), mask, mag


# ---------------------------------------------------------------------------- semantics


def test_gradient_divergence_exact_adjoint_anisotropic():
    g = torch.Generator().manual_seed(0)
    vs = (0.7, 1.1, 2.3)
    x = torch.randn((7, 9, 11), generator=g, dtype=torch.float64)
    u = torch.randn((3, 7, 9, 11), generator=g, dtype=torch.float64)
    lhs = float((divergence(u, vs) * x).sum())
    rhs = -float((u * gradient(x, vs)).sum())
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), abs(rhs))
    # float32 as used by the solver
    x32, u32 = x.float(), u.float()
    lhs = float((divergence(u32, vs) * x32).double().sum())
    rhs = -float((u32 * gradient(x32, vs)).double().sum())
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), abs(rhs))


def test_solver_regulariser_equals_minus_div_w_grad():
    from napari_qsm.core.medi import EPSILON, _MEDIReporter, _Problem

    rng = np.random.default_rng(0)
    n, vs = (9, 10, 11), (0.7, 1.3, 2.1)
    wG = rng.random((3,) + n) > 0.3
    p = _Problem(rng.standard_normal(n).astype(np.float32), np.ones(n, bool), wG, None, None, vs, (0, 0, 1.0),
                 1.25, 0, torch.device("cpu"), _MEDIReporter(None, None, 1))
    x, y = torch.randn(n), torch.randn(n)
    wt = torch.as_tensor(wG)
    Wp = torch.rsqrt((gradient(x, vs) * wt) ** 2 + EPSILON) * wt
    ref = -divergence(Wp * gradient(y, vs), vs)
    got = p.reg_op(y, p.lagged_weights(x))
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_gradient_is_forward_difference_neumann():
    x = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1).expand(5, 2, 3).contiguous() ** 2
    gx = gradient(x, (2.0, 1.0, 1.0))
    assert torch.allclose(gx[0, :4, 0, 0], torch.tensor([1.0, 3, 5, 7]) / 2.0)
    assert float(gx[0, 4].abs().max()) == 0.0  # Neumann: last difference 0
    assert float(gx[1].abs().max()) == 0.0 and float(gx[2].abs().max()) == 0.0


def test_gradient_mask_share_follows_toolbox_search(rng):
    from scipy import ndimage

    shape, vs = (30, 32, 28), (1.0, 1.2, 0.9)
    mag = ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32) + 0.5
    mask = np.zeros(shape, np.float32)
    mask[4:-4, 5:-5, 3:-3] = 1
    mt, mk = torch.as_tensor(mag), torch.as_tensor(mask)
    for pct in (0.9, 0.5, 1.5):
        wG, thr = gradient_mask(mt, mk, vs, pct)
        absg = gradient(mt * mk, vs).abs()
        n = mask.sum()
        share = float((absg > thr).sum()) / n
        assert torch.equal(wG, absg <= thr)
        start = 0.01 * float(mag.max())
        if float((absg > start).sum()) / n > pct:      # increasing branch: first thr with share ≤ pct
            assert share <= pct < float((absg > thr / 1.05).sum()) / n
        else:                                          # decreasing branch: first thr with share ≥ pct
            assert share >= pct > float((absg > thr / 0.95).sum()) / n
    # default 0.9 leaves about 30 % of the components (of mask voxels) as edges
    wG, _ = gradient_mask(mt, mk, vs, 0.9)
    assert abs(float((~wG).sum()) / (3 * mask.sum()) - 0.3) < 0.02


def test_data_weight_normalisation_and_nonfinite():
    mask = torch.zeros((6, 6, 6), dtype=torch.bool)
    mask[1:5, 1:5, 1:5] = True
    noise = torch.rand((6, 6, 6)) + 0.5
    noise[2, 2, 2] = float("nan")
    noise[3, 3, 3] = float("inf")
    noise[2, 3, 3] = 0.0          # → 1/0 = inf → 0
    w = data_weight(mask, noise)
    assert torch.isfinite(w).all()
    assert float(w[2, 2, 2]) == 0.0 and float(w[3, 3, 3]) == 0.0 and float(w[2, 3, 3]) == 0.0
    assert abs(float(w[mask].mean()) - 1.0) < 1e-6
    assert float(w[~mask].abs().max()) == 0.0
    ok = mask.clone()
    ok[2, 2, 2] = ok[3, 3, 3] = ok[2, 3, 3] = False
    ratio = (w[ok] * noise[ok])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)   # ∝ 1/N_std
    u = data_weight(mask, None)
    assert torch.equal(u, mask.float())


def test_phase_scale_documented_value():
    assert abs(phase_scale(0.005, 3.0) - 2 * np.pi * 0.005 * 42.577478 * 3.0) < 1e-9
    assert abs(phase_scale() - 4.0127) < 1e-3


# ---------------------------------------------------------------------------- solver behaviour


def test_gauss_newton_stop_rule_and_cost_decrease():
    chi, field, mask, mag = blob_problem(noise=0.002)
    _, info = medi_l1(field, mask, (1.5, 1.5, 1.5), magnitude=mag, lam=1000, tol_norm_ratio=0.1, max_iter=10,
                      return_info=True)
    h = info["history"]
    ratios = h["norm_ratio"]
    assert h["gn_iters"] == len(ratios) <= 10
    assert all(r >= 0.1 for r in ratios[:-1])           # never stopped early
    assert ratios[-1] < 0.1 or len(ratios) == 10        # stopped because of the rule (or the cap)
    cost = h["cost"]
    assert len(cost) >= 2
    assert cost[-1] < cost[0]
    assert all(b <= a * 1.02 for a, b in zip(cost, cost[1:]))   # (nearly) monotone
    assert all(c <= 100 for c in h["cg_iters"])
    # the cap on outer iterations holds too
    _, info2 = medi_l1(field, mask, (1.5, 1.5, 1.5), magnitude=mag, lam=1000, tol_norm_ratio=1e-6, max_iter=2,
                       return_info=True)
    assert info2["history"]["gn_iters"] == 2


def test_medi_beats_tkd_on_small_noisy_phantom(small_phantom):
    ph = small_phantom
    tkd, _ = truncated_inversion(ph.field, ph.mask, ph.voxel_size, ph.b0_direction, 0.15, device="cpu")
    res = reconstruct(Scan.from_phantom(ph), "medi", {"lambda": 1000}, device="cpu")   # toolbox defaults
    e_medi, e_tkd = nrmse(res.chi, ph.chi, ph.mask), nrmse(tkd, ph.chi, ph.mask)
    assert e_medi < 0.8 * e_tkd, (e_medi, e_tkd)
    assert res.extras["lambda"] == 1000
    assert res.chi.dtype == np.float32 and res.chi.shape == ph.shape
    assert np.all(res.chi[~ph.mask] == 0)


def test_lambda_auto_upre(small_phantom):
    ph = small_phantom
    res = reconstruct(Scan.from_phantom(ph), "medi", {"lambda": "auto", "auto_max_solves": 3}, device="cpu")
    search = res.extras["lambda_search"]
    assert search["rule"] == "upre"
    assert 2 <= len(search["tried"]) <= 3
    assert search["lambda"] == res.extras["lambda"] > 0
    assert search["noise_energy"] > 0
    tried = [t for t in search["tried"] if t["upre"] is not None]
    assert all(t["trace"] > 0 for t in tried)       # tr(K·H) of a PSD influence matrix
    for t in tried:                                 # U = R + 2 tr − E
        assert abs(t["upre"] - (t["residual"] + 2 * t["trace"] - search["noise_energy"])) < 1e-6 * search["noise_energy"]
    tkd, _ = truncated_inversion(ph.field, ph.mask, ph.voxel_size, ph.b0_direction, 0.15, device="cpu")
    assert nrmse(res.chi, ph.chi, ph.mask) < nrmse(tkd, ph.chi, ph.mask)


def test_lambda_auto_discrepancy_rule_hits_target():
    chi, field, mask, mag = blob_problem(noise=0.003)
    noise = np.full(field.shape, 0.003, np.float32)
    _, info = medi_l1(field, mask, (1.5, 1.5, 1.5), magnitude=mag, noise_std=noise, lam="auto",
                      auto_rule="discrepancy", auto_max_solves=6, max_iter=4, return_info=True)
    search = info["lambda_search"]
    assert search["rule"] == "discrepancy"
    best = min(search["tried"], key=lambda t: abs(t["log_ratio"]))
    assert abs(best["log_ratio"]) < 0.5 and info["lambda"] == best["lambda"]


def test_noise_scale_estimate_from_field(rng):
    shape = (30, 32, 28)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    smooth = 0.05 * np.sin(2 * g[0]) * np.cos(3 * g[1]) + 0.02 * g[2] ** 2
    mask = np.ones(shape, bool)
    rel = 1.0 / (0.5 + np.abs(g[0]))                 # noise ∝ 1/magnitude
    field = smooth + 0.003 * rel * rng.standard_normal(shape)
    assert abs(estimate_noise_scale(field, mask, rel) / 0.003 - 1) < 0.1
    assert abs(estimate_noise_scale(smooth + 0.002 * rng.standard_normal(shape), mask) / 0.002 - 1) < 0.1


def test_lambda_auto_without_noise_map(small_phantom):
    ph = small_phantom
    chi, info = medi_l1(ph.field, ph.mask, ph.voxel_size, ph.b0_direction, magnitude=ph.magnitude, lam="auto",
                        auto_max_solves=3, return_info=True)
    assert info["data_weighting"] == "1/magnitude"
    assert info["lambda_search"]["noise_energy"] > 0 and info["lambda"] > 0
    tkd, _ = truncated_inversion(ph.field, ph.mask, ph.voxel_size, ph.b0_direction, 0.15, device="cpu")
    assert nrmse(chi, ph.chi, ph.mask) < nrmse(tkd, ph.chi, ph.mask)


def test_progress_reports_cg_and_gn():
    chi, field, mask, mag = blob_problem()
    seen = []
    medi_l1(field, mask, (1.5, 1.5, 1.5), magnitude=mag, max_iter=2, progress=seen.append)
    cg = [p for p in seen if "cg_residual" in p.losses]
    gn = [p for p in seen if "cost" in p.losses and "norm_ratio" in p.losses]
    assert len(gn) == 2 and len(cg) >= 2
    assert gn[-1].preview is not None and gn[-1].preview.shape == field.shape


def test_cancel_is_prompt():
    chi, field, mask, mag = blob_problem(shape=(40, 40, 40), vs=(1.0, 1.0, 1.0))
    token = CancelToken()
    state = {}

    def cb(p):
        if "cg_residual" in p.losses and "t" not in state and p.losses and p.step >= 0:
            state["t"] = time.perf_counter()
            token.cancel()

    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        medi_l1(field, mask, (1.0, 1.0, 1.0), magnitude=mag, lam=1000, tol_norm_ratio=1e-6, progress=cb,
                cancel=token)
    assert time.perf_counter() - state["t"] < 1.0

    # from a timer thread, through the registry
    token2 = threading.Event()
    scan = Scan(field=field, mask=mask, magnitude=mag)
    timer = threading.Timer(0.3, token2.set)
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        reconstruct(scan, "medi", {"tol_norm_ratio": 1e-6, "max_iter": 100, "cg_max_iter": 10000, "cg_tol": 1e-6},
                    device="cpu", cancel=token2)
    assert time.perf_counter() - t0 < 1.3


# ---------------------------------------------------------------------------- options


def test_smv_merit_and_csf_options():
    chi, field, mask, mag = blob_problem(noise=0.001)
    vs = (1.5, 1.5, 1.5)
    out, info = medi_l1(field, mask, vs, magnitude=mag, smv=3.0, merit=True, max_iter=2, return_info=True)
    em = info["mask"]
    assert em.sum() < mask.sum() and not np.any(em & ~mask)
    assert np.all(out[~em] == 0)
    csf = np.zeros_like(mask)
    csf[10:13, 4:7, 9:12] = True
    csf &= mask & (chi == 0)
    out, info = medi_l1(field, mask, vs, magnitude=mag, csf_mask=csf, max_iter=2, return_info=True)
    assert info["csf_voxels"] == int(csf.sum())
    assert abs(float(out[csf].mean())) < 1e-6          # referenced to the CSF mean


def test_derive_csf_mask_finds_bright_central_region():
    shape, vs = (40, 40, 40), (1.0, 1.0, 1.0)
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    r = np.sqrt(sum(x * x for x in g))
    mask = r < 17
    mag = np.where(mask, 0.6, 0.0).astype(np.float32)
    vent = (np.abs(g[0]) < 3) & (np.abs(g[1] - 2) < 4) & (np.abs(g[2]) < 3)
    mag[vent] = 1.0
    rim = mask & (r > 14) & (g[2] > 8)
    mag[rim] = 1.0  # bright but peripheral: not CSF of the ventricles
    csf = derive_csf_mask(mag, mask, vs)
    assert csf.sum() > 0
    assert not np.any(csf & rim)
    assert np.all(vent[csf])


def test_registry_and_params():
    m = get_method("medi")
    assert m.label == "MEDI-L1" and m.uses_magnitude and m.long_running
    p = make_params(MEDIParams, {"lambda": "auto", "smv": "5"})
    assert p.lam == "auto" and p.smv == 5.0
    p = make_params(MEDIParams, {"lambda": "250"})
    assert p.lam == 250.0
    from napari_qsm.core.params import ParamError

    with pytest.raises(ParamError):
        make_params(MEDIParams, {"lambda": "often"})


# ---------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    chi, field, mask, mag = blob_problem(shape=(12, 12, 12))
    vs = (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="magnitude"):
        medi_l1(field, mask, vs, magnitude=None)
    with pytest.raises(ValueError, match="magnitude: shape"):
        medi_l1(field, mask, vs, magnitude=mag[:-1])
    with pytest.raises(ValueError, match="magnitude: all zero"):
        medi_l1(field, mask, vs, magnitude=np.zeros_like(mag))
    scan = Scan(field=field, mask=mask)
    with pytest.raises(ValueError, match="magnitude"):
        reconstruct(scan, "medi", device="cpu")
    scan.magnitude = mag[:, :, :-1]  # modified after validation
    with pytest.raises(ValueError, match="magnitude: shape"):
        reconstruct(scan, "medi", device="cpu")
    # without the edge prior no magnitude is needed
    out = medi_l1(field, mask, vs, magnitude=None, edge_mask=False, max_iter=1)
    assert out.shape == field.shape and np.isfinite(out).all()
