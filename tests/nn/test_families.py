"""Data families of the synthetic pool (issue 26): statistics, reproducibility, held-out family."""

import numpy as np
import pytest

from napari_qsm.nn.families import (FAMILIES, add_calcification, add_vessel, family_of, family_weights,
                                    make_family_head)
from napari_qsm.nn.synth import PhantomPool, Regime, SynthConfig, draw_batch, sample_pair

REG = Regime((36, 36, 36), (1.0, 1.0, 1.0))
SLAB = Regime((48, 48, 12), (0.75, 0.75, 3.0))


def cfg(**kw):
    base = dict(patch=(24, 24, 24), pool_size=3, refresh_every=2, family_box=1.5, seed_base=300_000)
    base.update(kw)
    return SynthConfig(**base)


@pytest.mark.parametrize("family", ["geometric", "texture"])
@pytest.mark.parametrize("regime", [REG, SLAB])
def test_family_heads_are_finite_and_non_trivial(family, regime):
    c = cfg()
    stds, means = [], []
    for seed in range(3):
        h = make_family_head(family, seed, regime, c)
        assert h.family == family and h.chi.dtype == np.float32
        assert h.chi.shape == h.mask.shape == h.magnitude.shape == h.labels.shape
        assert all(np.isfinite(a).all() for a in (h.chi, h.magnitude))
        assert 0.15 < h.mask.mean() < 0.98                      # a mask, not the whole box, not empty
        assert np.all(h.chi[~h.mask] == 0) and np.all(h.magnitude[~h.mask] == 0)
        assert h.magnitude[h.mask].min() > 0
        v = h.chi[h.mask]
        stds.append(float(v.std()))
        means.append(float(v.mean()))
        assert float(np.abs(v).max()) < 2.5                      # within the configured χ ranges
    # χ varies inside the mask at the tissue scale (0.01-0.3 ppm), differently per seed
    assert all(0.01 < s < 0.3 for s in stds), stds
    assert len(set(np.round(stds, 6))) == 3


def test_geometric_family_has_both_signs_and_flat_shapes():
    c = cfg(geo_chi=(-0.3, 0.6))
    vals = np.concatenate([make_family_head("geometric", s, REG, c).chi.ravel() for s in range(4)])
    assert vals.min() < -0.1 and vals.max() > 0.3
    # piecewise-constant sources: many voxels share exactly the value of their shape
    u, n = np.unique(vals[vals != 0], return_counts=True)
    assert n.max() > 50


def test_texture_family_is_smooth():
    c = cfg(texture_sigma_mm=(6.0, 6.0))
    h = make_family_head("texture", 1, REG, c)
    inner = h.mask.copy()
    from scipy import ndimage
    inner = ndimage.binary_erosion(inner, iterations=3)
    d = np.diff(h.chi, axis=0)[inner[1:]]
    # neighbouring voxels differ far less than the field's spread: band-limited, not white noise
    assert np.median(np.abs(d)) < 0.3 * h.chi[inner].std()


def test_inserts_change_chi_with_the_expected_sign():
    c = cfg(vessel_chi=(0.5, 0.5), vessel_radius_mm=(1.5, 1.5), calc_chi=(-1.5, -1.5), calc_radius_mm=(2.5, 2.5))
    h = make_family_head("texture", 4, REG, c)
    before = h.chi.copy()
    assert add_vessel(h, np.random.default_rng(0), c)
    assert h.chi.max() > 0.35 and np.all(h.chi[~h.mask] == 0)
    mid = h.chi.copy()
    assert add_calcification(h, np.random.default_rng(1), c)
    assert h.chi.min() < -1.0 and (h.chi < mid - 0.5).sum() > 5
    assert not np.array_equal(before, h.chi)


def test_family_weights_and_held_out_family_never_drawn():
    c = cfg(families={"procedural": 0.5, "texture": 0.5, "geometric": 0.0})
    drawn = {family_of(c, k) for k in range(400)}
    assert drawn == {"procedural", "texture"}
    c2 = cfg(families={"procedural": 1, "geometric": 1, "texture": 2})
    got = [family_of(c2, k) for k in range(2000)]
    assert abs(got.count("texture") / 2000 - 0.5) < 0.05
    with pytest.raises(ValueError):
        family_weights(cfg(families={"mni152": 1.0}))
    with pytest.raises(ValueError):
        family_weights(cfg(families={"geometric": 0.0}))
    assert family_of(cfg(), 7) == "procedural"            # default: the original pool


def test_pool_reproducible_for_seed_and_step_and_excludes_held_out():
    c = cfg(families={"geometric": 1.0, "texture": 1.0}, regimes=(REG, SLAB), p_inserts=0.5)
    a, b = PhantomPool(c), PhantomPool(c)
    a.sync(0)
    a.sync(5)          # a pool that went through earlier steps ...
    b.sync(5)          # ... and a fresh one (a resumed run) hold the same heads
    for ha, hb in zip(a.heads(), b.heads()):
        assert ha.seed == hb.seed and ha.family == hb.family
        assert np.array_equal(ha.chi, hb.chi) and np.array_equal(ha.mask, hb.mask)
    sa, sb = draw_batch(a, 5, 2, c, seed=3), draw_batch(b, 5, 2, c, seed=3)
    for x, y in zip(sa, sb):
        assert np.array_equal(x.field, y.field) and np.array_equal(x.chi, y.chi)
    c_ex = cfg(families={"procedural": 0.0, "texture": 1.0}, regimes=(REG,))
    p = PhantomPool(c_ex)
    for step in (0, 6, 12):
        p.sync(step)
        assert {h.family for h in p.heads()} == {"texture"}


def test_family_patch_through_honest_physics():
    c = cfg(honest=True, families={"geometric": 1.0})
    h = make_family_head("geometric", 2, REG, c)
    s = sample_pair(h, np.random.default_rng(0), c, augment=True, snr=100.0)
    assert s.info["family"] == "geometric" and s.info["honest"]
    m = s.mask > 0
    assert np.isfinite(s.field).all() and np.isfinite(s.noise_std).all()
    assert s.field[m].std() > 1e-3 and np.all(s.field[~m] == 0)
    # a field from an echo fit, not the inversion's own kernel: it differs from D*χ by more than noise-free rounding
    from napari_qsm.core.dipole import forward_field
    ideal = forward_field(s.chi, s.voxel_size, s.b0_direction, device="cpu") * m
    assert np.linalg.norm(s.field[m] - ideal[m]) > 1e-3 * np.linalg.norm(ideal[m])
