"""Data consistency (core/inversion/consistency.py) against physics: optimality, limits, an analytic sphere."""

import numpy as np
import pytest

from napari_qsm.core.dipole import forward_field, sphere_field
from napari_qsm.core.inversion.consistency import data_consistency
from napari_qsm.core.progress import CancelToken, Cancelled

VS = (1.0, 1.0, 1.0)
B0 = (0.0, 0.0, 1.0)


def _sphere(n=28, r=5.0, dchi=0.2):
    c = np.array([n / 2.0] * 3)
    g = np.indices((n, n, n)).transpose(1, 2, 3, 0).astype(float)
    inside = np.linalg.norm(g - c, axis=-1) <= r
    field = sphere_field((n, n, n), VS, c, r, dchi, B0).astype(np.float32)
    mask = np.linalg.norm(g - c, axis=-1) <= 11.0
    chi = np.where(inside, dchi, 0.0).astype(np.float32)
    return field, mask, chi, inside


def _objective(x, field, mask, chi0, mu):
    """‖M(D∗x − f)‖² + μ‖x − χ₀‖², with D∗ from dipole.forward_field (pad 2: the same linear convolution)."""
    fx = forward_field(x, VS, B0, pad_factor=2.0, device="cpu")
    return float(np.sum((mask * (fx - field)) ** 2) + mu * np.sum((x - chi0) ** 2))


def test_solution_is_a_minimum_of_the_objective():
    field, mask, chi, _ = _sphere(n=20, r=4.0)
    rng = np.random.default_rng(0)
    chi0 = (0.5 * chi + 0.01 * rng.standard_normal(chi.shape) * mask).astype(np.float32)
    mu = 0.01
    # the box is the whole volume (large margin) and pad 2: χ lives on the whole grid, like forward_field
    x, info = data_consistency(field, np.ones_like(mask), chi0, VS, B0, mu=mu, iterations=150, margin=64,
                               pad_factor=2.0, return_info=True)
    assert info["relative_residual"] < 1e-5
    j = _objective(x, field, np.ones_like(mask), chi0, mu)
    for _ in range(4):
        d = rng.standard_normal(x.shape).astype(np.float32)
        d *= 1e-3 / np.linalg.norm(d) * np.linalg.norm(x)
        assert _objective(x + d, field, np.ones_like(mask), chi0, mu) > j
        assert _objective(x - d, field, np.ones_like(mask), chi0, mu) > j


def test_large_mu_keeps_the_prior_and_zero_iterations_return_it():
    field, mask, chi, _ = _sphere()
    chi0 = (0.3 * chi).astype(np.float32)
    same = data_consistency(field, mask, chi0, VS, B0, mu=1e6, iterations=10)
    np.testing.assert_allclose(same, chi0 * mask, atol=1e-5)
    np.testing.assert_array_equal(data_consistency(field, mask, chi0, VS, B0, iterations=0), chi0 * mask)


def test_the_field_corrects_a_wrong_prior_on_an_analytic_sphere():
    """A prior at half the true Δχ: the analytic sphere field pulls the estimate back toward the truth."""
    field, mask, chi, inside = _sphere()
    chi0 = (0.5 * chi).astype(np.float32)
    x = data_consistency(field, mask, chi0, VS, B0, mu=0.003, iterations=30)
    shell = mask & ~inside

    def dchi(v):   # the sphere's Δχ against its surroundings (the field fixes no absolute level)
        return float(v[inside].mean() - v[shell].mean())

    assert abs(dchi(chi0) - 0.2) == pytest.approx(0.1, abs=1e-3)
    assert abs(dchi(x) - 0.2) < 0.5 * abs(dchi(chi0) - 0.2)
    # and the field of the result agrees with the measured field better than the prior's does
    from napari_qsm.core.dipole import forward_field

    def misfit(v):
        return float(np.linalg.norm((forward_field(v, VS, B0, device="cpu") - field)[mask]))

    assert misfit(x) < 0.5 * misfit(chi0)


def test_bad_input_and_cancel():
    field, mask, chi, _ = _sphere(n=16, r=3.0)
    with pytest.raises(ValueError, match="chi0"):
        data_consistency(field, mask, chi[:-1], VS, B0)
    with pytest.raises(ValueError, match="mu"):
        data_consistency(field, mask, chi, VS, B0, mu=0.0)
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        data_consistency(field, mask, chi, VS, B0, iterations=5, cancel=tok)
