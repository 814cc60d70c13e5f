"""The first-run demo's settings: valid, within its time budget, and --full keeps the defaults."""

from napari_qsm import demo
from napari_qsm.core.params import make_params


def test_quick_adaptation_settings_are_valid_parameters():
    from napari_qsm.nn.adapt import AdaptParams

    quick = make_params(AdaptParams, demo.QUICK_PARAMS["dsbn_adapt"])
    full = make_params(AdaptParams, {})
    assert quick.steps < full.steps
    # the short run adapts only the scan domain's BatchNorm (no synthetic batches: with the shared
    # weights frozen they would change nothing the scan's χ depends on)
    assert quick.update == "bn" and quick.synth_batch == 0


def test_expected_time_fits_the_first_run_budget():
    names = ["tkd", "tsvd", "medi", "cosmos", "dsbn", "dsbn_adapt"]
    quick = demo.expected_seconds(names)
    assert quick <= 180                                   # ≤ 3 minutes on a 2-core CPU
    assert demo.expected_seconds(names, full=True) > quick + 120


def test_short_run_table_names_the_adaptation(monkeypatch, tmp_path):
    """The quick demo's table and figure name the BatchNorm-only run; --full passes no overrides."""
    import napari_qsm.methods as methods
    from napari_qsm.core.sim.phantom import make_phantom

    monkeypatch.setattr(demo, "_phantom", lambda size, snr, seed=0: make_phantom(shape=(32, 36, 28),
                                                                                 voxel_size=(4.0, 4.0, 4.0),
                                                                                 seed=seed, snr=snr))
    seen = {}
    real = methods.reconstruct

    def fake(scan, name, params, **kw):
        if name != "dsbn_adapt":
            return real(scan, name, params, **kw)
        seen[len(seen)] = dict(params)
        return real(scan, "tkd", {}, device="cpu")   # stands in for the (slow) adaptation

    monkeypatch.setattr(methods, "reconstruct", fake)
    out = demo.run_demo(tmp_path / "quick", methods=["tkd", "dsbn_adapt"], quiet=True, device="cpu")
    assert seen[0] == demo.QUICK_PARAMS["dsbn_adapt"]
    names = [r["method"] for r in out["rows"]]
    assert names[1] == "QSMInvNet+ adapted (20 steps, BatchNorm only)"
    text = (tmp_path / "quick" / "metrics.md").read_text()
    assert "BatchNorm only" in text and "--full" in text
    demo.run_demo(tmp_path / "full", methods=["dsbn_adapt"], quiet=True, device="cpu", full=True)
    assert seen[1] == {}
    assert "BatchNorm only" not in (tmp_path / "full" / "metrics.md").read_text()
