"""Can core/field/fit.py's fit_linear replace core/sim/signal._fit_echoes bit for bit? (issue 23; prints the differences)"""
import numpy as np, torch
torch.set_num_threads(1)
from napari_qsm.core.sim.phantom import make_phantom, default_echo_protocol, oblique_direction
from napari_qsm.core.sim.signal import _fit_echoes
from napari_qsm.core.field.fit import fit_linear, LinearFitParams

cases = {"honest_small 3.5 mm": dict(shape=(40, 48, 40), voxel_size=(3.5, 3.5, 3.5), seed=3, snr=40.0),
         "honest_clinical 1.5x1.5x6": dict(shape=(96, 112, 24), voxel_size=(1.5, 1.5, 6.0), seed=6, snr=40.0,
                                           b0_direction=oblique_direction(10, "x")),
         "honest_1mm": dict(shape=(112, 128, 112), voxel_size=(1.0, 1.0, 1.0), seed=0, snr=40.0)}
for name, kw in cases.items():
    ph = make_phantom(device="cpu", honest=True, keep_echoes=True, **kw)
    proto = default_echo_protocol(ph.voxel_size)
    fld, r2, rss, nstd = _fit_echoes(ph.echoes, proto, ph.b0_tesla, ph.noise_sigma)
    assert np.array_equal(fld * ph.mask, ph.field)
    for prm in (LinearFitParams(offsets="none"), LinearFitParams(offsets="none", noise_sigma=ph.noise_sigma)):
        tf = fit_linear(ph.to_echoes(), prm, device="cpu")
        m = ph.mask
        out = [name, "sigma=" + ("param" if prm.noise_sigma else "estimated")]
        for nm, a, b in (("field", fld, tf.field), ("N_std", nstd, tf.noise_std), ("R2*", r2, tf.r2star),
                         ("magnitude", rss, tf.magnitude)):
            d = np.abs(a[m].astype(np.float64) - b[m])
            out.append(f"{nm}: bitwise={np.array_equal(a[m], b[m])} max|diff|={d.max():.3g} "
                       f"({d.max() / max(np.abs(a[m]).max(), 1e-30):.2g} rel), voxels differing {np.mean(d > 0):.1%}")
        print(" | ".join(out), flush=True)
