"""The mask's outer shell: partial-volume bone leaves, cortex stays (issue 24).

The shell peel calls a voxel of the outer 3 mm dark when it is below a fraction of the local tissue level.
On the echoes' combined magnitude (T2*-weighted) that also hits cortex whenever T2* decay, not a lack of
protons, makes it darker than the CSF-lit level: at the slab's echo times (12.6–37 ms) a cortex whose R2*
exceeds white matter's (iron-rich cortex; any cortex at 7 T) is darker than white matter. Extrapolated to
TE 0 with the fit's R2* (the proton density) cortex is not dark, and a voxel that is partly bone (a void at
every echo: its T2* is below 3 ms) is dark by its void fraction.

Scene: a layered sphere (white matter, a 3 mm cortical ribbon, a thin CSF rim, skull, scalp) in air, every
voxel the mean of 3×3×3 sub-voxels (partial volume), 7 echoes, complex noise; the default echo fit, then the
default mask. Two more heads from the project's generators (core.sim.phantom and core.sim.shapes) with the
same echo times check the same on anatomy drawn independently of this scene.
"""

import inspect

import numpy as np
import pytest

from napari_qsm.core.field.mask import ThresholdMaskParams, threshold_mask
from napari_qsm.core.field.pipeline import find_step
from napari_qsm.core.field.records import Echoes
from napari_qsm.core.sim.phantom import CLINICAL_ECHOES, make_phantom
from napari_qsm.core.sim.shapes import make_head

TE = tuple(0.0126 + 0.0041 * i for i in range(7))          # the clinical slab protocol
VS = (1.5, 1.5, 1.5)
#: label: (outer radius mm, proton density, R2* 1/s); 3 T values, cortex iron-rich (R2* above white matter's)
LAYERS = {"scalp": (38.0, 0.85, 30.0), "bone": (35.0, 0.10, 300.0), "rim": (29.0, 1.0, 4.0),
          "cortex": (28.0, 0.80, 40.0), "wm": (25.0, 0.69, 21.0)}


def layered_head(n=56, sub=3, sigma=0.01, seed=0):
    """Echoes of the layered sphere and the majority label of each voxel."""
    names = list(LAYERS)
    off = (np.arange(sub) + 0.5) / sub - 0.5
    c = (np.arange(n) - (n - 1) / 2) * VS[0]
    frac = np.zeros((len(names) + 1, n, n, n), np.float32)          # last: air
    for a in off:
        for b in off:
            for d in off:
                x, y, z = np.meshgrid(c + a * VS[0], c + b * VS[1], c + d * VS[2], indexing="ij", sparse=True)
                r = np.sqrt(x * x + y * y + z * z)
                lab = np.full(r.shape, len(names), np.int8)
                for k, nm in enumerate(names):                      # outermost first
                    lab[r <= LAYERS[nm][0]] = k
                for k in range(len(names) + 1):
                    frac[k] += lab == k
    frac /= sub ** 3
    te = np.asarray(TE, np.float32)
    sig = sum(frac[k][..., None] * LAYERS[nm][1] * np.exp(-LAYERS[nm][2] * te) for k, nm in enumerate(names))
    rng = np.random.default_rng(seed)
    field_rad = 2 * np.pi * 5.0 * te                                  # a 5 Hz offset, the same everywhere
    z = sig * np.exp(1j * field_rad) + sigma * (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape))
    e = Echoes(magnitude=np.abs(z).astype(np.float32), phase=np.angle(z).astype(np.float32), te=TE, b0_tesla=3.0,
               voxel_size=VS)
    major = np.argmax(frac, axis=0)
    return e, {nm: major == k for k, nm in enumerate(names)}


def chain_mask(e, params=None):
    """The default fit, then the mask with what the pipeline gives it (the echo times where the step takes them)."""
    total = find_step("fit").run(e, None, device="cpu")
    extra = {"te": total.te} if "te" in inspect.signature(threshold_mask).parameters else {}
    return threshold_mask(total.magnitude, params, voxel_size=total.voxel_size, misfit=total.misfit,
                          r2star=total.r2star, **extra)


@pytest.fixture(scope="module")
def scene():
    return layered_head()


def test_cortex_darker_than_white_matter_stays_and_bone_leaves(scene):
    e, lab = scene
    mag = e.magnitude
    # the premise: at these echo times the cortex is darker than white matter, though it has more protons
    assert np.median(mag[lab["cortex"]]) < 0.9 * np.median(mag[lab["wm"]])
    m = chain_mask(e)
    # measured: 100 % of the cortex, 0 bone voxels, 82 % of the CSF rim; on the magnitude (the code before this
    # test) 77.9 % of the cortex and 26 % of the rim
    assert (m & lab["cortex"]).sum() >= 0.99 * lab["cortex"].sum(), (m & lab["cortex"]).sum() / lab["cortex"].sum()
    assert (m & lab["bone"]).sum() <= 0.002 * lab["bone"].sum(), (m & lab["bone"]).sum()
    assert not np.any(m & lab["scalp"])
    # the T2*-weighted contrast is what peels the cortex
    old = chain_mask(e, ThresholdMaskParams(edge_contrast="magnitude", edge_fraction=1.0))
    assert (old & lab["cortex"]).sum() < 0.9 * lab["cortex"].sum()


@pytest.fixture(scope="module", params=["phantom", "shapes"])
def generator_head(request):
    """A head in air from one of the project's generators, with the slab's echo times, 2.5×2.5×3 mm."""
    shape, vs = (64, 76, 48), (2.5, 2.5, 3.0)
    if request.param == "phantom":
        ph = make_phantom(shape, vs, seed=3, snr=50, honest=True, keep_echoes=True, background=True, device="cpu",
                          echo_protocol=CLINICAL_ECHOES)
        return request.param, ph.to_echoes(), ph.labels == 14, ph.labels == 2, ph.mask
    h = make_head(shape, vs, seed=1, te=TE, snr=40.0)
    return request.param, h.to_echoes(), h.labels == 2, h.labels == 5, h.brain_mask


def test_shell_on_generator_heads_at_long_echo_times(generator_head):
    name, e, bone, cortex, brain = generator_head
    m = chain_mask(e)
    kept = (m & cortex).sum() / cortex.sum()
    leak = (m & bone).sum() / bone.sum()
    # measured (new / on the magnitude, the code before): phantom bone 0 / 0 %, cortex 93.3 / 93.0 %;
    # shapes bone 0.53 / 1.29 % (partial-volume bone whose tissue part is CSF keeps up to half of CSF's proton
    # density: the 0.2 % of the research protocol's test_mask_real is not reached at these echo times), cortex
    # 98.9 / 98.9 %; brain inside the mask 96.3 / 96.1 % and 99.8 / 99.8 %
    assert kept >= 0.9, kept
    assert leak <= (0.002 if name == "phantom" else 0.008), leak
    assert (m & brain).sum() >= 0.95 * brain.sum()


def test_proton_density_undoes_t2star_decay():
    from napari_qsm.core.field.mask import proton_density
    te = np.asarray(TE)
    pd = np.array([0.7, 0.8, 1.0], np.float32)
    r2 = np.array([21.0, 35.0, 4.0], np.float32)
    rss = np.sqrt(((pd[:, None] * np.exp(-r2[:, None] * te)) ** 2).sum(1)).astype(np.float32)
    np.testing.assert_allclose(proton_density(rss, r2, te, 500.0), pd, rtol=1e-5)
    # R2* above the cap is clipped (noise-only voxels are not blown up)
    assert proton_density(rss[:1], np.array([400.0], np.float32), te, 50.0)[0] < rss[0] * np.exp(50.0 * te[-1])
