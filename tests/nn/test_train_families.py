"""The families training script: a run resumes and ``--steps N`` continues it (tiny grids)."""

import json

import torch

from src_models import train_qsminvnet as tq


def test_families_run_resumes_and_continues(tmp_path, monkeypatch):
    cfg = {
        "name": "tiny_families", "selection": "none", "auto_export": False,
        "net": {"base_width": 2, "num_domains": 2, "tkd_delta": 0.1},
        "synth": {"patch": [32, 32, 32], "pool_size": 2, "refresh_every": 2, "seed_base": 300000,
                  "regimes": [{"shape": [36, 36, 36], "voxel_size": [1.0, 1.0, 1.0], "weight": 1.0}],
                  "families": {"texture": 1.0, "geometric": 0.0}, "p_inserts": 0.5, "max_lesions": 0},
        "train": {"steps": 2, "lr": 1e-3, "batch_size": 1, "log_every": 1, "ckpt_every": 1, "threads": 1,
                  "device": "cpu"},
    }
    path = tmp_path / "tiny_families.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setattr(tq, "COMMITTED", tmp_path / "none")
    run = tmp_path / "run"
    assert tq.main(["--config", str(path), "--out", str(run)]) == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and ck["optimizer"]["state"]          # Adam state saved
    w2 = {k: v.clone() for k, v in ck["model"].items()}
    assert tq.main(["--config", str(path), "--out", str(run), "--steps", "4"]) == 0
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    hist = json.loads(ck["history_json"])
    assert ck["step"] == 4 and [h["step"] for h in hist] == [1, 2, 3, 4]
    assert any(not torch.equal(w2[k], v) for k, v in ck["model"].items() if v.is_floating_point())
    assert "resumed from" in (run / "train.log").read_text()
    assert (run / "losses.csv").exists() and not (tmp_path / "weights").exists()
