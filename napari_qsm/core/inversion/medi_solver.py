"""The Gauss-Newton / conjugate-gradient machinery of MEDI-L1, shared with TFI.

Finite differences (forward, Neumann; their exact negative adjoint), the morphology prior's gradient
mask, the data weight, and :class:`Problem`: one nonlinear L1 problem on a cropped grid, solved by
Gauss-Newton with the lagged-diffusivity L1 surrogate and CG, optionally in a preconditioned
variable χ = P·y (TFI). The formulas are written out in :mod:`napari_qsm.core.inversion.medi`.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch

from ..dipole import check_voxel_size, convolve_kernel, dipole_kernel, fast_shape
from ..progress import Reporter

EPSILON = 1e-6

# --------------------------------------------------------------------------------------------
# finite differences


def gradient(x: torch.Tensor, voxel_size) -> torch.Tensor:
    """Forward differences / voxel size with a Neumann boundary (last difference 0): shape (3, *x.shape)."""
    vs = check_voxel_size(voxel_size)
    g = x.new_zeros((3,) + tuple(x.shape))
    torch.sub(x[1:], x[:-1], out=g[0, :-1])
    torch.sub(x[:, 1:], x[:, :-1], out=g[1, :, :-1])
    torch.sub(x[:, :, 1:], x[:, :, :-1], out=g[2, :, :, :-1])
    for a in range(3):
        if vs[a] != 1.0:
            g[a] /= float(vs[a])
    return g


def divergence(u: torch.Tensor, voxel_size) -> torch.Tensor:
    """Backward-difference divergence with a Dirichlet boundary: the exact negative adjoint of :func:`gradient`.

    ⟨divergence(u), x⟩ = −⟨u, gradient(x)⟩ for all u (3, ...) and x.
    """
    vs = check_voxel_size(voxel_size)
    out = u.new_zeros(u.shape[1:])
    for a in range(3):
        ua = u[a]
        n = ua.shape[a]
        if n < 2:
            continue
        head = ua.narrow(a, 0, n - 1)
        if vs[a] != 1.0:
            head = head / float(vs[a])
        out.narrow(a, 0, n - 1).add_(head)
        out.narrow(a, 1, n - 1).sub_(head)
    return out


# --------------------------------------------------------------------------------------------
# weights


def gradient_mask(magnitude: torch.Tensor, mask: torch.Tensor, voxel_size, percentage: float = 0.9,
                  max_steps: int = 5000) -> tuple[torch.Tensor, float]:
    """MEDI gradient mask: (w_G bool of shape (3, ...), threshold).

    |∇(magnitude·mask)| per component; threshold from 1 % of max(magnitude), ×1.05 while the share
    #(|∇| > thr) / #mask exceeds ``percentage``, else ×0.95 until it reaches it. w_G = |∇| ≤ thr.
    """
    m = magnitude * mask
    g = gradient(m, voxel_size).abs_()
    nmask = float(mask.sum())
    vals = torch.sort(g.reshape(-1)).values
    total = vals.numel()

    def share(t: float) -> float:
        above = total - int(torch.searchsorted(vals, torch.tensor([t], dtype=vals.dtype, device=vals.device),
                                               right=True)[0])
        return above / nmask

    thr = 0.01 * float(magnitude.max())
    steps = 0
    if share(thr) > percentage:
        while share(thr) > percentage and steps < max_steps:
            thr *= 1.05
            steps += 1
    else:
        while share(thr) < percentage and steps < max_steps and thr > 0:
            thr *= 0.95
            steps += 1
    return g <= thr, float(thr)


def data_weight(mask: torch.Tensor, noise_std: Optional[torch.Tensor], uniform: bool = False) -> torch.Tensor:
    """m = mask / N_std, NaN/Inf → 0, normalised to mean 1 inside the mask (N_std None → m = mask).

    ``uniform``: the toolbox's data-weighting mode 0, m = 1 over the whole grid (mask and N_std ignored).
    """
    maskf = mask.to(torch.float32)
    if uniform:
        return torch.ones_like(maskf)
    if noise_std is None:
        w = maskf.clone()
    else:
        w = maskf / noise_std.to(torch.float32)
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
        w = w * maskf
    inside = mask.bool()
    mean = float(w[inside].mean()) if inside.any() else 0.0
    if not mean > 0 or not math.isfinite(mean):
        raise ValueError("noise_std: the data weight mask/N_std is zero everywhere inside the mask "
                         "(noise map infinite, NaN or magnitude zero); check the noise map / magnitude")
    return w / mean


# --------------------------------------------------------------------------------------------
# the solver


def sphere_kernel(pshape, voxel_size, radius, device) -> torch.Tensor:
    """Real rfft spectrum of the normalised sphere (radius mm) centred at the origin of the padded grid."""
    vs = check_voxel_size(voxel_size)
    axes = []
    for n, d in zip(pshape, vs):
        i = np.arange(n)
        i = np.where(i > n // 2, i - n, i) * d
        axes.append(i)
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    sph = (r2 <= radius * radius).astype(np.float32)
    sph /= sph.sum()
    return torch.fft.rfftn(torch.as_tensor(sph, device=device)).real.contiguous()


class Problem:
    """Tensors and operators of one MEDI problem on the cropped grid (χ in radians)."""

    def __init__(self, f_rad, mask, wG, noise, csf, voxel_size, b0_direction, pad_factor, smv, device,
                 reporter: Reporter, uniform: bool = False):
        self.dev = device
        self.uniform = bool(uniform)
        self.vs = tuple(float(v) for v in voxel_size)
        self.shape = tuple(f_rad.shape)
        self.pshape = fast_shape(self.shape, pad_factor)
        self.rep = reporter
        t = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)
        self.D = dipole_kernel(self.pshape, voxel_size, b0_direction, device=device)
        mask_t = t(mask, torch.bool)
        f = t(f_rad) * mask_t
        noise_t = bad = None
        if noise is not None:
            noise_t = t(noise).abs()
            bad = mask_t & ~torch.isfinite(noise_t)     # weight 0 (e.g. magnitude 0 → N_std = ∞)
            fin = noise_t[mask_t & ~bad]
            fill = float(fin.max()) if fin.numel() else 1.0
            noise_t = torch.where(bad, torch.full_like(noise_t, fill), noise_t)
            noise_t = torch.where(mask_t, noise_t, torch.zeros_like(noise_t))
        self.S = None
        if smv > 0:
            self.S = sphere_kernel(self.pshape, voxel_size, smv, device)
            mask_t = self._conv(mask_t.float(), self.S) > 0.999
            if not mask_t.any():
                raise ValueError(f"smv: a radius of {smv} mm erodes the whole mask; use a smaller radius")
            self.D = self.D * (1.0 - self.S)
            f = (f - self._conv(f, self.S)) * mask_t
            if noise_t is not None:
                noise_t = torch.sqrt(self._conv(noise_t * noise_t, self.S).clamp_min(0) + noise_t * noise_t)
        if noise_t is not None:
            noise_t = torch.where(bad, torch.full_like(noise_t, float("inf")), noise_t)
        self.mask = mask_t
        self.f = f
        self.noise = noise_t          # N_std after SMV (None → uniform)
        self.base_noise = noise_t
        self.merit_flagged = None     # voxels MERIT has down-weighted in the current solve
        self.wG = None if wG is None else t(wG, torch.bool)
        self.csf = None if csf is None else t(csf, torch.bool)
        if self.csf is not None and not self.csf.any():
            self.csf = None
        self.set_weight(noise_t)
        self.wh = None                # weak-harmonic remnant φ (medi_harmonic.WeakHarmonic) when on
        self.linear = False           # data term ‖m(Dχ − f)‖² instead of ‖m(e^{iDχ} − e^{if})‖² (TFI)

    # ---- building blocks
    def _conv(self, x, K):
        """x ∗ K on the padded grid, cropped back to the problem grid (a view, not contiguous): the pruned
        inverse transform of :func:`napari_qsm.core.dipole.convolve_kernel`."""
        return convolve_kernel(x, K, self.pshape)

    def Dconv(self, x):
        if getattr(self, "_Dc", None) is None or self._Dc_src is not self.D:
            # complex copy of the real kernel: complex×complex multiplies faster than complex×real in torch
            self._Dc = self.D.to(torch.complex64)
            self._Dc_src = self.D
        return self._conv(x, self._Dc)

    def set_weight(self, noise):
        self.m = data_weight(self.mask, noise, self.uniform)
        self.m2 = self.m * self.m

    def grad(self, x):
        return gradient(x, self.vs)

    def wgrad(self, x):
        g = self.grad(x)
        if self.wG is not None:
            g *= self.wG
        return g

    def lagged_weights(self, x):
        """W = w_G·V·w_G / h² per component, V = 1/√(|w_G∇χ|² + ε) (w_G binary; h the voxel size)."""
        gx = self.wgrad(x)
        W = torch.rsqrt(gx.square_().add_(EPSILON))
        del gx
        if self.wG is not None:
            W.mul_(self.wG)
        for a in range(3):
            if self.vs[a] != 1.0:
                W[a] /= self.vs[a] ** 2
        return W

    def reg_op(self, x, W, out=None):
        """∇ᵀ(W' ∘ ∇x) = −div(W' ∘ ∇x) with W' = w_G·V·w_G; ``W`` from :meth:`lagged_weights` (÷h²).

        Unit forward differences d_a (only the n−1 interior ones; the Neumann last one is 0) times
        W_a, then ∇ᵀ: out[i] += u[i−1], out[i] −= u[i]. Equal to ``-divergence(W'·gradient(x))``.
        """
        out = torch.zeros_like(x) if out is None else out.zero_()
        for a in range(3):
            n = x.shape[a]
            if n < 2:
                continue
            d = x.narrow(a, 1, n - 1) - x.narrow(a, 0, n - 1)
            d *= W[a].narrow(a, 0, n - 1)
            out.narrow(a, 1, n - 1).add_(d)
            out.narrow(a, 0, n - 1).sub_(d)
        return out

    def chi_terms(self, v, W, u, scale, lambda_csf, use_csf, out=None):
        """reg_op(v, W) + scale·(D ∗ u) (+ λ_CSF·csf_op(v)): the χ block of MEDI's Gauss-Newton system, its
        right-hand side (v = χ, u = m²·residual, scale = 2λ) and its operator (v = p, u = 2λ·m²·(D ∗ p), scale 1);
        the weak-harmonic step builds its χ block from the same terms. ``out``: a tensor to write into (no new one)."""
        out = self.reg_op(v, W, out=out)
        out += self.Dconv(u).mul_(scale)
        if use_csf:
            out += self.csf_op(v).mul_(lambda_csf)
        return out

    def csf_op(self, x):
        """P x = M_CSF (x − mean_CSF x)."""
        mu = x[self.csf].mean()
        return (x - mu) * self.csf

    def costs(self, x, Dx=None):
        if Dx is None:
            Dx = self.Dconv(x)
        reg = float(self.wgrad(x).abs_().sum(dtype=torch.float64))
        wh = self.wh
        r = Dx - self.f if wh is None else Dx + wh.phi - self.f
        r = r.square_() if self.linear else (2.0 - 2.0 * torch.cos(r))
        data = float((self.m2 * r).sum(dtype=torch.float64))
        return reg, data

    def noise_energy(self, sigma):
        """E_noise = Σ m² (2 − 2 e^{−σ²/2}) with σ (rad) a tensor or a scalar."""
        if not torch.is_tensor(sigma):
            sigma = torch.full_like(self.m, float(sigma))
        e = self.m2 * (2.0 - 2.0 * torch.exp(-0.5 * sigma * sigma))
        return float(e[self.mask].sum(dtype=torch.float64))

    # ---- conjugate gradients
    def cg(self, A, b, tol, max_iter, precond=None):
        """CG on A x = b from x = 0 until ‖r‖ ≤ tol·‖b‖ (or ``max_iter``); checks cancel at every iteration.

        ``precond``: an SPD z = M⁻¹r (preconditioned CG; the weak-harmonic φ block), None for plain CG.
        Returns (x, iterations, ‖r‖/‖b‖). (A Jacobi preconditioner was tried: no fewer iterations on the
        1 mm head, and it spoiled TFI's preconditioning by P.)"""
        x = torch.zeros_like(b)
        r = b.clone()
        z = r if precond is None else precond(r)
        d = z.clone()
        delta = float(torch.dot(r.reshape(-1), r.reshape(-1)))     # ‖r‖²
        rz = delta if precond is None else float(torch.dot(r.reshape(-1), z.reshape(-1)))
        delta0 = delta
        it = 0
        if delta0 == 0.0:
            return x, 0, 0.0
        while it < max_iter and delta > tol * tol * delta0:
            self.rep.check()
            q = A(d)
            dq = float(torch.dot(d.reshape(-1), q.reshape(-1)))
            if not dq > 0:
                break
            alpha = rz / dq
            x.add_(d, alpha=alpha)
            r.sub_(q, alpha=alpha)
            old = rz
            delta = float(torch.dot(r.reshape(-1), r.reshape(-1)))
            if precond is None:
                rz = delta
            else:
                z = precond(r)
                rz = float(torch.dot(r.reshape(-1), z.reshape(-1)))
            d.mul_(rz / old).add_(z)
            it += 1
        return x, it, math.sqrt(delta / delta0)

    # ---- one Gauss-Newton solve
    def reset_weights(self):
        """Undo MERIT's updates: the data weights of the input noise map (what a fresh problem has)."""
        if self.noise is not self.base_noise:
            self.noise = self.base_noise
            self.set_weight(self.base_noise)
        self.merit_flagged = None

    def solve(self, lam, lambda_csf, x0, *, cg_tol, cg_max_iter, max_iter, tol_norm_ratio, merit, label=""):
        """Gauss-Newton from χ = ``x0`` (None: 0); returns (χ, history).

        With a preconditioner ``self.P`` (TFI) the unknown is y, χ = P·y: the gradient and the
        Gauss-Newton matrix of the cost in y are P·g and P·A·P, and the stop ratio is ‖dy‖/‖y‖.
        Without it (MEDI) y = χ and no multiplication by P is made."""
        self.reset_weights()
        P = getattr(self, "P", None)
        y = torch.zeros(self.shape, dtype=torch.float32, device=self.dev) if x0 is None else x0.clone()
        if P is not None and x0 is not None:
            y = y / P
        hist = {"norm_ratio": [], "cost": [], "cost_reg": [], "cost_data": [], "cg_iters": [], "cg_residual": []}
        use_csf = self.csf is not None and lambda_csf > 0
        ratio = math.inf
        it = 0
        x = y if P is None else P * y
        Dx = None  # D∗χ of the current χ (kept from the cost evaluation of the previous step)
        wh = self.wh
        if wh is not None:
            wh.reset()
        self.rep.start_solve(label, max_iter, tol_norm_ratio)
        while ratio > tol_norm_ratio and it < max_iter:
            it += 1
            W = self.lagged_weights(x)
            if Dx is None:
                Dx = self.Dconv(x)
            if wh is None:
                r = Dx - self.f if self.linear else torch.sin(Dx - self.f)
                b = self.chi_terms(x, W, self.m2 * r, 2.0 * lam, lambda_csf, use_csf)
                del r, Dx
                if P is not None:
                    b *= P
                m2s = self.m2 * (2.0 * lam)

                def A(p):
                    if P is not None:
                        p = P * p
                    out = self.chi_terms(p, W, m2s * self.Dconv(p), 1.0, lambda_csf, use_csf)
                    if P is not None:
                        out *= P
                    return out

                dy, cg_it, cg_res = self.cg(A, b.neg_(), cg_tol, cg_max_iter)
                del b, W, A, m2s
            else:                    # weak-harmonic MEDI: χ and the remnant φ in one GN step (medi_harmonic)
                dy, dphi, cg_it, cg_res = wh.step(self, x, Dx, W, lam, lambda_csf, use_csf, cg_tol, cg_max_iter)
                wh.phi += dphi
                del Dx, W, dphi
            ny = float(torch.linalg.vector_norm(y))
            ndy = float(torch.linalg.vector_norm(dy))
            ratio = ndy / ny if ny > 0 else math.inf
            y += dy
            del dy
            x = y if P is None else P * y
            Dx = self.Dconv(x)
            reg, data = self.costs(x, Dx)
            if use_csf:
                pc = self.csf_op(x)
                reg_csf = 0.5 * lambda_csf * float((pc * pc).sum(dtype=torch.float64))
            else:
                reg_csf = 0.0
            cost = reg + lam * data + reg_csf
            if wh is not None:
                cost += lam * wh.beta * wh.cost()
            for key, v in (("norm_ratio", ratio), ("cost", cost), ("cost_reg", reg), ("cost_data", data),
                           ("cg_iters", cg_it), ("cg_residual", cg_res)):
                hist[key].append(v)
            if merit:
                self._merit(Dx if wh is None else Dx + wh.phi)
            self.rep.gn_report(it, ratio, cost, cg_it, x)
        hist["gn_iters"] = it
        hist["converged"] = ratio <= tol_norm_ratio
        if merit:
            hist["merit_voxels"] = 0 if self.merit_flagged is None else int(self.merit_flagged.sum())
        self.rep.finish_solve(it, ratio)
        return x, hist

    def _merit(self, Dx):
        """Toolbox MERIT: inflate N_std where the demeaned residual exceeds 6 std."""
        wres = self.m * torch.exp(1j * Dx) - self.m * torch.exp(1j * self.f)
        inside = self.mask
        wres = wres - wres[inside].mean()
        factor = 6.0 * float(wres[inside].abs().std())
        if not factor > 0:
            return
        scale = (wres.abs() / factor).clamp_min(1.0)
        flagged = (scale > 1.0) & inside
        self.merit_flagged = flagged if self.merit_flagged is None else (self.merit_flagged | flagged)
        base = self.noise if self.noise is not None else self.mask.float()
        # the toolbox updates its N_std before SMV and re-applies SMV; with the SMV-transformed map
        # stored here the update is applied to it directly (the same up to the SMV smoothing of N²)
        noise = torch.where(inside, base * scale * scale, base)
        self.noise = noise
        self.set_weight(noise)


class GNReporter(Reporter):
    """One progress record per Gauss-Newton step, and one when a solve ends.

    Step k of N (``step`` = k, so the counter is never behind), the stop ratio, the cost, the CG
    iterations and seconds of the step, and an ETA; then "converged at GN k, ratio r" or "stopped at
    max iterations". Several solves (``lambda=auto``) announce how many may follow (``solves_left``)
    so the ETA covers them. Cancel is checked at every CG iteration (:meth:`check`).

    The ETA of a solve: the mean seconds per GN step so far × the steps still expected, which is
    the steps the ratio needs to fall below the tolerance at its last rate of decrease (geometric),
    at most the steps left before ``max_iter``.
    """

    def __init__(self, progress, cancel, total, stage="MEDI", to_ppm=None):
        super().__init__(progress, cancel, total=total, stage=stage)
        self.to_ppm = to_ppm
        self.solves_left = 0       # solves that may follow the current one (lambda=auto)
        self.solve_seconds = []    # durations of finished solves
        self.label = ""
        self.ratios = []
        self.step_seconds = []

    def start_solve(self, label, max_iter, tol):
        self.label, self.max_iter, self.tol = label, int(max_iter), float(tol)
        self.total = self.max_iter
        self.ratios, self.step_seconds = [], []
        self.t_solve = self.t_step = time.perf_counter()

    def _steps_left(self, it):
        left = self.max_iter - it
        r = self.ratios
        if len(r) >= 2 and 0 < r[-1] < r[-2] < math.inf and r[-1] > self.tol:
            need = math.ceil(math.log(self.tol / r[-1]) / math.log(r[-1] / r[-2]))
            left = min(left, max(need, 1))
        elif r and r[-1] <= self.tol:
            left = 0
        return left

    def eta(self, it):
        """Seconds still expected: this solve's remaining GN steps, then the solves that may follow."""
        per = sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else 0.0
        rest = self._steps_left(it) * per
        if self.solves_left:
            solve = (sum(self.solve_seconds) / len(self.solve_seconds) if self.solve_seconds
                     else per * self.max_iter)
            rest += self.solves_left * solve
        return rest

    def gn_report(self, it, ratio, cost, cg_it, x):
        now = time.perf_counter()
        sec = now - self.t_step
        self.t_step = now
        self.ratios.append(ratio)
        self.step_seconds.append(sec)
        eta = self.eta(it)
        preview = self.to_ppm(x) if (self.progress is not None and self.to_ppm is not None) else None
        self(it, f"{self.stage}{self.label} GN {it}/{self.max_iter}: ‖dχ‖/‖χ‖ ratio={ratio:.3g} cost={cost:.4g} "
                 f"CG={cg_it} {sec:.1f} s, ETA {eta:.0f} s", preview=preview, ratio=ratio, cost=cost, CG=cg_it,
             eta_s=eta)

    def finish_solve(self, it, ratio):
        self.solve_seconds.append(time.perf_counter() - self.t_solve)
        if ratio <= self.tol:
            what = f"converged at GN {it}, ratio {ratio:.3g} < {self.tol:g}"
        else:
            what = f"stopped at max iterations (GN {it}/{self.max_iter}, ratio {ratio:.3g} ≥ {self.tol:g})"
        self(self.max_iter, f"{self.stage}{self.label} {what}", ratio=ratio)
