"""MEDI-L1: toolbox semantics (weights, gradient mask, adjoint, stop rule), convergence, accuracy, cancel, errors."""

import threading
import time

import numpy as np
import pytest
import torch

from napari_qsm.core.inversion.medi import (CSF_RULE_MAGNITUDE, CSF_RULE_R2STAR, MEDIParams, csf_mask_from_r2star, data_weight,
                                  derive_csf_mask, divergence, estimate_noise_scale, gradient, gradient_mask, medi_l1,
                                  medi_magnitude, phase_scale)
from napari_qsm.methods import get_method, reconstruct
from napari_qsm.core.params import make_params
from napari_qsm.core.progress import CancelToken, Cancelled
from napari_qsm.core.metrics import nrmse_demeaned as nrmse
from napari_qsm.core.scan import Scan, ScanError
from napari_qsm.core.inversion.tkd import truncated_inversion


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_phantom():
    from napari_qsm.core.sim.phantom import make_phantom

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
    from napari_qsm.core.inversion.medi_solver import EPSILON, GNReporter as _MEDIReporter, Problem as _Problem

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
    assert ratios[-1] < 0.1 <= min(ratios[:-1] + [np.inf])   # stopped by the rule, at its first chance
    cost = h["cost"]
    assert len(cost) >= 2
    assert cost[-1] < cost[0]
    assert all(b <= a * 1.02 for a, b in zip(cost, cost[1:]))   # (nearly) monotone
    assert all(c <= 100 for c in h["cg_iters"])
    # the cap on outer iterations holds too
    _, info2 = medi_l1(field, mask, (1.5, 1.5, 1.5), magnitude=mag, lam=1000, tol_norm_ratio=1e-6, max_iter=2,
                       return_info=True)
    assert info2["history"]["gn_iters"] == 2


def test_norm_ratio_is_the_true_step_ratio():
    """The recorded ‖dχ‖/‖χ‖ equals the ratio recomputed from the iterates (runs capped at 1, 2, 3 GN
    steps; full-volume mask so the returned χ is the whole iterate), and the rule stops at the
    first step whose ratio falls below the tolerance."""
    chi, field, _, mag = blob_problem(noise=0.002)
    mask = np.ones(field.shape, bool)
    vs = (1.5, 1.5, 1.5)
    runs = [medi_l1(field, mask, vs, magnitude=mag, lam=1000, tol_norm_ratio=1e-9, max_iter=k, return_info=True)
            for k in (1, 2, 3)]
    ratios = runs[-1][1]["history"]["norm_ratio"]
    for k in (1, 2):
        prev, cur = runs[k - 1][0].astype(np.float64), runs[k][0].astype(np.float64)
        assert ratios[k] == pytest.approx(np.linalg.norm(cur - prev) / np.linalg.norm(prev), rel=1e-3)
    assert ratios[1] > ratios[2]
    tol = 0.5 * (ratios[1] + ratios[2])      # between the second and the third ratio: stop after 3 steps
    _, info = medi_l1(field, mask, vs, magnitude=mag, lam=1000, tol_norm_ratio=tol, max_iter=10, return_info=True)
    assert info["history"]["gn_iters"] == 3


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
    res = reconstruct(Scan.from_phantom(ph), "medi", {"lambda": "auto", "auto_max_solves": 4}, device="cpu")
    search = res.extras["lambda_search"]
    assert search["rule"] == "upre"
    assert 2 <= len(search["tried"]) <= 4
    assert search["lambda"] == res.extras["lambda"] > 0
    assert search["noise_energy"] > 0
    tried = search["tried"]
    assert search["lambda"] == min(tried, key=lambda t: t["upre"])["lambda"]   # the minimum of U is returned
    # residual falls and the effective degrees of freedom grow with λ (converged solves compare like that;
    # warm-started ones did not have to)
    by_lam = sorted(tried, key=lambda t: t["lambda"])
    assert all(b["residual"] < a["residual"] for a, b in zip(by_lam, by_lam[1:]))
    assert all(b["trace"] > a["trace"] > 0 for a, b in zip(by_lam, by_lam[1:]))
    tkd, _ = truncated_inversion(ph.field, ph.mask, ph.voxel_size, ph.b0_direction, 0.15, device="cpu")
    assert nrmse(res.chi, ph.chi, ph.mask) < nrmse(tkd, ph.chi, ph.mask)
    # the map is exactly the plain run at the reported λ (every λ solved from zero; issue 14 item 2)
    plain = reconstruct(Scan.from_phantom(ph), "medi", {"lambda": search["lambda"]}, device="cpu")
    np.testing.assert_allclose(res.chi, plain.chi, rtol=0, atol=1e-6)
    assert res.extras["gn_iterations"] == plain.extras["gn_iterations"]


def test_lambda_auto_solves_every_lambda_from_zero():
    """Each λ of the search costs as many GN steps as a plain run at that λ (no warm start), and
    the discrepancy rule's map is its plain run too."""
    chi, field, mask, mag = blob_problem(noise=0.003)
    vs = (1.5, 1.5, 1.5)
    noise = np.full(field.shape, 0.003, np.float32)
    out, info = medi_l1(field, mask, vs, magnitude=mag, noise_std=noise, lam="auto", auto_max_solves=3,
                        return_info=True)
    for t in info["lambda_search"]["tried"]:
        _, ref = medi_l1(field, mask, vs, magnitude=mag, noise_std=noise, lam=t["lambda"], return_info=True)
        assert t["gn_iters"] == ref["history"]["gn_iters"]
        assert t["residual"] == pytest.approx(ref["residual"], rel=1e-6)
    out, info = medi_l1(field, mask, vs, magnitude=mag, noise_std=noise, lam="auto", auto_rule="discrepancy",
                        auto_max_solves=3, merit=True, return_info=True)
    ref = medi_l1(field, mask, vs, magnitude=mag, noise_std=noise, lam=info["lambda"], merit=True)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_upre_trace_matches_exact_trace():
    """tr(K·H), H = 2λ M D A⁻¹ Dᵀ M, from the Hutchinson probes equals the trace of the explicit
    matrices on a tiny problem (mean of 40 probes within 4 standard errors)."""
    from napari_qsm.core.inversion.medi_solver import GNReporter as _MEDIReporter, Problem as _Problem
    from napari_qsm.core.inversion.medi_lambda import trace_KH as _trace_KH

    rng = np.random.default_rng(0)
    n, vs, lam = (6, 7, 5), (1.0, 1.2, 1.5), 50.0
    N = int(np.prod(n))
    mask = np.ones(n, bool)
    mask[0] = False
    wG = rng.random((3,) + n) > 0.3
    noise = (0.5 + rng.random(n)).astype(np.float32)
    p = _Problem(rng.standard_normal(n).astype(np.float32) * 0.1, mask, wG, noise, None, vs, (0.2, 0.1, 1.0),
                 1.25, 0, torch.device("cpu"), _MEDIReporter(None, None, 1))
    x = torch.as_tensor(rng.standard_normal(n).astype(np.float32) * 0.05)
    kappa = torch.as_tensor((0.02 + 0.05 * rng.random(n)).astype(np.float32)) * p.mask
    W = p.lagged_weights(x)

    def col(op):
        return np.stack([op(torch.as_tensor(e.reshape(n))).double().numpy().ravel()
                         for e in np.eye(N, dtype=np.float32)], axis=1)

    A = col(lambda q: p.reg_op(q, W) + 2 * lam * p.Dconv(p.m2 * p.Dconv(q)))
    Dm = col(p.Dconv)
    MK = np.diag((p.m * torch.sqrt(kappa)).double().numpy().ravel())
    exact = 2 * lam * np.trace(MK @ Dm @ np.linalg.solve(A, Dm.T @ MK))
    est = np.array([_trace_KH(p, lam, 0.0, x, kappa, tol=1e-6, max_iter=500, seed=s)[0] for s in range(40)])
    assert exact > 0
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est)) + 1e-3 * exact


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
                        auto_max_solves=2, return_info=True)
    assert info["data_weighting"] == "1/magnitude"
    assert info["lambda_search"]["noise_energy"] > 0 and info["lambda"] > 0
    tkd, _ = truncated_inversion(ph.field, ph.mask, ph.voxel_size, ph.b0_direction, 0.15, device="cpu")
    assert nrmse(chi, ph.chi, ph.mask) < nrmse(tkd, ph.chi, ph.mask)


def test_progress_one_line_per_gauss_newton_step_then_a_final_line(capsys):
    """Issue 23: one record per GN step (step = k, never one behind) with ratio, cost, CG iterations,
    seconds and an ETA, then a final "converged at GN k, ratio r" (or "stopped at max iterations")
    record; no per-CG records, so the CLI prints gn_iters + 1 lines."""
    from napari_qsm.core.progress import stderr_progress

    chi, field, mask, mag = blob_problem(noise=0.002)
    seen = []
    _, info = medi_l1(field, mask, (1.5, 1.5, 1.5), magnitude=mag, lam=1000, max_iter=10, progress=seen.append,
                      return_info=True)
    h = info["history"]
    n = h["gn_iters"]
    assert h["converged"] and n >= 2
    assert len(seen) == n + 1
    for k, p in enumerate(seen[:-1], start=1):
        assert p.step == k and p.total == 10
        assert f"GN {k}/10" in p.message and "ETA" in p.message and "CG=" in p.message
        assert p.losses["ratio"] == pytest.approx(h["norm_ratio"][k - 1])
        assert p.losses["CG"] == h["cg_iters"][k - 1]
        assert p.losses["eta_s"] >= 0
        assert p.preview is not None and p.preview.shape == field.shape
    last = seen[-1]
    assert last.step == last.total == 10
    assert f"converged at GN {n}, ratio {h['norm_ratio'][-1]:.3g}" in last.message
    assert seen[-2].losses["eta_s"] == 0          # converged at that step: nothing left
    # capped run: the final line says so
    seen2 = []
    medi_l1(field, mask, (1.5, 1.5, 1.5), magnitude=mag, lam=1000, max_iter=2, tol_norm_ratio=1e-9,
            progress=seen2.append)
    assert len(seen2) == 3 and "stopped at max iterations (GN 2/2" in seen2[-1].message
    # the CLI's printer shows exactly these lines
    medi_l1(field, mask, (1.5, 1.5, 1.5), magnitude=mag, lam=1000, max_iter=2, tol_norm_ratio=1e-9,
            progress=stderr_progress(min_interval=0.0))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "GN 1/2" in lines[0] and "max iterations" in lines[-1]


def test_progress_eta_counts_the_remaining_lambda_solves():
    from napari_qsm.core.inversion.medi_solver import GNReporter

    rep = GNReporter(None, None, total=10)
    rep.solves_left = 2
    rep.start_solve("", 10, 0.1)
    rep.step_seconds, rep.ratios = [2.0, 2.0], [np.inf, 0.4]
    assert rep.eta(2) == pytest.approx(8 * 2.0 + 2 * 10 * 2.0)    # no rate yet: up to max_iter, 2 more solves
    rep.ratios = [np.inf, 0.8, 0.4]
    rep.step_seconds = [2.0, 2.0, 2.0]
    rep.solve_seconds = [9.0]
    assert rep.eta(3) == pytest.approx(2 * 2.0 + 2 * 9.0)        # 0.4 → 0.2 → 0.1: two more steps


def test_cancel_is_prompt():
    chi, field, mask, mag = blob_problem(shape=(40, 40, 40), vs=(1.0, 1.0, 1.0))
    token = CancelToken()
    state = {}

    def cb(p):
        if "t" not in state and p.step >= 1:     # the first GN step's record; cancel during the next
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


def test_smv_erodes_mask_and_gradient_mask_uses_eroded_mask():
    """Toolbox order: Mask = SMV(Mask) > 0.999 first, then the gradient mask on that Mask (issue 14 item 6a)."""
    from scipy import ndimage

    chi, field, mask, mag = blob_problem(noise=0.001)
    rng = np.random.default_rng(2)
    mag = (mag + 0.1 * ndimage.gaussian_filter(rng.random(mag.shape), 1.0) * mask).astype(np.float32)  # texture
    vs, radius = (1.5, 1.5, 1.5), 3.0
    out, info = medi_l1(field, mask, vs, magnitude=mag, smv=radius, max_iter=2, return_info=True)
    em = info["mask"]
    # independent erosion: normalised ball of radius 3 mm (2 voxels), linear convolution
    r = int(np.ceil(radius / vs[0]))
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1] * vs[0]
    ball = (np.sqrt((g ** 2).sum(0)) <= radius).astype(np.float64)
    ref = ndimage.convolve(mask.astype(np.float64), ball / ball.sum(), mode="constant") > 0.999
    assert np.array_equal(em, ref)
    assert np.all(out[~em] == 0) and np.any(out[em] != 0)
    box = tuple(slice(a, b) for a, b in info["crop"])
    _, thr_eroded = gradient_mask(torch.as_tensor(mag[box]), torch.as_tensor(em[box]).float(), vs, 0.9)
    _, thr_full = gradient_mask(torch.as_tensor(mag[box]), torch.as_tensor(mask[box]).float(), vs, 0.9)
    assert thr_eroded != thr_full
    assert info["gradient_threshold"] == thr_eroded


def test_merit_downweights_phase_outliers():
    chi, field, mask, mag = blob_problem(noise=0.001)
    rng = np.random.default_rng(3)
    idx = np.argwhere(mask & (chi == 0))
    spikes = np.zeros_like(mask)
    spikes[tuple(idx[rng.choice(len(idx), 12, replace=False)].T)] = True
    bad = field + 0.3 * spikes                       # 12 corrupted voxels (about 1.2 rad at 3 T, ΔTE 5 ms)
    vs = (1.5, 1.5, 1.5)
    plain = medi_l1(bad, mask, vs, magnitude=mag, max_iter=4)
    out, info = medi_l1(bad, mask, vs, magnitude=mag, merit=True, max_iter=4, return_info=True)
    assert 12 <= info["merit_voxels"] < 0.02 * mask.sum()     # the spikes, hardly anything else
    assert nrmse(out, chi, mask) < 0.5 * nrmse(plain, chi, mask)


def test_csf_regulariser_flattens_csf_and_references_it():
    chi, field, mask, mag = blob_problem(noise=0.003)
    vs = (1.5, 1.5, 1.5)
    csf = np.zeros_like(mask)
    csf[10:15, 3:8, 8:14] = True
    csf &= mask & (chi == 0)
    plain = medi_l1(field, mask, vs, magnitude=mag, max_iter=3)
    out, info = medi_l1(field, mask, vs, magnitude=mag, csf_mask=csf, lambda_csf=1e4, max_iter=3, return_info=True)
    assert info["csf_voxels"] == int(csf.sum()) and info["csf_rule"].startswith("given")
    assert abs(float(out[csf].mean())) < 1e-6                 # referenced to the CSF mean
    assert out[csf].std() < 0.5 * plain[csf].std()            # and χ there pulled to one value


def _r2star_head(shape=(56, 56, 56), vs=(1.5, 1.5, 1.5)):
    """R2* (s⁻¹) of a ball 'brain' (r < 40 mm): ventricles (central) with a horn reaching past the
    toolbox's 30 mm central sphere, and a peripheral sulcus (r > 33 mm), both CSF-like (2 s⁻¹)."""
    g = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * d for n, d in zip(shape, vs)], indexing="ij")
    r = np.sqrt(sum(x * x for x in g))
    mask = r < 40
    r2 = np.where(mask, 22.0, 0.0).astype(np.float32)
    vent = (np.abs(g[0]) < 5) & (np.abs(g[1] - 3) < 8) & (np.abs(g[2]) < 5)     # central, inside 30 mm
    horn = (np.abs(g[0]) < 3) & (g[1] > 0) & (g[1] < 37) & (np.abs(g[2]) < 3)   # attached, leaves the sphere
    sulcus = mask & (r > 33) & (g[2] > 15) & (np.abs(g[0]) < 6)                 # peripheral CSF
    for m in (vent, horn, sulcus):
        r2[m & mask] = 2.0
    return r2, mask, vs, vent & mask, horn & mask, sulcus


def test_csf_from_r2star_takes_central_connected_regions():
    r2, mask, vs, vent, horn, sulcus = _r2star_head()
    csf = csf_mask_from_r2star(r2, mask, vs)
    assert np.all(csf[vent]) and np.all(csf[horn])          # the horn belongs to a central region
    assert not np.any(csf & sulcus)
    assert np.array_equal(csf, (vent | horn) & mask)
    assert np.array_equal(derive_csf_mask(None, mask, vs, r2star=r2), csf)
    r2_hi = np.where(mask, 22.0, 0.0).astype(np.float32)
    assert not csf_mask_from_r2star(r2_hi, mask, vs).any()


def test_medi_plus_zero_uses_r2star_and_explicit_mask_wins():
    r2, mask, vs, vent, horn, sulcus = _r2star_head(shape=(28, 28, 28), vs=(3.0, 3.0, 3.0))
    rng = np.random.default_rng(0)
    field = (0.002 * rng.standard_normal(mask.shape)).astype(np.float32) * mask
    mag = np.where(mask, 0.6, 0.0).astype(np.float32)
    mag[vent | horn] = 1.0                                   # CSF: long T2*, bright
    scan = Scan(field=field, mask=mask, voxel_size=vs, magnitude=mag, r2star=r2)
    res = reconstruct(scan, "medi", {"csf": "auto", "max_iter": 1}, device="cpu")
    assert res.extras["csf_rule"] == CSF_RULE_R2STAR
    assert res.extras["csf_voxels"] == int(csf_mask_from_r2star(r2, mask, vs).sum())
    given = np.zeros_like(mask)
    given[12, 12, 12] = given[12, 13, 12] = True
    res = reconstruct(scan, "medi", {"csf": "auto", "max_iter": 1}, device="cpu", csf_mask=given)
    assert res.extras["csf_rule"].startswith("given") and res.extras["csf_voxels"] == 2
    scan.r2star = None                                       # no R2*: the magnitude fallback, and it says so
    res = reconstruct(scan, "medi", {"csf": "auto", "edge_mask": False, "max_iter": 1}, device="cpu")
    assert res.extras["csf_rule"] == CSF_RULE_MAGNITUDE
    assert res.extras["csf_voxels"] == int(derive_csf_mask(mag, mask, vs).sum()) > 0


def test_scan_r2star_validated():
    field = np.zeros((6, 6, 6), np.float32)
    mask = np.ones((6, 6, 6), bool)
    s = Scan(field=field, mask=mask, r2star=np.full((6, 6, 6), 20.0))
    assert s.r2star.dtype == np.float32 and s.info()["has_r2star"]
    with pytest.raises(ScanError, match="r2star: shape"):
        Scan(field=field, mask=mask, r2star=np.ones((6, 6, 5)))
    with pytest.raises(ScanError, match="r2star: expected a 3-D volume"):
        Scan(field=field, mask=mask, r2star=np.ones((6, 6, 6, 3)))


def test_data_weighting_uniform_is_one_over_field_of_view():
    """Toolbox data-weighting mode 0: m = 1 everywhere (not the mask), problem on the whole field of view."""
    chi, field, mask, mag = blob_problem(noise=0.002)
    vs = (1.5, 1.5, 1.5)
    m = data_weight(torch.as_tensor(mask), None, uniform=True)
    assert torch.equal(m, torch.ones(mask.shape))
    out, info = medi_l1(field, mask, vs, magnitude=mag, data_weighting="uniform", max_iter=2, return_info=True)
    assert info["data_weighting"].startswith("uniform")
    assert info["crop"] == [[0, n] for n in field.shape]
    # m = mask (mode 1 with a constant noise map) is another problem: the outside data term is gone
    masked = medi_l1(field, mask, vs, magnitude=mag, noise_std=np.full(field.shape, 0.002, np.float32),
                     max_iter=2)
    assert np.abs(out - masked).max() > 1e-4


def test_four_d_magnitude_uses_first_echo():
    chi, field, mask, mag = blob_problem(noise=0.002)
    te = np.array([0.005, 0.01, 0.015, 0.02])
    r2 = np.where(chi > 0, 60.0, 20.0)                         # the χ>0 blob decays faster
    mag4 = (mag[..., None] * np.exp(-te * r2[..., None])).astype(np.float32)
    assert np.array_equal(medi_magnitude(mag4), mag4[..., 0])
    assert np.allclose(medi_magnitude(mag4, "rss"), np.sqrt((mag4 ** 2).sum(-1)))
    vs = (1.5, 1.5, 1.5)
    a = medi_l1(field, mask, vs, magnitude=mag4, max_iter=2)
    b = medi_l1(field, mask, vs, magnitude=mag4[..., 0], max_iter=2)
    c = medi_l1(field, mask, vs, magnitude=medi_magnitude(mag4, "rss"), max_iter=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def sphere_field(shape=(40, 40, 40), vs=(1.0, 1.0, 1.0), a=6.0, dchi=0.1, b0=(0.0, np.sin(0.35), np.cos(0.35))):
    """Analytic local field (ppm) of a uniformly magnetised sphere (radius a mm, Δχ ppm) on voxel centres:
    Δχ·a³/(3r³)·(3cos²θ − 1) outside, 0 inside (Lorentz-corrected; the mean over directions of
    D(k) = 1/3 − (k·b̂)²/k² vanishes), θ the angle to B0. No discrete dipole kernel is involved."""
    c = [(n - 1) / 2 * d for n, d in zip(shape, vs)]
    g = np.meshgrid(*[np.arange(n) * d - cc for n, d, cc in zip(shape, vs, c)], indexing="ij")
    r = np.sqrt(sum(x * x for x in g))
    b = np.asarray(b0, float) / np.linalg.norm(b0)
    rs = np.maximum(r, 1e-9)
    cos = sum(x * bb for x, bb in zip(g, b)) / rs
    f = np.where(r > a, dchi * a ** 3 / (3 * rs ** 3) * (3 * cos ** 2 - 1), 0.0)
    return f, r, b


def test_medi_recovers_analytic_sphere_susceptibility():
    """Fixed reference: a sphere of Δχ = 0.1 ppm (6 mm, 1 mm voxels, B0 tilted 20°) in a 17 mm 'brain',
    field from the analytic formula plus 0.5 ppb noise; MEDI (toolbox defaults, λ = 1000) must give
    the sphere's χ minus its surroundings' within 5 % (measured: 0.1017)."""
    f, r, b = sphere_field()
    mask = r <= 17.0
    rng = np.random.default_rng(0)
    field = ((f + 0.0005 * rng.standard_normal(f.shape)) * mask).astype(np.float32)
    mag = (np.where(r <= 6.0, 0.6, 1.0) * mask).astype(np.float32)
    out = medi_l1(field, mask, (1.0, 1.0, 1.0), b, magnitude=mag, lam=1000)
    core, shell = r <= 4.5, (r >= 7.5) & (r <= 12.0)
    dchi = float(out[core].mean() - out[shell].mean())
    assert dchi == pytest.approx(0.1, rel=0.05)
    assert out[core].std() < 0.01 and out[shell].std() < 0.01   # piecewise constant, no streaks
    # the same field read along the wrong B0 direction does not give the sphere back
    wrong = medi_l1(field, mask, (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), magnitude=mag, lam=1000)
    assert abs(float(wrong[core].mean() - wrong[shell].mean()) - 0.1) > 0.05


def test_gradient_mask_edge_share_on_fixed_input(small_phantom):
    """On the fixed 4.5 mm phantom the toolbox threshold search (written out as its loop here)
    gives the same threshold, and percentage 0.9 leaves 30 % ± 1 % of the components as edges."""
    ph = small_phantom
    mag, mask, vs = ph.magnitude, ph.mask.astype(np.float32), ph.voxel_size
    absg = np.abs(gradient(torch.as_tensor(mag * mask), vs).numpy())
    n = mask.sum()
    thr = 0.01 * float(mag.max())
    if (absg > thr).sum() / n > 0.9:
        while (absg > thr).sum() / n > 0.9:
            thr *= 1.05
    else:
        while (absg > thr).sum() / n < 0.9:
            thr *= 0.95
    wG, got = gradient_mask(torch.as_tensor(mag), torch.as_tensor(mask), vs, 0.9)
    assert got == pytest.approx(thr, rel=1e-9)
    edges = float((~wG.numpy()).sum()) / (3 * n)
    assert 0.29 <= edges <= 0.31


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
