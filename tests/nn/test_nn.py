"""QSMInvNet+ unit tests: small widths and 32³ volumes, a few seconds in total."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_qsm.core.dipole import forward_field
from napari_qsm.nn.infer import WeightsError, default_weights_path, load_model, predict
from napari_qsm.nn.losses import LambdaSchedule, loss_field, loss_supervised, noise_weights
from napari_qsm.nn.synth import Head, SynthConfig, phase_per_ppm, sample_pair, to_tensors
from napari_qsm.nn.train import Trainer, TrainConfig
from napari_qsm.nn.unet import DSBN, NetConfig, QSMInvNet, count_parameters, flops_per_voxel
from nn_test_helpers import blob_volume, np_conv as _np_conv, np_dipole as _np_dipole, rel_demeaned as _rel_demeaned


def tiny(nd=2, w=2, seed=0):
    torch.manual_seed(seed)
    return QSMInvNet(NetConfig(base_width=w, num_domains=nd))


def test_architecture_counts():
    m = tiny(w=4)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv3d)]
    assert sum(c.kernel_size == (3, 3, 3) for c in convs) == 9
    assert sum(c.kernel_size == (1, 1, 1) for c in convs) == 1
    assert all(c.padding == (1, 1, 1) for c in convs if c.kernel_size == (3, 3, 3))
    assert sum(isinstance(mod, DSBN) for mod in m.modules()) == 9
    # 4 levels of pooling: output shape equals input shape (multiple of 16)
    y = m(torch.randn(1, 2, 32, 32, 16))
    assert y.shape == (1, 1, 32, 32, 16)
    assert count_parameters(m) > 0
    f = flops_per_voxel(m.config)
    assert f["train_step"] == pytest.approx(3 * f["forward"])
    with pytest.raises(ValueError):
        m(torch.randn(1, 2, 30, 32, 32))


def test_dsbn_separate_stats_shared_weights():
    m = tiny(nd=2)
    m.train()
    x0 = torch.randn(2, 2, 32, 32, 32)
    x1 = 5.0 + 3.0 * torch.randn(2, 2, 32, 32, 32)
    m(x0, domain=0)
    bn0 = m.down[0].norm.bns[0]
    bn1 = m.down[0].norm.bns[1]
    mean1_before = bn1.running_mean.clone()
    assert torch.equal(bn1.running_mean, mean1_before) and bn0.num_batches_tracked == 1 and bn1.num_batches_tracked == 0
    m(x1, domain=1)
    assert bn1.num_batches_tracked == 1 and bn0.num_batches_tracked == 1
    assert not torch.allclose(bn0.running_mean, bn1.running_mean)
    # conv weights are the same objects for both domains; each BN parameter belongs to exactly one domain
    shared = {id(p) for p in m.shared_parameters()}
    assert id(m.down[0].conv.weight) in shared
    d0 = {id(p) for p in m.bn_parameters(0)}
    d1 = {id(p) for p in m.bn_parameters(1)}
    assert d0.isdisjoint(d1) and d0.isdisjoint(shared) and d1.isdisjoint(shared)
    assert len(d0) == len(d1) == 18  # 9 BNs x (weight, bias)
    # plain QSMInvNet: one BN per layer
    m1 = tiny(nd=1)
    assert len(m1.down[0].norm.bns) == 1
    with pytest.raises(ValueError):
        m1(x0, domain=1)


def test_forward_each_domain_and_gradients():
    m = tiny(nd=2)
    m.train()
    x = torch.randn(1, 2, 32, 32, 32)
    for d in (0, 1):
        m.zero_grad()
        y = m(x, domain=d)
        assert y.shape == (1, 1, 32, 32, 32) and torch.isfinite(y).all()
        y.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.shared_parameters())
        used = [p for p in m.bn_parameters(d)]
        other = [p for p in m.bn_parameters(1 - d)]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used[:2])
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in other)
    m.eval()
    y0, y1 = m(x, domain=0), m(x, domain=1)
    assert torch.isfinite(y0).all() and torch.isfinite(y1).all()


def test_save_load_identical(tmp_path):
    m = tiny(nd=2)
    m.train()
    for d in (0, 1):
        m(torch.randn(1, 2, 32, 32, 32) + d, domain=d)
    m.mark_trained(0)
    m.mark_trained(1)
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    m2 = load_model(p)
    m.eval()
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        for d in (0, 1):
            assert torch.equal(m(x, domain=d), m2(x, domain=d))
    assert m2.default_domain() == 1
    assert m2.config.base_width == 2 and m2.num_domains == 2


def test_load_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="cannot read"):
        load_model(bad)
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), other)
    with pytest.raises(WeightsError):
        load_model(other)
    sd = tiny().state_dict()
    sd.pop("head.bias")
    partial = tmp_path / "partial.pt"
    torch.save(sd, partial)
    with pytest.raises(WeightsError, match="missing"):
        load_model(partial)


def test_field_loss_zero_for_exact_chi():
    chi, mask = blob_volume()
    vs, b0 = (1.0, 1.0, 1.2), (0.1, 0.2, 0.97)
    f = forward_field(chi, vs, b0, device="cpu")
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)[None, None]
    m = t(mask.astype(np.float32))
    ppp = phase_per_ppm(3.0, 0.02)
    assert ppp == pytest.approx(16.05, abs=0.01)
    l0 = loss_field(t(chi), t(f) * m, m, vs, b0, phase_per_ppm=ppp)
    l1 = loss_field(t(chi) * 1.3, t(f) * m, m, vs, b0, phase_per_ppm=ppp)
    assert float(l0) < 1e-8
    assert float(l1) > 1e-4
    w = noise_weights(m, t(np.full(chi.shape, 0.01, np.float32)))
    assert float(w[m > 0].mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(loss_supervised(t(chi), t(chi))) == 0.0


def test_lambda_schedule():
    s = LambdaSchedule(lam_max=2.0, ramp=10, warmup=5)
    assert s(0) == 0 and s(5) == 0 and s(10) == pytest.approx(1.0) and s(15) == 2.0 and s(100) == 2.0
    e = LambdaSchedule(lam_max=1.0, ramp=10, kind="exp")
    assert e(0) == pytest.approx(0.01) and e(10) == 1.0
    vals = [LambdaSchedule(1.0, 20, kind="cosine")(t) for t in range(25)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_padding_and_tiling_equal_one_pass():
    m = tiny(nd=2, w=2)
    m.train()
    m(torch.randn(1, 2, 32, 32, 32))
    m.eval()
    rng = np.random.default_rng(0)
    # odd size along the tiled axis: padding + 3 tiles with a halo larger than the receptive field
    shape = (20, 24, 300)
    f = rng.standard_normal(shape).astype(np.float32) * 0.05
    mask = np.ones(shape, bool)
    mask[:, :, :5] = False
    one, info1 = predict(m, f, mask, memory_gb=64)
    assert info1["tiles"] == 1 and info1["padded_shape"] == [32, 32, 304]
    tiled, info2 = predict(m, f, mask, tile=224, overlap=160, memory_gb=64)
    assert info2["tiles"] > 1
    scale = np.abs(one).max()
    assert np.abs(tiled - one).max() <= 1e-4 * max(scale, 1.0)
    # a practical overlap still gives nearly the same result
    approx, info3 = predict(m, f, mask, tile=128, overlap=32, memory_gb=64)
    assert info3["tiles"] > 1 and np.isfinite(approx).all()
    assert one.shape == shape and np.all(one[~mask] == 0)


def test_tkd_channel_network_starts_as_tkd_and_tiles():
    """Physics channel: an untrained residual net is exactly TKD; the channel is built before tiling."""
    from napari_qsm.core.inversion.tkd import truncated_inversion

    torch.manual_seed(0)
    m = QSMInvNet(NetConfig(base_width=2, num_domains=2, tkd_delta=0.1))
    assert m.config.in_channels == 3 and float(m.tkd_delta) == pytest.approx(0.1)
    chi, mask = blob_volume((40, 36, 44))
    vs, b0 = (1.0, 1.0, 1.5), (0.2, 0.0, 0.98)
    f = forward_field(chi, vs, b0, device="cpu") * mask
    ref, _ = truncated_inversion(f, mask, vs, b0, threshold=0.1)
    one, _ = predict(m, f, mask, voxel_size=vs, b0_direction=b0)
    assert np.abs(one - ref).max() < 1e-5 * max(np.abs(ref).max(), 1.0)
    with pytest.raises(ValueError, match="voxel_size and b0_direction"):
        predict(m, f, mask)
    # after some training-mode updates the output differs from TKD, and tiles still match one pass
    m.train()
    with torch.no_grad():
        m.head.weight.normal_(0, 1.0)
    m(torch.randn(1, 3, 48, 48, 48))
    m.eval()
    one, _ = predict(m, f, mask, voxel_size=vs, b0_direction=b0, memory_gb=64)
    assert np.abs(one - ref).max() > 1e-3
    # tiles (halo larger than the receptive field) equal one pass: the TKD channel is whole-volume
    f2 = np.random.default_rng(0).standard_normal((20, 24, 300)).astype(np.float32) * 0.05
    m2 = np.ones(f2.shape, bool)
    one, _ = predict(m, f2, m2, voxel_size=vs, b0_direction=b0, memory_gb=64)
    tiled, info = predict(m, f2, m2, voxel_size=vs, b0_direction=b0, tile=224, overlap=160, memory_gb=64)
    assert info["tiles"] > 1
    assert np.abs(tiled - one).max() <= 1e-4 * max(np.abs(one).max(), 1.0)


def test_tkd_checkpoint_round_trip_and_old_checkpoints(tmp_path):
    torch.manual_seed(1)
    m = QSMInvNet(NetConfig(base_width=2, num_domains=2, tkd_delta=0.12))
    with torch.no_grad():
        m.head.weight.normal_(0, 0.1)
    p = tmp_path / "tkd.pt"
    torch.save(m.state_dict(), p)
    m2 = load_model(p)
    assert m2.config.tkd_delta == pytest.approx(0.12) and m2.config.in_channels == 3
    x = torch.randn(1, 3, 32, 32, 32)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    # a checkpoint written before the physics channel existed (no tkd_delta buffer) loads as field-only
    sd = tiny().state_dict()
    sd.pop("tkd_delta")
    old = tmp_path / "old.pt"
    torch.save(sd, old)
    assert load_model(old).config.tkd_delta == 0.0
    # inconsistent: TKD threshold without the third channel
    sd = tiny().state_dict()
    sd["tkd_delta"] = torch.tensor(0.1)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(WeightsError, match="input channels"):
        load_model(bad)


def _toy_head(shape=(48, 48, 48)):
    chi, mask = blob_volume(shape)
    lab = np.where(mask, 1, 0).astype(np.int16)
    return Head(chi=chi, mask=mask, magnitude=np.where(mask, 1.0, 0.1).astype(np.float32), labels=lab,
                voxel_size=(1.0, 1.0, 1.0), seed=0)


def test_synthetic_pair_physics_independent():
    """The synthetic field and the TKD channel agree with a dipole kernel and a TKD written out in numpy
    (2x zero padding, anisotropic voxels, oblique B0), and follow the B0 direction they are given."""
    chi0, mask0 = blob_volume((48, 48, 48))
    vs = (1.0, 0.8, 1.6)
    head = Head(chi=chi0, mask=mask0, magnitude=np.where(mask0, 1.0, 0.1).astype(np.float32),
                labels=mask0.astype(np.int16), voxel_size=vs, seed=0)
    cfg = SynthConfig(patch=(32, 32, 32), min_mask_fraction=0.1)
    b_obl = np.array([0.35, -0.25, 0.90])
    b_obl /= np.linalg.norm(b_obl)
    s = sample_pair(head, np.random.default_rng(0), cfg, augment=True, snr=None, b0_direction=b_obl)
    # same generator state, B0 along the last axis: same χ patch, another field
    s_z = sample_pair(head, np.random.default_rng(0), cfg, augment=True, snr=None, b0_direction=(0.0, 0.0, 1.0))
    assert s.field.shape == s.chi.shape == s.mask.shape == (32, 32, 32)
    assert s.voxel_size == vs and np.allclose(s.b0_direction, b_obl)
    assert np.array_equal(s.chi, s_z.chi) and np.array_equal(s.mask, s_z.mask)
    m = s.mask > 0.5
    assert m.mean() > 0.1 and np.all(s.chi[~m] == 0) and np.all(s.field[~m] == 0)
    pshape = tuple(2 * n for n in s.chi.shape)       # 64: 2x padding, also the library's fast size
    D, D_z = _np_dipole(pshape, vs, b_obl), _np_dipole(pshape, vs, (0.0, 0.0, 1.0))
    ref = _np_conv(s.chi.astype(np.float64), D, pshape) * m
    ref_z = _np_conv(s.chi.astype(np.float64), D_z, pshape) * m
    assert np.linalg.norm(ref[m]) > 1e-3                # the patch has a real field
    assert _rel_demeaned(s.field, ref, m) < 1e-3
    assert _rel_demeaned(s_z.field, ref_z, m) < 1e-3
    # the B0 direction matters: the two fields differ by far more than the tolerance above
    assert _rel_demeaned(s.field, ref_z, m) > 0.05 and _rel_demeaned(s_z.field, ref, m) > 0.05

    x, y = to_tensors([s], NetConfig())
    assert x.shape == (1, 2, 32, 32, 32) and y.shape == (1, 1, 32, 32, 32)
    # the physics channel: TKD of the patch's own field (|D| ≤ δ → sign(D)/δ, sign(0) = 0) with its
    # own voxel size and B0, times chi_scale
    delta = 0.1
    ncfg = NetConfig(tkd_delta=delta)
    x3, _ = to_tensors([s], ncfg)
    x3_z, _ = to_tensors([s_z], ncfg)
    assert x3.shape == (1, 3, 32, 32, 32) and torch.equal(x3[:, :2], x)

    def np_tkd(field, Dk):
        inv = np.where(np.abs(Dk) > delta, 1.0 / np.where(Dk == 0, 1.0, Dk), np.sign(Dk) / delta)
        return _np_conv(field.astype(np.float64) * m, inv, pshape) * m

    tkd, tkd_z = np_tkd(s.field, D), np_tkd(s_z.field, D_z)
    got, got_z = x3[0, 2].numpy() / ncfg.chi_scale, x3_z[0, 2].numpy() / ncfg.chi_scale
    assert _rel_demeaned(got, tkd, m) < 1e-3
    assert _rel_demeaned(got_z, tkd_z, m) < 1e-3
    assert _rel_demeaned(got, got_z, m) > 0.05
    # and the channel is an estimate of χ (TKD at δ = 0.1 on a noise-free field)
    assert _rel_demeaned(got, s.chi, m) < 0.6


def test_training_smoke_lowers_loss(tmp_path):
    head = _toy_head()
    cfg = SynthConfig(patch=(32, 32, 32), min_mask_fraction=0.1, p_elastic=0.0, max_lesions=0, p_contrast=0.0)
    samples = [sample_pair(head, np.random.default_rng(i), cfg, snr=None) for i in range(2)]
    x, y = to_tensors(samples, NetConfig())
    m = tiny(nd=2, w=4)
    opt = torch.optim.Adam(m.parameters(), 3e-3)

    def step_fn(step):
        pred = m(x, domain=0) * x[:, 1:2]
        loss = loss_supervised(pred, y)
        return loss, {"L_S": float(loss.detach())}

    tc = TrainConfig(steps=25, lr=3e-3, log_every=100, ckpt_every=10, ckpt_minutes=0)
    hist = Trainer(m, opt, step_fn, tc, out_dir=tmp_path).run()
    first = np.mean([h["L_S"] for h in hist[:3]])
    last = np.mean([h["L_S"] for h in hist[-3:]])
    assert last < 0.7 * first
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "losses.csv").exists()
    # resume: a second trainer continues at step 25 and goes on to 30
    tc2 = TrainConfig(steps=30, lr=3e-3, log_every=100, ckpt_every=10, ckpt_minutes=0)
    m2 = tiny(nd=2, w=4)
    tr2 = Trainer(m2, torch.optim.Adam(m2.parameters(), 3e-3), step_fn, tc2, out_dir=tmp_path)
    tr2.run()
    assert tr2.step == 30 and len(tr2.history) == 30


def test_dsbn_method_registered():
    from napari_qsm.methods import get_method

    meth = get_method("dsbn")
    assert meth.accepts_weights and meth.long_running and meth.label == "QSMInvNet+ (DSBN)"


def test_method_runs_with_given_weights(tmp_path):
    from napari_qsm.methods import reconstruct
    from napari_qsm.core.scan import Scan

    m = tiny()
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    chi, mask = blob_volume((24, 28, 20))
    scan = Scan(field=forward_field(chi, (1, 1, 1), device="cpu") * mask, mask=mask)
    res = reconstruct(scan, "dsbn", {"domain": "0"}, device="cpu", weights=str(p))
    assert res.chi.shape == scan.shape and res.extras["domain"] == 0
    assert res.extras["weights_sha256"]


def test_method_data_consistency_follows_the_field(tmp_path):
    """consistency=0 is the raw network; the default pulls χ toward the field (lower misfit in the mask)."""
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    m = tiny()
    p = tmp_path / "w.pt"
    torch.save(m.state_dict(), p)
    chi, mask = blob_volume((24, 28, 20))
    field = forward_field(chi, (1, 1, 1), device="cpu") * mask
    scan = Scan(field=field, mask=mask)
    raw = reconstruct(scan, "dsbn", {"domain": "0", "consistency": 0, "reference": "none"}, device="cpu",
                      weights=str(p))
    plain, _ = predict(load_model(p), field, mask, domain=0, device="cpu")
    np.testing.assert_allclose(raw.chi, plain, atol=1e-6)
    dc = reconstruct(scan, "dsbn", {"domain": "0", "reference": "none"}, device="cpu", weights=str(p))
    assert dc.extras["consistency"]["iterations"] > 0

    def misfit(x):
        return float(np.linalg.norm((forward_field(x, (1, 1, 1), device="cpu") - field)[mask > 0]))

    assert misfit(dc.chi) < 0.5 * misfit(raw.chi)
    assert np.linalg.norm(dc.chi - chi) < np.linalg.norm(raw.chi - chi)


@pytest.mark.skipif(not default_weights_path().exists(), reason="no shipped weights")
def test_shipped_weights_load_and_card():
    m = load_model()
    card = json.loads(default_weights_path().with_suffix(".json").read_text())
    assert card["sha256"] == m.weights_sha256
    assert default_weights_path().stat().st_size < 50 * 2 ** 20
    assert card["architecture"]["base_width"] == m.config.base_width


@pytest.mark.slow
@pytest.mark.skipif(not default_weights_path().exists(), reason="no shipped weights")
def test_shipped_weights_beat_tkd_on_small_phantom():
    """Unseen seed, 1 mm, head scaled down to fit 96x112x96, oblique B0, noise: the shipped network beats
    TKD's per-metric oracle (best δ for each metric separately) on NRMSE, demeaned NRMSE and HFEN.
    (SSIM is not asserted on this shrunken head, which is smaller than any training anatomy: 0.929 vs
    0.936 at δ = 0.2; it is on the full-size clinical case below and in src_models/validation.md.)"""
    from napari_qsm.core.metrics import compute_metrics
    from napari_qsm.core.sim.phantom import make_phantom, oblique_direction
    from napari_qsm.core.inversion.tkd import truncated_inversion

    ph = make_phantom((96, 112, 96), (1.0, 1.0, 1.0), oblique_direction(10, "x"), seed=7, snr=100.0, device="cpu")
    chi_nn, _ = predict(load_model(), ph.field, ph.mask, device="cpu", voxel_size=ph.voxel_size,
                        b0_direction=ph.b0_direction)
    nn = compute_metrics(chi_nn, ph.chi, ph.mask, device="cpu")
    tkd = [compute_metrics(truncated_inversion(ph.field, ph.mask, ph.voxel_size, ph.b0_direction, threshold=t,
                                               device=torch.device("cpu"))[0], ph.chi, ph.mask, device="cpu")
           for t in (0.05, 0.08, 0.1, 0.15, 0.2, 0.3)]
    for k in ("nrmse", "nrmse_demeaned", "hfen"):
        assert nn[k] < min(m[k] for m in tkd), k


@pytest.mark.slow
@pytest.mark.skipif(not default_weights_path().exists(), reason="no shipped weights")
def test_shipped_weights_beat_tkd_oracle_on_clinical_validation_case():
    """A full-size unseen clinical head of the model card's validation (0.75x0.75x3 mm, 192x224x48, SNR 50,
    B0 15° oblique), simulated honestly (finer-grid field fitted from echoes): HFEN beats TKD's per-metric
    oracle over thresholds 0.05-0.4, and the network's χ scale (slope on the truth) is closer to 1 than TKD's
    at its best δ. On this honest case the network does NOT beat the oracle on NRMSE (52 vs 51 %, model card),
    which this test does not claim."""
    from src_models.validate_qsminvnet import CASES, best_tkd, make_case, metrics

    case = next(c for c in CASES if c["name"] == "clinical-0.75x0.75x3-a")
    ph = make_case(case)
    chi_nn, _ = predict(load_model(), ph.field, ph.mask, device="cpu", voxel_size=ph.voxel_size,
                        b0_direction=ph.b0_direction)
    nn = metrics(chi_nn, ph)
    _, best, oracle = best_tkd(ph)
    assert nn["hfen"] < oracle["hfen"], (nn, oracle)
    assert abs(1 - nn["slope"]) < abs(1 - best["slope"]), (nn, best)


def test_one_reference_phase_scale():
    """The 3 T / 20 ms phase scale is written once (core.constants): the training data, the adaptation's
    L_T and NDI take the same number."""
    from napari_qsm.core.constants import rad_per_ppm
    from napari_qsm.core.inversion import ndi
    from napari_qsm.nn.adaptation.patches import phase_scale
    ref = rad_per_ppm()
    assert ref == pytest.approx(16.0513, abs=1e-4)
    assert phase_per_ppm() == ndi.phase_per_ppm() == phase_scale(None) == ref
    assert ndi.phase_per_ppm(te=0.01, b0_tesla=7.0) == phase_per_ppm(7.0, 0.01) == rad_per_ppm(7.0, 0.01)
