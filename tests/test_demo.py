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
