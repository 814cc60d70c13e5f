import threading
import time

import pytest
import torch

from napari_qsm.core.device import available_devices, resolve_device
from napari_qsm.core.progress import CancelToken, Cancelled, Progress, Reporter, check_cancel, stderr_progress


def test_reporter_sends_records_and_honours_cancel():
    seen = []
    tok = CancelToken()
    rep = Reporter(seen.append, tok, total=10, stage="x")
    rep(1, "first", cost=2.0)
    assert seen[0].step == 1 and seen[0].total == 10 and seen[0].losses == {"cost": 2.0} and seen[0].fraction == 0.1
    tok.cancel()
    with pytest.raises(Cancelled):
        rep(2)
    assert len(seen) == 1


def test_check_cancel_accepts_event_and_callable():
    ev = threading.Event()
    check_cancel(ev)
    ev.set()
    with pytest.raises(Cancelled):
        check_cancel(ev)
    with pytest.raises(Cancelled):
        check_cancel(lambda: True)
    check_cancel(None)


def test_cancel_from_another_thread_is_seen():
    tok = CancelToken()
    threading.Timer(0.05, tok.cancel).start()
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        while True:
            check_cancel(tok)
            time.sleep(0.001)
    assert time.perf_counter() - t0 < 1.0


def test_stderr_progress(capsys):
    cb = stderr_progress(0.0)
    cb(Progress(step=3, total=3, message="done", losses={"r": 0.5}))
    assert "3/3 done r=0.5" in capsys.readouterr().err


def test_devices():
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    values = [v for v, _ in available_devices()]
    assert "cpu" in values and "auto" in values
    if not torch.cuda.is_available():
        assert not any(v.startswith("cuda") for v in values)
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu9")


def test_stderr_progress_prints_each_loss_once_and_no_nan(capsys):
    """An adaptation line spells TV as R=, lambda as λ= and the ETA: none of them printed twice."""
    from napari_qsm.core.progress import Progress, stderr_progress

    cb = stderr_progress(0.0)
    cb(Progress(step=3, total=20, message="step 3/20 L_T=0.0004 R=0.0247 λ=30 ETA 20s",
                losses={"L_S": float("nan"), "L_T": 4e-4, "TV": 0.0247, "lambda": 30.0, "eta_s": 19.7,
                        "extra": 1.5}, stage="adapt"))
    line = capsys.readouterr().err.strip()
    assert "TV=" not in line and "lambda=" not in line and "eta_s=" not in line and "nan" not in line
    assert line.count("L_T=") == 1 and "extra=1.5" in line
