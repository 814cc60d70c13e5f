"""Shared helpers of the network tests (tests/nn)."""

from __future__ import annotations

import numpy as np


def blob_volume(shape=(32, 32, 32), seed=0):
    """(χ float32 ppm, mask bool): six random spheres inside an ellipsoid centred in ``shape``.

    ``seed`` is a seed or a ``numpy.random.Generator`` (which is drawn from and can be used further).
    """
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    mask = (g[0] ** 2 / 14 ** 2 + g[1] ** 2 / 13 ** 2 + g[2] ** 2 / 12 ** 2) < 1
    chi = np.zeros(shape, np.float32)
    for _ in range(6):
        c = rng.uniform(-8, 8, 3)
        r = rng.uniform(2, 5)
        chi += rng.uniform(-0.2, 0.3) * ((g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2 < r * r)
    chi *= mask
    return chi.astype(np.float32), mask
