"""MEDI's solver building blocks: the dipole convolution on the padded grid."""

import numpy as np
import pytest
import torch

from napari_qsm.core.inversion.medi_solver import GNReporter, Problem

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pruned_convolution_is_the_padded_circular_convolution_cropped():
    """Problem._conv (inverse FFT pruned to the box) equals the circular convolution on the padded grid, cropped
    to the box (float64 reference), with the real kernel and its complex copy, on odd and even sizes."""
    rng = np.random.default_rng(1)
    n, vs = (7, 10, 9), (1.0, 1.2, 0.9)
    p = Problem(np.zeros(n, np.float32), np.ones(n, bool), None, None, None, vs, (0.1, 0.2, 1.0), 1.25, 0,
                torch.device("cpu"), GNReporter(None, None, 1))
    x = rng.standard_normal(n)
    big = np.zeros(p.pshape)
    big[: n[0], : n[1], : n[2]] = x
    for K in (p.D, p.D.to(torch.complex64)):
        # circular convolution on the padded grid by the explicit kernel in image space (float64)
        k = np.fft.irfftn(K.to(torch.complex128).numpy(), s=p.pshape, axes=(0, 1, 2))
        ref = np.real(np.fft.ifftn(np.fft.fftn(big) * np.fft.fftn(k)))[: n[0], : n[1], : n[2]]
        got = p._conv(torch.as_tensor(x, dtype=torch.float32), K).double().numpy()
        assert got.shape == n
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
