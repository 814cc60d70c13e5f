"""Raw echoes → local field in one call: steps chained, user mask, parameters routed to their step, a Scan out."""

import numpy as np
import pytest

from napari_qsm.core.field.background import LBVParams
from napari_qsm.core.field.pipeline import FieldRecipe, find_step, local_field, split_params
from napari_qsm.core.sim.phantom import make_phantom
from napari_qsm.methods import reconstruct


@pytest.fixture(scope="module")
def head_in_air():
    return make_phantom((48, 56, 48), (3.5, 3.5, 3.5), seed=5, snr=80, honest=True, keep_echoes=True,
                        background=True, device="cpu")


def test_defaults_and_lookup():
    assert [find_step(f).name for f in ("fit", "mask", "unwrap", "background")] == \
        ["linear", "threshold", "quality", "lbv"]
    with pytest.raises(ValueError, match="unknown step"):
        find_step("background", "sharp9")
    with pytest.raises(ValueError, match="family"):
        find_step("denoise")


def test_params_are_routed_to_their_step():
    r = FieldRecipe(background="resharp")
    assert split_params({"radius": "6", "fit.r2star_max": "300"}, r) == \
        {"background": {"radius": "6"}, "fit": {"r2star_max": "300"}}
    with pytest.raises(ValueError, match="no parameter"):
        split_params({"background.max_iter_bogus": 1}, r)
    with pytest.raises(ValueError, match="no step"):
        split_params({"bogus": 1}, r)
    r.params = {"background": {"radius": "0.01"}}
    with pytest.raises(ValueError):
        r.record("background")  # out of range: refused before any work
    assert isinstance(FieldRecipe().record("background"), LBVParams)


def test_head_in_air_to_local_field_and_chi(head_in_air):
    ph = head_in_air
    run = local_field(ph.to_echoes(), device="cpu")
    assert [s["family"] for s in run.steps] == ["fit", "mask", "unwrap", "background"]
    brain = run.brain_mask & ph.mask
    dice = 2 * brain.sum() / (run.brain_mask.sum() + ph.mask.sum())
    assert dice > 0.85, dice
    # the unwrapped total field: the background (≈ ±0.5 ppm in the brain, wrapped over ΔTE near the cavities)
    # is recovered to the noise level in most voxels (a few wrap errors remain next to the air cavities)
    err = (run.total.field - ph.true_total_field)[brain]
    err -= np.median(err)
    nstd = float(np.median(run.total.noise_std[brain]))
    assert np.median(np.abs(err)) < 2 * nstd, (np.median(np.abs(err)), nstd)
    assert np.mean(np.abs(err) > 0.5) < 0.01
    assert float(np.ptp(ph.true_total_field[brain])) > 0.5  # there was a background to remove
    scan = run.scan
    assert scan.mask.sum() <= run.brain_mask.sum() and scan.noise_std is not None and scan.r2star is not None
    assert scan.b0_tesla == pytest.approx(ph.b0_tesla) and scan.source["field_steps"] == run.steps
    # the background is gone: the local field is far smaller than the total field
    assert np.std(scan.field[scan.mask]) < 0.3 * np.std(run.total.field[scan.mask])
    res = reconstruct(scan, "tkd", device="cpu")  # every inversion accepts the pipeline's Scan unchanged
    assert res.chi.shape == scan.shape and np.isfinite(res.chi).all()


def test_user_mask_wins(head_in_air):
    ph = head_in_air
    run = local_field(ph.to_echoes(), FieldRecipe(background="lbv"), mask=ph.mask, device="cpu")
    assert np.array_equal(run.brain_mask, ph.mask)
    assert run.steps[1]["name"] == "user"
    assert not np.any(run.scan.mask & ~ph.mask)
