"""Total field inversion: physics (analytic inside and outside sources), the Gauss-Newton step's
conditions in the preconditioned variable, the registry record and the command line."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_qsm.core.dipole import sphere_field
from napari_qsm.core.inversion.medi import medi_l1
from napari_qsm.core.inversion.medi_solver import GNReporter, Problem
from napari_qsm.core.inversion.tfi import TFIParams, tfi
from napari_qsm.core.metrics import nrmse_demeaned as nrmse
from napari_qsm.methods import get_method

N, VS, B0 = 48, (1.5, 1.5, 1.5), (0.0, np.sin(0.3), np.cos(0.3))


def _r(grid, centre):
    return np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))


@pytest.fixture(scope="module")
def head():
    """Brain = ellipsoid; inside χ = three spheres with their analytic (Lorentz-corrected) fields; outside:
    a 9.4 ppm sphere (air-like, radius 6 mm) 11.5 mm from the brain whose analytic field in the brain
    peaks above the inside field's peak. Magnitude edges from χ, with noise; field noise 0.002 ppm."""
    g = np.meshgrid(*[np.arange(N) * VS[0] for _ in range(3)], indexing="ij")
    c = np.full(3, N / 2 * VS[0])
    brain = sum(((gi - ci) / a) ** 2 for gi, ci, a in zip(g, c, (24, 27, 21))) <= 1
    chi = np.zeros((N,) * 3, np.float32)
    local = np.zeros((N,) * 3, np.float32)
    for off, a, dchi in (((-8, 6, 0), 5.0, 0.15), ((9, -5, 3), 4.0, -0.1), ((0, 0, -8), 6.0, 0.05)):
        cc = c + np.array(off)
        chi[_r(g, cc) <= a] += dchi
        local += sphere_field((N,) * 3, VS, cc, a, dchi, B0)
    cc = c + np.array((30, -20, 20))
    outside = sphere_field((N,) * 3, VS, cc, 6.0, 9.4, B0)
    assert not (brain & (_r(g, cc) <= 6.0)).any()
    rng = np.random.default_rng(0)
    noise = 0.002 * rng.standard_normal(brain.shape)
    mag = np.where(brain, 1.0 - 2.0 * chi + 0.02 * rng.standard_normal(brain.shape), 0).astype(np.float32)
    return {"brain": brain, "chi": chi, "local": np.where(brain, local + noise, 0).astype(np.float32),
            "total": np.where(brain, local + outside + noise, 0).astype(np.float32), "mag": mag,
            "noise_std": np.full(brain.shape, 0.002, np.float32), "outside_max": float(np.abs(outside[brain]).max()),
            "local_max": float(np.abs(local[brain]).max())}


def test_tfi_total_field_with_analytic_outside_source_gives_the_inside_chi(head):
    h = head
    assert h["outside_max"] > h["local_max"]          # the background dominates the total field
    kw = dict(magnitude=h["mag"], noise_std=h["noise_std"])
    chi_total, info = tfi(h["total"], h["brain"], VS, B0, return_info=True, **kw)
    chi_local = tfi(h["local"], h["brain"], VS, B0, **kw)
    e_total = nrmse(chi_total, h["chi"], h["brain"])
    e_local = nrmse(chi_local, h["chi"], h["brain"])
    # without a background step MEDI turns the outside source into brain χ
    e_medi = nrmse(medi_l1(h["total"], h["brain"], VS, B0, **kw), h["chi"], h["brain"])
    assert e_medi > 100
    # TFI: the outside source hardly leaks in (its χ lands outside the brain)
    assert e_total < 80 and e_total < e_local + 20 and e_total < 0.75 * e_medi
    assert abs(float(chi_total[h["brain"]].mean())) < 1e-6          # referenced to the brain mean
    assert (chi_total[~h["brain"]] == 0).all()
    assert info["history"]["gn_iters"] >= 2 and info["precond"] == 30.0


def test_tfi_gauss_newton_step_is_the_cg_solution_and_a_descent_direction():
    """One GN step in y (χ = P·y, P = 1 / 30): the gradient the solver uses equals the finite-difference
    gradient of the smoothed cost J(y) = Σ w_G √((∇Py)² + ε) + λ‖m(DPy − f)‖²; the step dy solves
    P A P dy = −g to the CG tolerance and is a descent direction."""
    rng = np.random.default_rng(1)
    n = 16
    mask = np.zeros((n,) * 3, bool)
    mask[4:12, 3:13, 4:12] = True
    f = (rng.standard_normal((n,) * 3) * 0.05).astype(np.float32)
    prob = Problem(f, mask, None, None, None, (1.0, 1.0, 1.0), (0, 0, 1), 1.25, 0.0, torch.device("cpu"),
                   GNReporter(None, None, 1))
    prob.linear = True
    prob.wG = torch.as_tensor(rng.random((3,) + (n,) * 3) > 0.2)
    P = torch.where(torch.as_tensor(mask), 1.0, 30.0).to(torch.float32)
    prob.P = P
    lam, eps = 50.0, 1e-6
    y = torch.as_tensor(rng.standard_normal((n,) * 3).astype(np.float32) * 0.1, dtype=torch.float64)

    def J(yy):   # in float64 throughout (the kernel is promoted)
        x = P.double() * yy
        g = prob.grad(x) * prob.wG
        return float(torch.sqrt(g * g + eps).sum() + lam * (prob.m2.double() * (prob.Dconv(x) - prob.f.double()) ** 2).sum())

    x = (P.double() * y).float()
    W = prob.lagged_weights(x)
    grad = P * (prob.reg_op(x, W) + 2 * lam * prob.Dconv(prob.m2 * (prob.Dconv(x) - prob.f)))
    v = torch.as_tensor(rng.standard_normal((n,) * 3))
    hstep = 1e-7
    fd = (J(y + hstep * v) - J(y - hstep * v)) / (2 * hstep)
    assert float((grad.double() * v).sum()) == pytest.approx(fd, rel=1e-3)
    # the solver's first step from y = 0
    chi, hist = prob.solve(lam, 0.0, None, cg_tol=1e-3, cg_max_iter=500, max_iter=1, tol_norm_ratio=0.0, merit=False)
    dy = chi / P
    W0 = prob.lagged_weights(torch.zeros_like(chi))
    g0 = P * (prob.reg_op(torch.zeros_like(chi), W0) + 2 * lam * prob.Dconv(prob.m2 * (0 - prob.f)))
    Ady = P * (prob.reg_op(P * dy, W0) + 2 * lam * prob.Dconv(prob.m2 * prob.Dconv(P * dy)))
    assert float(torch.linalg.vector_norm(Ady + g0)) <= 1.01e-3 * float(torch.linalg.vector_norm(g0))
    assert float((g0 * dy).sum()) < 0
    assert J(dy.double()) < J(torch.zeros_like(y))
    assert hist["cg_residual"][0] <= 1e-3


def test_tfi_registry_record_and_errors(head):
    m = get_method("tfi")
    assert m.field_kind == "total" and m.long_running and m.uses_magnitude
    assert get_method("medi").field_kind == "local"
    assert TFIParams().precond == 30.0
    with pytest.raises(ValueError, match="magnitude"):
        tfi(head["total"], head["brain"], VS, B0)
    with pytest.raises(ValueError, match="mask: empty"):
        tfi(head["total"], np.zeros_like(head["brain"]), VS, B0, magnitude=head["mag"])


def test_cli_tfi_from_raw_echoes_skips_background_and_from_a_total_field(raw_bids_head, tmp_path, capsys):
    raw_head = raw_bids_head
    from napari_qsm.cli import main

    out = tmp_path / "chi.nii.gz"
    assert main(["recon", str(raw_head), "--method", "tfi", "--device", "cpu", "-o", str(out)]) == 0
    side = json.loads((tmp_path / "chi.json").read_text())
    steps = side["extras"]["field_steps"]
    assert [s["family"] for s in steps] == ["fit", "mask", "unwrap", "background"]
    assert steps[3]["name"] == "none" and side["method"] == "tfi"
    chi = nib.load(str(out)).get_fdata()
    assert np.isfinite(chi).all() and np.abs(chi).max() > 0.01
    err = capsys.readouterr().err
    assert "TFI" in err and ("converged at GN" in err or "stopped at max iterations" in err)
    # a background choice makes no sense with TFI
    assert main(["recon", str(raw_head), "--method", "tfi", "--background", "lbv", "--device", "cpu", "-q",
                 "-o", str(tmp_path / "x.nii.gz")]) != 0
    assert "takes the total field" in capsys.readouterr().err
    # the total field the Field step writes, with a mask
    fld = tmp_path / "field"
    assert main(["field", str(raw_head), "-o", str(fld), "--device", "cpu", "-q"]) == 0
    out2 = tmp_path / "chi2.nii.gz"
    assert main(["recon", str(fld / "total_field.nii.gz"), "--mask", str(fld / "mask.nii.gz"), "--magnitude",
                 str(fld / "magnitude.nii.gz"), "--method", "tfi", "--device", "cpu", "-q", "-o", str(out2)]) == 0
    assert np.abs(nib.load(str(out2)).get_fdata()).max() > 0.01

