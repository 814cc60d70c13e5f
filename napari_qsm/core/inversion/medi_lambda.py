"""Automatic λ for MEDI-L1 (``lambda=auto``): UPRE (default) or the discrepancy principle.

The toolbox's λ = 1000 ignores the noise level (m is normalised to mean 1). ``lambda=auto`` picks λ
from the data with one of two documented rules (``auto_rule``); the default is UPRE, not the
discrepancy principle:

* ``upre`` (default): minimise the unbiased predictive-risk estimate (Mallows' C_p / Stein)
  U(λ) = R(λ) + 2·tr(K·H_λ) − Σ_v κ_v, where R(λ) = ‖m ∘ (e^{iD∗χ_λ} − e^{if})‖² is the weighted data
  residual, κ_v = m_v²·(2 − 2e^{−σ_v²/2}) ≈ m_v²σ_v² the variance of the weighted data noise (σ_v the
  phase noise in radians) and H_λ = 2λ M D A⁻¹ Dᵀ M the influence matrix of the problem linearised at
  χ_λ (A the Gauss-Newton matrix with the lagged weights of χ_λ). tr(K·H) is estimated with one
  Hutchinson probe (one CG solve). U estimates E‖m ∘ D∗(χ_λ − χ_true)‖². Unlike the plain
  discrepancy principle it accounts for the noise the model absorbs: the free magnitude edges
  (w_G = 0) and the unconstrained χ outside the mask give the fit many degrees of freedom, so at a
  good λ the residual is well below the noise energy (about 0.3–0.5 × on the project phantoms).
  Search: λ = 1000, 2000, then factor-2 steps until the minimum is bracketed, then a parabola
  through the three best points in log λ gives λ*, which is solved too and kept when its U is lower.
* ``discrepancy``: R(λ) = τ·Σκ (``discrepancy`` = τ, default 1), by secant steps in log λ.

Every λ of the search is solved from χ = 0 with the same stopping rule as a plain run (MERIT's
weights reset), so the λ are compared at the same convergence, and the returned map is that
from-zero solve of the reported λ: bitwise what ``lambda=<reported λ>`` returns (same device and
threads). R and tr(K·H) are evaluated with the data weights before any MERIT update (the weights
κ refers to). Cost: about ``auto_max_solves`` plain runs plus one CG solve per trace.

σ_v = s·noise_std when the scan carries a noise map (ppm); otherwise σ_v = c/magnitude (or c) with
the scale c estimated robustly from the field itself (median absolute deviation of the field
minus its 3×3×3 mean in the interior of the mask: an upper bound when the field has fine structure).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


def estimate_noise_scale(field: np.ndarray, mask: np.ndarray, relative: Optional[np.ndarray] = None) -> float:
    """Robust scale c of the field noise σ_v = c·relative_v (relative = 1/magnitude, or 1).

    Finest-scale diagonal Haar detail d = Σ_{2×2×2 cube} ±f / √8 (signs (−1)^{i+j+k}): for white noise
    its standard deviation is the noise σ, while smooth structure (up to mixed third derivatives)
    cancels. d / √(mean of relative² over the cube), over cubes lying inside the mask, gives c
    through the median absolute deviation (× 1.4826). Fine structure left in the field (edges of
    strong sources) is mostly rejected by the median; the estimate errs on the high side.
    """
    f = np.where(mask, field, 0).astype(np.float64)
    m = np.asarray(mask, bool)
    n0, n1, n2 = f.shape
    if min(f.shape) < 2:
        return 0.0
    d = np.zeros((n0 - 1, n1 - 1, n2 - 1))
    inside = np.ones_like(d, bool)
    rel2 = np.zeros_like(d)
    rel = None if relative is None else np.asarray(relative, np.float64)
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                sl = (slice(i, n0 - 1 + i), slice(j, n1 - 1 + j), slice(k, n2 - 1 + k))
                d += (-1) ** (i + j + k) * f[sl]
                inside &= m[sl]
                if rel is not None:
                    r = rel[sl]
                    inside &= np.isfinite(r) & (r > 0)
                    rel2 += np.where(np.isfinite(r), r, 0.0) ** 2
    z = d[inside] / math.sqrt(8.0)
    if rel is not None:
        z = z / np.sqrt(rel2[inside] / 8.0)
    if z.size == 0:
        return 0.0
    mad = np.median(np.abs(z - np.median(z)))
    return float(1.4826 * mad)



def noise_sigma_rad(prob, kind, noise_std, magnitude, field, mask, box, s, smv):
    """Per-voxel phase-noise σ (rad, cropped grid tensor) for lambda=auto (UPRE or discrepancy)."""
    if kind == "noise_std":
        sig = np.abs(noise_std[box]).astype(np.float32) * s
    else:
        rel = None
        if magnitude is not None:
            with np.errstate(divide="ignore"):
                rel = np.where(magnitude > 0, 1.0 / np.abs(magnitude), np.inf)
        c = estimate_noise_scale(field, mask, rel)
        sig = (c * (rel[box] if rel is not None else np.ones(prob.shape))).astype(np.float32) * s
    t = torch.as_tensor(np.where(np.isfinite(sig), sig, 0.0).astype(np.float32), device=prob.dev)
    if smv > 0 and prob.S is not None:
        t = torch.sqrt(prob._conv(t * t, prob.S).clamp_min(0) + t * t)
    return t


def trace_KH(prob, lam, lcsf, x, kappa, tol=0.05, max_iter=40, seed=0):
    """Hutchinson estimate of tr(K·H), H = 2λ M D A⁻¹ Dᵀ M the influence matrix of the linearised
    problem at χ (A = ∇ᵀ w_G V w_G ∇ + 2λ Dᵀ M² D [+ λ_CSF P], lagged weights V of χ), K = diag(κ) the
    noise variance of the weighted data: z Rademacher, v = Dᵀ(M √κ z), tr ≈ 2λ vᵀ A⁻¹ v (one CG solve;
    the quadratic form converges much faster than the solution, hence the loose tolerance).
    """
    W = prob.lagged_weights(x)
    use_csf = prob.csf is not None and lcsf > 0

    def A(p):
        out = prob.reg_op(p, W)
        out += prob.Dconv(prob.m2 * prob.Dconv(p)).mul_(2.0 * lam)
        if use_csf:
            out += prob.csf_op(p).mul_(lcsf)
        return out

    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randint(0, 2, prob.shape, generator=g, dtype=torch.int8).to(prob.dev, torch.float32) * 2 - 1)
    v = prob.Dconv(prob.m * torch.sqrt(kappa) * z)
    y, it, _ = prob.cg(A, v, tol, max_iter)
    return 2.0 * lam * float(torch.dot(v.reshape(-1), y.reshape(-1))), it


def upre_lambda(prob, lcsf, sigma, max_solves, kw):
    """λ minimising the unbiased predictive-risk estimate U(λ) = R(λ) + 2·tr(K·H_λ) − Σκ.

    R is the weighted data residual, κ_v = m_v²σ_v² the weighted noise variance (phase noise σ_v in
    radians) and H_λ the influence matrix of the problem linearised at χ_λ (trace by Hutchinson, one
    probe: with ~10⁵–10⁶ voxels its relative error is < 1 %). U estimates E‖m∘(D∗(χ_λ − χ_true))‖²
    (Mallows' C_p / Stein's risk for the weighted data). Search in log λ from 1000 with factor-2 steps
    until the minimum is bracketed, then a parabola through the best three points gives λ*, which is
    solved and evaluated too when the budget allows. Every solve starts from χ = 0 with the plain
    run's stopping rule, so all λ are compared at the same convergence and the returned χ is the
    from-zero solve of the returned λ (what ``lambda=<λ>`` gives).
    """
    prob.reset_weights()
    kappa = prob.m2 * (2.0 - 2.0 * torch.exp(-0.5 * sigma * sigma))
    kappa = torch.where(prob.mask, kappa, torch.zeros_like(kappa))
    e_noise = float(kappa.sum(dtype=torch.float64))
    if not e_noise > 0:
        raise ValueError("lambda=auto: the expected noise energy is zero (no noise information); give a number")
    evals = {}   # log λ -> dict
    best = {}    # the evaluation with the lowest U so far, with its χ (only that χ is kept)

    def evaluate(lam):
        n = len(evals) + 1
        prob.rep.solves_left = max_solves - n
        x, hist = prob.solve(lam, lcsf, None, label=f" λ={lam:.3g} (solve {n} of ≤{max_solves})", **kw)
        prob.reset_weights()          # R and the trace with the weights κ refers to
        _, R = prob.costs(x)
        tr, tr_it = trace_KH(prob, lam, lcsf, x, kappa)
        U = R + 2.0 * tr - e_noise
        e = {"lambda": lam, "residual": R, "trace": tr, "upre": U, "gn_iters": hist["gn_iters"],
             "cg_iters": sum(hist["cg_iters"]) + tr_it}
        evals[math.log(lam)] = e
        if not best or U < best["upre"]:
            best.clear()
            best.update(e, x=x, hist=hist)
        return e

    grid = lambda k: 1000.0 * 2.0 ** k     # the coarse grid, exact powers of two times 1000
    kmin = kmax = 0
    evaluate(grid(0))
    solves = 1
    if solves < max_solves:
        kmax = 1
        evaluate(grid(1))
        solves += 1
    while solves < max_solves:             # bracket the minimum; a parabola solve uses what budget is left
        keys = sorted(evals)
        lbest = min(keys, key=lambda t: evals[t]["upre"])
        if lbest == keys[0]:
            kmin -= 1
            evaluate(grid(kmin))
        elif lbest == keys[-1]:
            kmax += 1
            evaluate(grid(kmax))
        else:
            break
        solves += 1
    keys = sorted(evals)
    lbest = min(keys, key=lambda t: evals[t]["upre"])
    i = keys.index(lbest)
    if 0 < i < len(keys) - 1 and solves < max_solves:  # bracketed: parabola through (log λ, U) of the best three
        (a, fa), (b, fb), (c, fc) = [(k, evals[k]["upre"]) for k in keys[i - 1:i + 2]]
        den = (b - a) * (fb - fc) - (b - c) * (fb - fa)
        if den != 0:
            ls = b - 0.5 * ((b - a) ** 2 * (fb - fc) - (b - c) ** 2 * (fb - fa)) / den
            ls = min(max(ls, a), c)
            if abs(ls - b) > math.log(1.15):
                evaluate(math.exp(ls))
                solves += 1
    search = {"rule": "upre", "lambda": best["lambda"], "noise_energy": e_noise,
              "tried": [dict(evals[t]) for t in sorted(evals)]}
    return best["x"], best["hist"], search


def discrepancy_lambda(prob, lcsf, sigma, tau, max_solves, kw):
    """Discrepancy principle: find λ with R(λ) = τ·E_noise by secant steps in log-log; each λ solved
    from χ = 0 (so the returned χ is what ``lambda=<λ>`` gives)."""
    prob.reset_weights()
    target = tau * prob.noise_energy(sigma)
    if not target > 0:
        raise ValueError("lambda=auto: the expected noise energy is zero (no noise information); give a number")
    lam = 1000.0
    tried = []  # (log λ, log R/target)
    best = None
    for k in range(max_solves):
        prob.rep.solves_left = max_solves - k - 1
        x, hist = prob.solve(lam, lcsf, None, label=f" λ={lam:.3g} (solve {k + 1} of ≤{max_solves})", **kw)
        prob.reset_weights()
        _, R = prob.costs(x)
        g = math.log(max(R, 1e-30) / target)
        tried.append((math.log(lam), g, R, hist["gn_iters"], sum(hist["cg_iters"])))
        if best is None or abs(g) < abs(best[1]):
            best = (lam, g, x, hist)
        del x
        if abs(g) < math.log(1.1) or k == max_solves - 1:
            break
        # next λ: secant through the two nearest points that bracket or the last two; slope < 0
        if len(tried) == 1:
            slope = -1.0
        else:
            (l1, g1, *_), (l2, g2, *_) = tried[-2], tried[-1]
            slope = (g2 - g1) / (l2 - l1) if l2 != l1 else -1.0
            if not slope < -0.05:
                slope = -1.0
        lo = [t for t in tried if t[1] > 0]   # residual too large → λ too small
        hi = [t for t in tried if t[1] < 0]
        step = -g / slope
        step = max(-math.log(30.0), min(math.log(30.0), step))
        nl = math.log(lam) + step
        if lo and hi:  # keep inside the bracket
            a = max(t[0] for t in lo)
            b = min(t[0] for t in hi)
            if not (a < nl < b):
                nl = 0.5 * (a + b)
        lam = math.exp(nl)
    lam_b, g_b, x_b, hist_b = best
    search = {"rule": "discrepancy", "lambda": lam_b, "target_residual": target, "tau": tau,
              "tried": [{"lambda": math.exp(t[0]), "residual": t[2], "log_ratio": t[1], "gn_iters": t[3],
                         "cg_iters": t[4]} for t in tried]}
    return x_b, hist_b, search


