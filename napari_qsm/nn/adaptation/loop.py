"""The adaptation run: model and optimiser set-up, synthetic pool, training steps, logging, final χ.

:func:`napari_qsm.nn.adapt.adapt` calls these in order on one :class:`Run`, the state they share.
Data of step t is a function of (seed, t) and the initial weights (docs/adaptation.md).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ...core.device import device_label
from ...core.progress import Cancelled, Reporter, check_cancel
from ..infer import DSBNParams, WeightsError, default_weights_path, network_consistency, predict
from ..losses import DipoleOperator, LambdaSchedule, loss_edge_tv, loss_field, loss_supervised
from .clock import AdaptClock
from .model import (_CancelHooks, _buffers, _load_base, _restore_buffers, _scan_name, _single_domain,
                    _train_mode, _uqsm_model, load_adapted)
from .patches import _check_scan, _ProtocolPatches, _synth_regime
from .records import AdaptParams, AdaptResult

_NAN = float("nan")
_STAGE = {"dsbn": "adapt", "finetune": "finetune", "uqsm": "uqsm"}


class Run:
    """State of one adaptation run (set by :func:`start`, :func:`prepare` and :func:`synthetic_pool`)."""

    def __init__(self, scans, fps, p: AdaptParams, dev, progress, cancel, resume):
        self.scans, self.fps, self.p, self.dev, self.cancel, self.resume = scans, fps, p, dev, cancel, resume
        self.progress = progress
        self.t_start = time.perf_counter()
        self.multi = len(scans) > 1
        self.history: list = []
        self.ref_mean = self.ref_means = None
        self.step0, self.opt_state, self.seconds0, self.arch_of = 0, None, 0.0, None
        self.pool = self.scfg = None
        self.use_synth = False


def start(run: Run, weights) -> None:
    """The model to adapt: resumed from an adapted checkpoint, or the base (a one-domain copy for
    ``finetune``, a fresh network of the base's architecture for ``uqsm``)."""
    p, resume = run.p, run.resume
    if resume is not None:
        model, meta = load_adapted(resume)
        if meta.get("params", {}).get("mode", p.mode) != p.mode:
            raise ValueError(f"resume: {resume} was adapted in mode {meta['params']['mode']!r}, not {p.mode!r}")
        was = meta.get("scan_fingerprints") or ([meta["scan_fingerprint"]] if meta.get("scan_fingerprint") else None)
        if was and list(was) != run.fps:
            raise ValueError(f"resume: {resume} was adapted to another scan or scan set (fingerprints {', '.join(was)} ≠ "
                             f"{', '.join(run.fps)})")
        run.base_path, run.base_sha = meta.get("base_weights"), meta.get("base_sha256")
        run.history = list(meta.get("history", []))
        run.step0 = int(meta["step"])
        run.opt_state = meta.get("optimizer")
        run.seconds0 = float(meta.get("seconds", 0.0))
        run.ref_mean = meta.get("ref_mean")
        if p.mode == "uqsm":
            _train_mode(model, p)
    else:
        base_path = str(Path(weights) if weights is not None else default_weights_path())
        if p.mode == "uqsm":
            model = _uqsm_model(weights, base_path, p)
            run.arch_of, base_path, base_sha = base_path, None, None
        else:
            model = _load_base(weights, base_path)
            base_sha = model.weights_sha256
        if p.mode == "dsbn":
            if model.num_domains < 2:
                raise WeightsError(f"weights: {base_path} is a plain QSMInvNet (one BN domain); dsbn adaptation "
                                   f"needs a QSMInvNet+ checkpoint with 2 domains (or use mode=finetune)")
            if not int(model.domain_trained[1]):
                model.copy_domain(0, 1)   # the scan's BN starts from the synthetic one
        elif p.mode == "finetune":
            model = _single_domain(model)
        run.base_path, run.base_sha = base_path, base_sha
    if p.mode == "dsbn" and model.num_domains < 2:
        raise WeightsError("weights: dsbn adaptation needs a checkpoint with 2 BN domains")
    if p.mode in ("finetune", "uqsm") and model.num_domains != 1:
        raise WeightsError(f"resume: a {p.mode} checkpoint must have one BN domain")
    run.model = model


def prepare(run: Run) -> None:
    """Scan patches (checked), the model on its device in training mode, optimiser, λ schedule, reporter."""
    p, model = run.p, run.model
    run.dom_t = 1 if p.mode == "dsbn" else 0
    run.cs = float(model.io_scale[1])
    run.patches = _ProtocolPatches(run.scans, p, model.config, model.config.multiple, device=run.dev)
    for k, (sc, part) in enumerate(zip(run.scans, run.patches.parts)):
        try:
            _check_scan(sc, p, part.pshape)
        except ValueError as exc:
            raise ValueError(f"{_scan_name(run.scans, k)}{exc}") from None
    run.model = model = model.to(run.dev)
    _train_mode(model, p)
    run.trainable = list(model.bn_parameters(run.dom_t)) if p.update == "bn" else list(model.parameters())
    run.opt = torch.optim.Adam(run.trainable, lr=p.lr)
    if run.opt_state:
        try:
            run.opt.load_state_dict(run.opt_state)
            for g in run.opt.param_groups:
                g["lr"] = p.lr
        except Exception as exc:
            raise WeightsError(f"resume: optimiser state of {run.resume} does not fit the model ({exc})") from None
    run.sched = LambdaSchedule(lam_max=p.lam_end, lam_min=p.lam_start, ramp=max(p.steps - 1, 1), kind="linear")
    run.op = DipoleOperator()
    run.geoms = [{"voxel_size": part.vs, "b0_direction": part.b0} for part in run.patches.parts]
    run.rep = Reporter(run.progress, run.cancel, total=p.steps, stage=_STAGE[p.mode])
    mult = model.config.multiple
    run.clock = AdaptClock(p.steps, p.preview_every,
                           [math.prod(-(-n // mult) * mult for n in sc.shape) for sc in run.scans])


def synthetic_pool(run: Run, synth_regime) -> None:
    """dsbn: the procedural heads of the synthetic batches, at the (first) scan's voxel-size regime."""
    from ..synth import PhantomPool, Regime, SynthConfig

    p = run.p
    run.use_synth = p.mode == "dsbn" and p.synth_batch > 0
    if not (run.use_synth and run.step0 < p.steps):
        return
    vs = run.patches.parts[0].vs
    run.scfg = SynthConfig(patch=(p.synth_patch,) * 3, pool_size=p.synth_heads, refresh_every=0,
                           seed_base=200_000 + 1000 * (p.seed % 1000),
                           regimes=(_synth_regime(vs) if synth_regime is None else
                                    Regime(tuple(synth_regime[0]), tuple(synth_regime[1])),))
    run.pool = PhantomPool(run.scfg, device="cpu")
    run.rep(run.step0, f"generating {p.synth_heads} synthetic head(s)", L_S=_NAN, L_T=_NAN)
    run.pool.sync(0, cancel_check=lambda: check_cancel(run.cancel))


def reference_mean(run: Run) -> None:
    """``keep_mean``: the mean χ in the mask(s) of the unadapted network, kept at the end (each inference
    timed for the ETA); otherwise the inference of a patch-sized crop of each scan is timed."""
    p = run.p
    keep_mean = p.keep_mean and not (p.mode == "uqsm" and not run.model.config.has_tkd)
    if not keep_mean or run.ref_mean is not None:
        if run.step0 < p.steps:
            _time_crops(run)
        return
    run.rep(run.step0, "reference χ mean of the unadapted network", L_S=_NAN, L_T=_NAN)
    run.ref_means = []
    for k, (sc, g) in enumerate(zip(run.scans, run.geoms)):
        t0 = time.perf_counter()
        chi0, _ = predict(run.model, sc.field, sc.mask, domain=run.dom_t, device=run.dev, cancel=run.cancel, **g)
        run.clock.add_predict(k, time.perf_counter() - t0)
        run.ref_means.append(float(chi0[sc.mask].mean(dtype=np.float64)))
        del chi0
    run.ref_mean = float(np.mean(run.ref_means))
    _train_mode(run.model, p)
    if run.step0 < p.steps:
        _time_consistency(run)


def _time_consistency(run: Run) -> None:
    """The ETA's data-consistency time: one CG iteration on each scan, timed (the whole step costs
    ``3 + 2·iterations`` FFT pairs of the mask's box, :meth:`~.clock.AdaptClock.add_consistency_probe`)."""
    if run.p.consistency <= 0:
        return
    for k, sc in enumerate(run.scans):
        t0 = time.perf_counter()
        network_consistency(sc, np.zeros(sc.shape, np.float32), 1, run.p.consistency_mu, device=run.dev,
                            cancel=run.cancel)
        run.clock.add_consistency_probe(k, time.perf_counter() - t0, run.p.consistency)


def _consistency(run: Run, k: int, chi: np.ndarray) -> np.ndarray:
    """χ of scan ``k`` through the data consistency of ``consistency`` / ``consistency_mu`` (as the dsbn method
    does after the network); timed for the ETA."""
    if run.p.consistency <= 0:
        return chi
    t0 = time.perf_counter()
    chi, _ = network_consistency(run.scans[k], chi, run.p.consistency, run.p.consistency_mu, device=run.dev,
                                 cancel=run.cancel)
    run.clock.add_consistency(k, time.perf_counter() - t0)
    return chi


def _time_crops(run: Run) -> None:
    """The ETA's inference rate without a whole-volume inference: a centred crop of each scan of its
    patch shape, inferred and timed (the model's mode is restored)."""
    for k, (sc, g, part) in enumerate(zip(run.scans, run.geoms, run.patches.parts)):
        sl = tuple(slice((n - min(n, c)) // 2, (n - min(n, c)) // 2 + min(n, c)) for n, c in zip(sc.shape, part.pshape))
        t0 = time.perf_counter()
        predict(run.model, sc.field[sl], sc.mask[sl], domain=run.dom_t, device=run.dev, cancel=run.cancel, **g)
        mult = run.model.config.multiple
        run.clock.add_rate(k, time.perf_counter() - t0, math.prod(-(-(s.stop - s.start) // mult) * mult for s in sl))
    _train_mode(run.model, run.p)
    _time_consistency(run)


def _synth_batch(run: Run, step: int):
    from ..synth import sample_pair, to_tensors

    p, heads, out = run.p, run.pool.heads(), []
    for b in range(p.synth_batch):
        rng = np.random.default_rng([int(p.seed), int(step), b, 31])
        h = heads[int(rng.integers(len(heads)))]
        # protocol: the B0 direction of one of the scans (each in turn over the run)
        bb = run.patches.parts[0].b0 if not run.multi else run.patches.parts[(int(step) + b) % len(run.scans)].b0
        out.append(sample_pair(h, rng, run.scfg, augment=True, b0_direction=bb))
    return to_tensors(out, run.model.config, run.dev)


def _preview_chi(run: Run) -> np.ndarray:
    sc = run.scans[0]
    t0 = time.perf_counter()
    chi, _ = predict(run.model, sc.field, sc.mask, domain=run.dom_t, device=run.dev, cancel=run.cancel, **run.geoms[0])
    run.clock.add_predict(0, time.perf_counter() - t0)
    _train_mode(run.model, run.p)
    if run.ref_mean is not None:
        chi = np.where(sc.mask, chi + (run.ref_mean - float(chi[sc.mask].mean(dtype=np.float64))), 0.0)
    return _consistency(run, 0, chi.astype(np.float32))


def _scan_losses(run: Run, step: int, lam: float, beta_t: float) -> tuple[float, float, float]:
    """Backpropagate the scan term of step t (L_T, the prior); returns (L_T, R, scan loss), batch means."""
    p, model = run.p, run.model
    lt_val = tv_val = scan_val = 0.0
    has_tv = False
    nb = float(p.scan_batch)
    for si, n_k, tens in run.patches.groups(step, run.dev):
        part = run.patches.parts[si]
        x, f, mi, w, wg, mp, iw = tens
        share = n_k / nb           # a group's share of the batch mean (1 for one scan)
        chi_t = model(x, domain=run.dom_t) * x[:, 1:2] / run.cs
        if p.mode == "uqsm":
            lt = loss_field(chi_t, f, mi, part.vs, part.b0, weights=w, phase_per_ppm=part.ppp, op=run.op,
                            smv_radius_mm=p.smv_mm, normalise=False)
            tv = loss_edge_tv(chi_t, None, mp, part.vs) if p.uqsm_tv > 0 else None   # plain TV
            scan_loss = lt if tv is None else lt + p.uqsm_tv * tv
        else:
            lt = loss_field(chi_t, f, mi, part.vs, part.b0, weights=w, phase_per_ppm=part.ppp, op=run.op,
                            noise_std=iw, smv_radius_mm=p.smv_mm)
            tv = loss_edge_tv(chi_t, wg, mp, part.vs) if wg is not None else None
            scan_loss = lam * lt if tv is None else lam * lt + beta_t * tv
        (scan_loss * share if share != 1.0 else scan_loss).backward()
        lt_val += share * float(lt.detach())
        if tv is not None:
            has_tv = True
            tv_val += share * float(tv.detach())
        scan_val += share * float(scan_loss.detach())   # the value that was optimised, logged as is
        del x, f, mi, w, wg, mp, iw, chi_t, lt, tv, scan_loss, tens
    return lt_val, (tv_val if has_tv else _NAN), scan_val


def _step(run: Run, step: int) -> tuple[float, float, float, float, float]:
    """One optimiser step: L_S on a synthetic batch (dsbn), the scan term; returns (λ, L_S, L_T, R, scan loss)."""
    p, cancel = run.p, run.cancel
    lam = run.sched(step) if p.mode == "dsbn" else 1.0
    beta_t = p.tv * (lam / p.lam_end if p.tv_follow and p.lam_end > 0 else 1.0)
    run.opt.zero_grad(set_to_none=True)
    ls_val = _NAN
    if run.use_synth:
        xs, ys = _synth_batch(run, step)
        check_cancel(cancel)
        pred = run.model(xs, domain=0) * xs[:, 1:2]
        ls = loss_supervised(pred, ys)
        ls.backward()
        ls_val = float(ls.detach())
        del xs, ys, pred, ls
    check_cancel(cancel)
    lt_val, tv_val, scan_val = _scan_losses(run, step, lam, beta_t)
    check_cancel(cancel)
    if not (math.isfinite(lt_val) and (math.isfinite(ls_val) or not run.use_synth)):
        raise FloatingPointError(f"adapt: loss became {lt_val}/{ls_val} at step {step}; lower lr")
    if p.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.trainable, p.grad_clip)
    run.opt.step()
    return lam, ls_val, lt_val, tv_val, scan_val


def _log_step(run: Run, step: int, t0: float, lam, ls_val, lt_val, tv_val, scan_val) -> None:
    """History row, progress message (with the ETA of :class:`~.clock.AdaptClock`) and, every
    ``preview_every`` steps, a χ preview."""
    p = run.p
    now = time.perf_counter()
    run.clock.add_step(now - t0)
    run.history.append({"step": step, "L_S": ls_val, "L_T": lt_val, "lambda": lam, "TV": tv_val,
                        "loss": (ls_val if run.use_synth else 0.0) + scan_val,
                        "seconds": round(run.seconds0 + now - run.t_start, 3), "step_seconds": round(now - t0, 3)})
    preview = None
    if p.preview_every and (step % p.preview_every == 0 or step == p.steps):
        preview = _preview_chi(run)
    eta = run.clock.eta(step, keep_mean=run.ref_mean is not None)
    msg = (f"step {step}/{p.steps}" + (f" L_S={ls_val:.4g}" if math.isfinite(ls_val) else "")
           + f" L_T={lt_val:.4g}" + (f" R={tv_val:.3g}" if math.isfinite(tv_val) else "")
           + f" λ={lam:.3g} ETA {eta:.0f}s")
    run.rep(step, msg, preview=preview, L_S=ls_val, L_T=lt_val, TV=tv_val, **{"lambda": lam}, eta_s=eta)


def train(run: Run) -> tuple[int, bool]:
    """Steps ``step0`` → ``params.steps``; returns (step reached, cancelled). On cancel the model keeps the
    buffers of the last completed step."""
    hooks = _CancelHooks(run.model, run.cancel)
    good = _buffers(run.model)
    step = run.step0
    cancelled = False
    try:
        while step < run.p.steps:
            check_cancel(run.cancel)
            t0 = time.perf_counter()
            vals = _step(run, step)
            step += 1
            good = _buffers(run.model)
            _log_step(run, step, t0, *vals)
    except Cancelled:
        cancelled = True
        _restore_buffers(run.model, good)
        run.opt.zero_grad(set_to_none=True)
    finally:
        hooks.remove()
    return step, cancelled


def result(run: Run, step: int, cancelled: bool) -> AdaptResult:
    """The result record after the loop (model in eval mode, ``chi`` not yet computed)."""
    p, model, patches = run.p, run.model, run.patches
    model.eval()
    if step > 0 or run.resume is not None:
        model.mark_trained(run.dom_t)
    info = {"patch_shape": list(patches.pshape), "weighting": patches.weighting, "edge_prior": patches.edge_kind,
            "rad_per_ppm": patches.parts[0].ppp, "domain": run.dom_t, "ref_mean": run.ref_mean,
            "synth_regime": None if run.scfg is None else
            {"shape": list(run.scfg.regimes[0].shape), "voxel_size": list(run.scfg.regimes[0].voxel_size)}}
    if run.arch_of is not None:
        info["architecture_of"] = run.arch_of
        info["input"] = "field, mask, TKD" if model.config.has_tkd else "field, mask"
        info["normalisation"] = "none" if p.uqsm_norm == "none" else "one BatchNorm"
    if run.multi:
        info["scans"] = [{"fingerprint": fp, "name": getattr(sc, "name", None), "shape": list(sc.shape),
                          "voxel_size": list(g["voxel_size"]), "b0_direction": [float(v) for v in g["b0_direction"]],
                          "rad_per_ppm": part.ppp, "patch_shape": list(part.pshape)}
                         for fp, sc, g, part in zip(run.fps, run.scans, run.geoms, patches.parts)]
        if run.ref_means is not None:
            info["ref_means"] = run.ref_means
    res = AdaptResult(model=model, chi=None, history=run.history, seconds=0.0, device=device_label(run.dev),
                      params=p, step=step, base_weights=run.base_path, base_sha256=run.base_sha,
                      scan_fingerprint=run.fps[0] if not run.multi else None,
                      optimizer_state=run.opt.state_dict(), cancelled=cancelled, info=info)
    res.scan_fingerprints = run.fps
    return res


def _bake_mean_shift(model, info: dict, delta: float, cs: float) -> None:
    """Shift the output bias by ``delta`` ppm, so that the checkpoint alone reproduces the kept mean; the
    training bias is kept in ``info`` (resume undoes the shift)."""
    info["train_head_bias"] = model.head.bias.detach().cpu().clone()
    with torch.no_grad():
        model.head.bias += torch.tensor([delta * cs], dtype=model.head.bias.dtype, device=model.head.bias.device)
    info["mean_shift_ppm"] = delta


def final_chis(run: Run, res: AdaptResult, step: int) -> tuple[list, dict]:
    """χ of every scan with the adapted model (``keep_mean``: the mean correction baked into the output
    bias first), then the data consistency of the dsbn method (``consistency`` CG steps, anchored at the
    network's χ, whose mean ``keep_mean`` kept); returns (χ per scan, the first prediction's facts). χ is what
    ``recon --method dsbn --weights ADAPTED.pt --param reference=none`` gives with the same ``consistency``."""
    dp = DSBNParams()
    kw = dict(domain="auto", device=run.dev, memory_gb=dp.memory_gb, tile=dp.tile, overlap=dp.overlap,
              cancel=run.cancel)

    def infer():
        out = []
        for k, (sc, g) in enumerate(zip(run.scans, run.geoms)):
            if run.multi:
                run.rep(step, f"χ of scan {k + 1}/{len(run.scans)}", L_S=_NAN, L_T=_NAN)
            out.append(predict(run.model, sc.field, sc.mask, **g, **kw))
        return out

    preds = infer()
    if run.ref_mean is not None and step > 0:
        # one output bias for every scan: the mean over the scans of the unadapted means is kept
        delta = run.ref_mean - float(np.mean([c[sc.mask].mean(dtype=np.float64) for (c, _), sc in zip(preds, run.scans)]))
        _bake_mean_shift(run.model, res.info, delta, run.cs)
        if run.multi:   # the bias is a constant in χ: inside each mask χ moves by delta (what inference now gives)
            preds = [(np.where(sc.mask, c + np.float32(delta), c).astype(np.float32), pi)
                     for (c, pi), sc in zip(preds, run.scans)]
        else:
            preds = infer()
    chis = []
    for k, (c, _) in enumerate(preds):
        if run.p.consistency > 0:
            run.rep(step, f"data consistency of scan {k + 1}/{len(preds)} ({run.p.consistency} CG steps)",
                    L_S=_NAN, L_T=_NAN)
        chis.append(_consistency(run, k, c))
    return chis, preds[0][1]
