"""Training loop shared by the shipped-model training (src_models/) and on-scan adaptation.

:class:`Trainer` owns the model, the optimiser and the bookkeeping; what a step *does* is a
``step_fn(step) -> (loss_tensor, {name: float})`` supplied by the caller, so supervised training
on synthetic data (:func:`synthetic_step_fn`, L_S on domain 0) and adaptation (L_S on domain 0
+ λ(t)·L_T on domain 1) share the same loop:

* deterministic: seeds set once from ``seed``; data of step t is a function of (seed, t), so a
  resumed run continues with the same stream;
* resumable: ``checkpoint.pt`` (model, optimiser, step, history, torch RNG; loads with
  ``torch.load(weights_only=True)``) written atomically every ``ckpt_every`` steps or
  ``ckpt_minutes`` minutes, on cancel (state of the last completed step) and at the end;
* progress and cancel through :class:`napari_qsm.core.progress.Reporter` (checked every step);
* ``max_seconds`` stops cleanly (with a checkpoint) when a wall-time budget is used up;
* logs: ``losses.csv`` (one row per step) and ``losses.png`` (plot), both rewritten at checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..core.files import atomic_write
from ..core.progress import Cancelled, Reporter


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-4
    lr_final: float = -1.0       # <0: constant lr; else cosine decay from lr to lr_final over `steps`
    warmup_steps: int = 0        # linear lr warm-up
    batch_size: int = 1
    seed: int = 0
    grad_clip: float = 0.0       # 0 = off (max grad norm otherwise)
    log_every: int = 10
    ckpt_every: int = 100
    ckpt_minutes: float = 5.0
    val_every: int = 0           # 0 = no periodic validation
    max_seconds: float = 0.0     # 0 = no wall-time budget
    threads: int = 0             # torch.set_num_threads (0 = leave as is)
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"train config: unknown keys {sorted(unknown)}")
        return cls(**d)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def atomic_torch_save(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def lr_at(cfg: TrainConfig, step: int) -> float:
    lr = cfg.lr
    if cfg.lr_final >= 0 and cfg.steps > 0:
        u = min(1.0, step / cfg.steps)
        lr = cfg.lr_final + (cfg.lr - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * u))
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


def plot_losses(history: list[dict], path, title: str = "training", refs: Optional[dict] = None) -> None:
    """Loss curves: left, training losses (raw + running mean, log y) and validation losses;
    right, validation error metrics (names containing "nrmse"/"hfen"), with optional horizontal
    reference lines ``refs`` ({label: value}, e.g. TKD's NRMSE). Timing and lr columns are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    skip = ("step", "lr", "lambda")
    keys = []
    for h in history:
        for k, v in h.items():
            if k not in keys and k not in skip and not k.endswith("seconds") and isinstance(v, (int, float)):
                keys.append(k)
    if "loss" in keys and any(k.startswith("L_") for k in keys) and \
            all(h.get("loss") == h.get(next(k for k in keys if k.startswith("L_"))) for h in history[:20]):
        keys.remove("loss")  # identical to the only loss term
    metric_keys = [k for k in keys if "nrmse" in k or "hfen" in k]
    loss_keys = [k for k in keys if k not in metric_keys]
    fig, axes = plt.subplots(1, 2 if metric_keys else 1, figsize=(11 if metric_keys else 7, 4), squeeze=False)
    ax = axes[0, 0]

    def series(k):
        pts = [(h["step"], h[k]) for h in history if isinstance(h.get(k), (int, float)) and np.isfinite(h[k])]
        return np.array(pts).T if pts else (np.array([]), np.array([]))

    for k in loss_keys:
        s, v = series(k)
        if not s.size:
            continue
        if k.startswith("val"):
            ax.plot(s, v, "o-", label=k, ms=3)
        else:
            line = ax.plot(s, v, alpha=0.2, lw=0.6)[0]
            n = max(1, min(50, len(v) // 10))
            sm = np.convolve(v, np.ones(n) / n, mode="valid")
            ax.plot(s[n - 1:], sm, color=line.get_color(), label=f"{k} (running mean of {n})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if metric_keys:
        ax2 = axes[0, 1]
        for k in metric_keys:
            s, v = series(k)
            if s.size:
                ax2.plot(s, v, "o-", ms=3, label=k)
        for lab, val in (refs or {}).items():
            ax2.axhline(val, ls="--", color="k", lw=1)
            ax2.text(0.01, val, f" {lab}", va="bottom", fontsize=8, transform=ax2.get_yaxis_transform())
        ax2.set_xlabel("step")
        ax2.set_ylabel("%")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def read_csv_history(path) -> list[dict]:
    """``losses.csv`` back into a history (numbers as floats, empty cells dropped)."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        h = {}
        for k, v in r.items():
            if v not in ("", None):
                try:
                    h[k] = float(v)
                except ValueError:
                    pass
        if "step" in h:
            h["step"] = int(h["step"])
            out.append(h)
    return out


class Trainer:
    """Generic resumable training loop (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 step_fn: Callable[[int], tuple], config: TrainConfig, out_dir=None,
                 val_fn: Optional[Callable[[int], dict]] = None, meta: Optional[dict] = None,
                 log: Optional[Callable[[str], None]] = None, title: str = "training",
                 checkpoint_name: str = "checkpoint.pt"):
        self.model = model
        self.opt = optimizer
        self.step_fn = step_fn
        self.cfg = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.val_fn = val_fn
        self.meta = dict(meta or {})
        self.log = log or (lambda s: None)
        self.title = title
        self.checkpoint_name = checkpoint_name
        self.plot_refs: dict = {}
        self.step = 0
        self.history: list[dict] = []
        self.seconds = 0.0          # training wall time accumulated over all sessions
        self._last_ckpt_time = time.time()

    # -- persistence -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.out_dir is None else self.out_dir / self.checkpoint_name

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                "seconds": self.seconds, "history_json": json.dumps(self.history),
                "train_config_json": json.dumps(self.cfg.to_dict()), "meta_json": json.dumps(self.meta, default=str),
                "torch_rng": torch.get_rng_state()}

    def save(self, path=None) -> Optional[Path]:
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            return None
        atomic_torch_save(self.state(), path)
        self._last_ckpt_time = time.time()
        if self.out_dir is not None:
            self.write_csv()
            try:
                plot_losses(self.history, self.out_dir / "losses.png", self.title, self.plot_refs)
            except Exception as exc:  # a plot must never kill training
                self.log(f"plot failed: {exc!r}")
        return path

    def load(self, path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step = int(ck["step"])
        self.seconds = float(ck.get("seconds", 0.0))
        self.history = json.loads(ck.get("history_json", "[]"))
        if "torch_rng" in ck:
            torch.set_rng_state(ck["torch_rng"])
        self.log(f"resumed from {path} at step {self.step} ({self.seconds / 60:.1f} min trained)")

    def maybe_resume(self) -> bool:
        p = self.checkpoint_path
        if p is not None and p.exists():
            self.load(p)
            return True
        return False

    def write_csv(self) -> None:
        """Rewrite ``losses.csv`` from the history (columns = union of all logged names)."""
        if self.out_dir is None or not self.history:
            return
        cols = []
        for h in self.history:
            for k in h:
                if k not in cols:
                    cols.append(k)
        path = self.out_dir / "losses.csv"

        def write(tmp):
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(cols)
                for h in self.history:
                    w.writerow([h.get(k, "") for k in cols])

        atomic_write(path, write)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, progress=None, cancel=None, resume: bool = True) -> list[dict]:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and self.maybe_resume()):
            seed_everything(cfg.seed)
        rep = Reporter(progress, cancel, total=cfg.steps, stage=self.title)
        t_session = time.time()
        seconds0 = self.seconds
        self.model.train()
        try:
            while self.step < cfg.steps:
                rep.check()
                if cfg.max_seconds and time.time() - t_session > cfg.max_seconds:
                    self.log(f"wall-time budget of {cfg.max_seconds:.0f} s used up at step {self.step}")
                    break
                t0 = time.time()
                lr = lr_at(cfg, self.step)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                self.opt.zero_grad(set_to_none=True)
                loss, logs = self.step_fn(self.step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss)} at step {self.step}; lower the learning rate")
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.opt.step()
                self.step += 1
                self.seconds = seconds0 + (time.time() - t_session)
                row = {"step": self.step, "loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()},
                       "lr": lr, "seconds": round(self.seconds, 2), "step_seconds": round(time.time() - t0, 3)}
                if self.val_fn is not None and cfg.val_every and self.step % cfg.val_every == 0:
                    self.model.eval()
                    with torch.no_grad():
                        row.update({k: float(v) for k, v in self.val_fn(self.step).items()})
                    self.model.train()
                self.history.append(row)
                if self.step % max(1, cfg.log_every) == 0 or self.step == cfg.steps:
                    msg = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("step",))
                    self.log(f"step {self.step}/{cfg.steps} {msg}")
                rep(self.step, f"step {self.step}/{cfg.steps}",
                    **{k: v for k, v in row.items() if k not in ("step", "seconds")})
                due = (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or \
                      (cfg.ckpt_minutes and time.time() - self._last_ckpt_time > 60 * cfg.ckpt_minutes)
                if due:
                    self.save()
        except Cancelled:
            self.save()
            raise
        except KeyboardInterrupt:
            self.save()
            raise
        self.save()
        return self.history


# ----------------------------------------------------------------------------------------------
# supervised training on synthetic pairs (domain 0)
# ----------------------------------------------------------------------------------------------

def synthetic_step_fn(model, pool, synth_cfg, net_cfg, batch_size: int, seed: int, device, domain: int = 0,
                      cancel_check=None):
    """step_fn for L_S on synthetic pairs of the pool (domain ``domain``); pool synced per step."""
    from .losses import loss_supervised
    from .synth import draw_batch, to_tensors

    def fn(step: int):
        pool.sync(step, cancel_check)
        t0 = time.time()
        batch = draw_batch(pool, step, batch_size, synth_cfg, seed=seed)
        x, y = to_tensors(batch, net_cfg, device)
        t_data = time.time() - t0
        mask = x[:, 1:2]
        pred = model(x, domain=domain) * mask
        loss = loss_supervised(pred, y)
        return loss, {"L_S": float(loss.detach()), "data_seconds": t_data}

    return fn
