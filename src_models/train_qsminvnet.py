"""Train (or resume) the shipped QSMInvNet+ checkpoint on synthetic data, on CPU or CUDA.

    python -m src_models.train_qsminvnet --config src_models/qsminvnet_plus.json

Writes into ``--out`` (default ``runs/<config name>``, not committed): ``checkpoint.pt``
(resumable; rerunning the same command continues from it), ``losses.csv``, ``losses.png``,
``train.log``. When the run directory is empty but ``src_models/checkpoints/<name>_train.pt``
(the committed training state) exists, training continues from that state (``--fresh`` starts
over); ``--save-state`` copies the current state there for committing. ``--export`` writes the shipped weights (``napari_qsm/nn/weights/<name>.pt`` + ``.json``)
from the current checkpoint; ``--steps N`` raises the step target (to continue a finished run).

Config keys besides ``net`` / ``synth`` / ``train``: ``init_weights`` (fine-tune from a shipped
state_dict or a training state), ``selection`` ("families": periodic validation on the SELECTION set
of :mod:`src_models.validate_families` only; "none": no validation; default: the old validation
patches of seeds 1-2), ``auto_export`` (false: never write ``napari_qsm/nn/weights/`` at the end),
``publish_logs`` (copy ``losses.csv`` / ``losses.png`` to ``src_models/<name>_losses.*`` at every
checkpoint, for committing).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_qsm.core.device import resolve_device
from napari_qsm.core.files import sha256_file as sha256
from napari_qsm.nn.losses import loss_supervised
from napari_qsm.nn.synth import PhantomPool, Regime, SynthConfig, make_head, sample_pair, to_tensors
from napari_qsm.nn.train import Trainer, TrainConfig, plot_losses, synthetic_step_fn
from napari_qsm.nn.unet import NetConfig, QSMInvNet, count_parameters, flops_per_voxel

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "napari_qsm" / "nn" / "weights"
COMMITTED = ROOT / "src_models" / "checkpoints"   # full training state (model + Adam + history) for resuming

# validation heads: seeds below 1000 are never used for training (training uses seed_base + k, seed_base ≥ 100000)
VAL_HEADS = [(1, Regime((160, 192, 160), (1.0, 1.0, 1.0))), (2, Regime((192, 224, 48), (0.75, 0.75, 3.0)))]


def load_config(path) -> dict:
    cfg = json.loads(Path(path).read_text())
    cfg.setdefault("name", Path(path).stem)
    return cfg


def build(cfg: dict):
    net = NetConfig.from_dict(cfg.get("net", {}))
    synth = SynthConfig.from_dict(cfg.get("synth", {}))
    train = TrainConfig.from_dict(cfg.get("train", {}))
    return net, synth, train


def make_val_patches(synth: SynthConfig, n_per_head: int = 3):
    """Fixed validation patches from unseen heads (no augmentation, snr 100, B0 tilted 15°)."""
    out = []
    for seed, reg in VAL_HEADS:
        head = make_head(seed, reg)
        for j in range(n_per_head):
            rng = np.random.default_rng([seed, j, 99])
            th = np.deg2rad(15.0)
            b0 = np.array([np.sin(th), 0.0, np.cos(th)])
            out.append(sample_pair(head, rng, synth, augment=False, b0_direction=b0, snr=100.0))
    return out


def nrmse(pred, ref, mask):
    m = mask > 0.5
    p = pred[m] - pred[m].mean()
    r = ref[m] - ref[m].mean()
    return 100.0 * float(np.linalg.norm(p - r) / max(np.linalg.norm(r), 1e-12))


def make_val_fn(model, patches, net: NetConfig, device):
    x, y = to_tensors(patches, net, device)

    def fn(step):
        vals = []
        losses = []
        for i in range(x.shape[0]):
            pred = model(x[i:i + 1], domain=0) * x[i:i + 1, 1:2]
            losses.append(float(loss_supervised(pred, y[i:i + 1])))
            vals.append(nrmse(pred[0, 0].cpu().numpy(), y[i, 0].cpu().numpy(), x[i, 1].cpu().numpy()))
        return {"val_L_S": float(np.mean(losses)), "val_nrmse": float(np.mean(vals))}

    return fn


def make_selection_val_fn(model, device, log=print):
    """(val_fn, TKD reference) on the SELECTION set of :mod:`src_models.validate_families` (the only set a
    checkpoint choice may look at): demeaned NRMSE of the network per resolution ("sel_nrmse_1mm",
    "sel_nrmse_slab") and overall ("val_nrmse"); the reference is TKD at its best δ per case."""
    from napari_qsm.core.metrics import nrmse_demeaned
    from napari_qsm.nn.infer import predict
    from src_models.validate_families import _Case, best_tkd, cases, make_case

    sel = [(c, _Case(make_case(c))) for c in cases("selection")]
    tkd = {}
    for c, ph in sel:
        tkd.setdefault(c["res"], []).append(best_tkd(ph)[1]["nrmse_demeaned"])
    ref = {f"TKD best δ {k}": float(np.mean(v)) for k, v in tkd.items()}
    log(f"selection set: {len(sel)} cases; " + ", ".join(f"{k} {v:.1f}%" for k, v in ref.items()))

    def fn(step):
        per = {}
        for c, ph in sel:
            chi, _ = predict(model, ph.field, ph.mask, domain=0, device=device, voxel_size=ph.voxel_size,
                             b0_direction=ph.b0_direction)
            per.setdefault(c["res"], []).append(nrmse_demeaned(chi, ph.chi, ph.mask))
        out = {f"sel_nrmse_{k}": float(np.mean(v)) for k, v in per.items()}
        out["val_nrmse"] = float(np.mean([x for v in per.values() for x in v]))
        return out

    return fn, ref


def tkd_val(patches, threshold=0.15):
    from napari_qsm.core.inversion.tkd import truncated_inversion

    vals = []
    for s in patches:
        chi, _ = truncated_inversion(s.field, s.mask > 0.5, s.voxel_size, s.b0_direction, threshold=threshold,
                                     device=torch.device("cpu"))
        vals.append(nrmse(chi, s.chi, s.mask))
    return float(np.mean(vals))


def init_state(init) -> tuple[Path, dict]:
    """(path, state_dict) of ``init_weights``: a shipped state_dict or a training checkpoint's "model"
    (a relative path is taken from the repository root)."""
    ip = Path(init) if Path(init).is_absolute() else ROOT / init
    sd = torch.load(ip, map_location="cpu", weights_only=True)
    return ip, sd.get("model", sd)


def export(cfg: dict, run_dir: Path, out_dir: Path = WEIGHTS, extra_card: dict | None = None) -> Path:
    """Write the shipped state_dict (domain-1 BN = copy of domain 0, untrained flag) and its JSON card."""
    from napari_qsm.nn.infer import write_card

    net, synth, train = build(cfg)
    ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = QSMInvNet(net)
    model.load_state_dict(ck["model"])
    alpha = cfg.get("export_average_with_init")
    if alpha is not None and cfg.get("init_weights"):
        # weight-space average of the fine-tuned and the initial weights (robust fine-tuning, WiSE-FT style):
        # θ = (1 − α)·θ_init + α·θ_trained for every floating tensor (BN running stats included), α in config
        _, sd0 = init_state(cfg["init_weights"])
        sd1 = model.state_dict()
        a = float(alpha)
        model.load_state_dict({k: ((1.0 - a) * sd0[k].double() + a * v.double()).to(v.dtype)
                               if v.is_floating_point() else v for k, v in sd1.items()})
    if net.num_domains > 1:
        for d in range(1, net.num_domains):
            model.copy_domain(0, d)
    model.domain_trained.zero_()
    model.domain_trained[0] = 1
    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / f"{cfg.get('export_name', cfg['name'])}.pt"
    from napari_qsm.nn.train import atomic_torch_save
    atomic_torch_save(model.state_dict(), pt)
    hist = json.loads(ck.get("history_json", "[]"))
    meta = json.loads(ck.get("meta_json", "{}"))
    vals = [h for h in hist if "val_nrmse" in h]
    card = {
        "name": cfg["name"],
        "model": "QSMInvNet+ (DSBN 3-D U-Net)" if net.num_domains > 1 else "QSMInvNet (3-D U-Net)",
        "architecture": net.to_dict(),
        "parameters": count_parameters(model),
        "flops_per_voxel": flops_per_voxel(net),
        "normalisation": {
            "input": "channel 0 = field_ppm * mask * field_scale, channel 1 = mask (0/1)"
                     + (f", channel 2 = TKD(field; delta={net.tkd_delta}, scan voxel size and B0) * mask * chi_scale; "
                        f"output = correction added to channel 2" if net.has_tkd else ""),
            "output": "chi_ppm = output / chi_scale, multiplied by the mask",
            "field_scale": net.field_scale, "chi_scale": net.chi_scale,
            "spatial_multiple": net.multiple,
        },
        "domains": {"0": "synthetic (trained)", "1": "target scan (copy of domain 0 until adapted)"},
        "domain_trained": model.domain_trained.tolist(),
        "training": {
            "data_recipe": synth.to_dict(),
            "train_config": train.to_dict(),
            "steps": int(ck["step"]),
            "patches_seen": int(ck["step"]) * train.batch_size,
            "wall_seconds": round(float(ck.get("seconds", 0.0)), 1),
            "hardware": meta.get("hardware", {}),
            "loss": "L_S (mean squared error in scaled chi units, masked)",
            "final_train_L_S_mean_last100": float(np.mean([h["L_S"] for h in hist[-100:]])) if hist else None,
            "val_patches_nrmse_percent": vals[-1]["val_nrmse"] if vals else None,
            "val_patches_tkd_nrmse_percent": meta.get("val_tkd_nrmse"),
            "command": f"python -m src_models.train_qsminvnet --config src_models/{cfg['name']}.json",
            "init_weights": cfg.get("init_weights"),
            "export_average_with_init": cfg.get("export_average_with_init"),
        },
        "file": pt.name,
        "size_bytes": pt.stat().st_size,
        "sha256": sha256(pt),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra_card:
        card.update(extra_card)
    old = out_dir / f"{cfg.get('export_name', cfg['name'])}.json"
    if old.exists():  # keep validation results written by validate_qsminvnet when the weights are unchanged
        prev = json.loads(old.read_text())
        if prev.get("sha256") == card["sha256"] and "validation" in prev:
            card["validation"] = prev["validation"]
    write_card(out_dir / f"{cfg.get('export_name', cfg['name'])}.json", card)
    return pt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "src_models" / "qsminvnet_plus.json"))
    ap.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    ap.add_argument("--steps", type=int, default=None, help="override the step target (continue training)")
    ap.add_argument("--max-minutes", type=float, default=None, help="wall-time budget of this session")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--export", action="store_true", help="only export the shipped weights from the checkpoint")
    ap.add_argument("--fresh", action="store_true",
                    help="ignore the committed training state (src_models/checkpoints/) when the run directory is empty")
    ap.add_argument("--save-state", action="store_true",
                    help="copy the run's checkpoint.pt to src_models/checkpoints/<name>_train.pt (for committing)")
    ap.add_argument("--no-export", action="store_true", help="do not export at the end of training")
    ap.add_argument("--weights-dir", default=str(WEIGHTS), help="where --export writes the shipped weights")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    run_dir = Path(args.out) if args.out else ROOT / "runs" / cfg["name"]
    if args.export or args.save_state:
        if args.export:
            print(export(cfg, run_dir, Path(args.weights_dir)))
        if args.save_state:
            COMMITTED.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / "checkpoint.pt", COMMITTED / f"{cfg['name']}_train.pt")
            print(COMMITTED / f"{cfg['name']}_train.pt")
        return 0
    net, synth, train = build(cfg)
    if args.steps is not None:
        train.steps = args.steps
    if args.max_minutes is not None:
        train.max_seconds = 60.0 * args.max_minutes
    if args.device is not None:
        train.device = args.device
    if args.threads is not None:
        train.threads = args.threads
    if train.threads:
        torch.set_num_threads(train.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    logf = open(run_dir / "train.log", "a")
    committed = COMMITTED / f"{cfg['name']}_train.pt"
    if not (run_dir / "checkpoint.pt").exists() and committed.exists() and not args.fresh:
        shutil.copyfile(committed, run_dir / "checkpoint.pt")
        print(f"starting from the committed training state {committed} (use --fresh to start over)", flush=True)

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    dev = resolve_device(train.device)
    torch.manual_seed(train.seed)
    model = QSMInvNet(net).to(dev)
    init = cfg.get("init_weights")
    if init and not (run_dir / "checkpoint.pt").exists():
        # fine-tuning: start from another model's weights (a shipped state_dict or a training checkpoint's
        # "model"), step 0 and a fresh optimiser; a resumed run ignores this (its checkpoint has the weights)
        ip, sd = init_state(init)
        model.load_state_dict(sd)
        model.to(dev)
        print(f"initialised from {ip} (sha256 {sha256(ip)[:12]})", flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=train.lr)
    log(f"config {args.config}: {count_parameters(model)} parameters, "
        f"{flops_per_voxel(net)['forward'] / 1e3:.1f} kFLOP/voxel forward, device {dev}, threads {torch.get_num_threads()}")
    if cfg.get("selection") == "families":
        val_fn, refs = make_selection_val_fn(model, dev, log)
        tkd_nrmse = float(np.mean(list(refs.values())))
    elif cfg.get("selection") == "none":   # no periodic validation (smoke runs, tests)
        val_fn, refs, tkd_nrmse = None, {}, float("nan")
    else:
        val_patches = make_val_patches(synth)
        tkd_nrmse = tkd_val(val_patches)
        log(f"validation patches: {len(val_patches)}, TKD(0.15) NRMSE {tkd_nrmse:.1f}%")
        val_fn, refs = make_val_fn(model, val_patches, net, dev), {}
    pool = PhantomPool(synth, log=log)
    meta = {"config": cfg, "val_tkd_nrmse": tkd_nrmse,
            "hardware": {"device": str(dev), "cpu": platform.processor() or platform.machine(),
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "python": sys.version.split()[0],
                         "cuda": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}}
    step_fn = synthetic_step_fn(model, pool, synth, net, train.batch_size, train.seed, dev, domain=0)

    def step_with_mark(step):
        model.domain_trained[0] = 1
        return step_fn(step)

    trainer = Trainer(model, opt, step_with_mark, train, out_dir=run_dir,
                      val_fn=val_fn, meta=meta, log=log,
                      title=f"{cfg['name']} (TKD val NRMSE {tkd_nrmse:.0f}%)")
    trainer.plot_refs = refs
    if cfg.get("publish_logs"):
        # keep the committed copies (src_models/<name>_losses.csv/.png) current at every checkpoint
        save = trainer.save

        def save_and_publish(path=None):
            out = save(path)
            for ext in ("csv", "png"):
                src = run_dir / f"losses.{ext}"
                if src.exists():
                    shutil.copyfile(src, ROOT / "src_models" / f"{cfg['name']}_losses.{ext}")
            return out

        trainer.save = save_and_publish
    t0 = time.time()
    trainer.run()
    log(f"session done: step {trainer.step}, {time.time() - t0:.0f} s this session, {trainer.seconds:.0f} s total")
    plot_losses(trainer.history, run_dir / "losses.png", trainer.title, refs)
    if not args.no_export and cfg.get("auto_export", True):
        log(f"exported {export(cfg, run_dir, Path(args.weights_dir))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
