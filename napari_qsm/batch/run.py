"""``run_batch``: check the settings, discover and fingerprint the scans, run what is not up to date."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..core.field.steps import FAMILIES as FIELD_FAMILIES
from ..core.files import sha256_file
from .cluster import ClientHolder, estimate_bytes, parse_bytes, submit_and_wait
from .discovery import DERIVATIVES, discover
from .fingerprints import digest, field_inputs, input_hashes, plan_scans, read_json
from .reports import BatchSummary, clean_tmp, dataset_description, say_rows, write_summary
from .tasks import adapt_task

__all__ = ["run_batch"]


def _weights(m, weights) -> tuple:
    """(checkpoint path, its sha256) of a network method (None, None for the others)."""
    if weights is not None and not m.accepts_weights:
        raise ValueError(f"--weights: method {m.name} takes no network weights")
    if not m.accepts_weights:
        return None, None
    if weights is None:
        from ..nn.infer import default_weights_path
        w_path = default_weights_path()
    else:
        w_path = Path(weights).resolve()
    if not Path(w_path).is_file():
        raise ValueError(f"--weights: {w_path} is not a file")
    return w_path, sha256_file(w_path)


def _settings(method, params, field_params, weights, adapt_protocol, adapt_params) -> dict:
    """Every argument checked before any work: the method, its parameters, the front end, the weights."""
    from ..core.params import make_params, params_to_dict
    from ..methods import get_method
    from ..pipeline import make_recipe, split_field_items

    m = get_method(method)
    if m.multi_scan:
        raise ValueError(f"method {m.name} needs several orientations of one head; batch runs one scan at a time")
    par = params_to_dict(make_params(m.params_cls, dict(params or {})))
    w_path, w_sha = _weights(m, weights)
    a_par = None
    if adapt_protocol:
        if m.name != "dsbn":
            raise ValueError(f"--adapt-protocol: every scan is reconstructed with the adapted network; use --method dsbn "
                             f"(not {m.name})")
        from ..nn.adapt import AdaptParams
        a_par = params_to_dict(make_params(AdaptParams, dict(adapt_params or {})))
    elif adapt_params:
        raise ValueError("--adapt-param: given without --adapt-protocol")
    fsteps, fparams, fload = split_field_items(field_params)
    recipe = make_recipe(fsteps, fparams)
    field_recipe = {f: {"step": recipe.step(f).name, "parameters": params_to_dict(recipe.record(f))}
                    for f in FIELD_FAMILIES}
    from ..core.field.phase_units import PHASE_UNITS
    if fload.get("phase_units", "auto") not in PHASE_UNITS:
        raise ValueError(f"--field-param phase_units: expected one of {', '.join(PHASE_UNITS)}, "
                         f"got {fload['phase_units']!r}")
    if fload.get("phase_sign", 1) not in (1, -1):
        raise ValueError(f"--field-param phase_sign: expected 1 or -1, got {fload['phase_sign']!r}")
    return dict(m=m, par=par, w_path=w_path, w_sha=w_sha, a_par=a_par, fsteps=fsteps, recipe=recipe,
                field_recipe=field_recipe, fload=fload)


def _adapt_cohort(holder, scans, hashes, plan, a_par, w_path, w_sha, deriv: Path, say):
    """The adapted checkpoint of the cohort (reused when present); (path, its sha256) or (None, error)."""
    root, m = plan["root"], plan["m"]
    ids = [s.id for s in scans]
    cfp = digest({"scans": [[s.id, h] for s, h in zip(scans, hashes)], "field": plan["field_recipe"],
                  "load": plan["fload"], "adapt": a_par, "base_sha256": w_sha})
    path = deriv / "adapted" / f"protocol-{cfp[:16]}.pt"
    side = read_json(path.with_suffix(".json")) or {}
    if (not plan["overwrite"] and path.exists()
            and (side.get("batch") or {}).get("cohort_fingerprint") == cfp):
        say(f"  adapted checkpoint up to date: {path}")
        return path, sha256_file(path)
    job = {"fields": [field_inputs(s, root, m.name) for s in scans], "params": a_par, "base": str(w_path),
           "device": plan["device"], "path": str(path), "fingerprint": cfp, "ids": ids, "threads": None}
    say(f"  adapting to {len(scans)} scan(s) ({a_par['steps']} steps) -> {path}")
    t0 = time.perf_counter()
    fut = holder.get().submit(adapt_task, job, key=f"qsm-adapt-protocol-{cfp[:12]}", pure=False, retries=0)
    try:
        rec = fut.result()
    except Exception as exc:
        rec = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
    if not rec["ok"]:
        say(f"  adaptation FAILED: {rec['error']}")
        return None, rec["error"]
    say(f"  adapted in {time.perf_counter() - t0:.1f} s")
    return path, sha256_file(path)


def _protocol(ctx: dict, state: dict):
    """--adapt-protocol: every local field, one adaptation over the cohort, then dsbn with it on every scan.

    Returns the dry run's summary, or None with ``state["rows"]`` / ``state["jobs"]`` set."""
    scans, hashes, plan, s = ctx["scans"], ctx["hashes"], ctx["plan"], ctx["settings"]
    say, a_par = ctx["say"], s["a_par"]
    rows0, field_jobs = plan_scans(scans, hashes, **plan, weights=None, w_sha=None, field_only=True)
    say(f"  protocol adaptation over the cohort: local fields to compute: {len(field_jobs)}; then one "
        f"adaptation ({a_par['steps']} steps, mode {a_par['mode']}), then dsbn on every scan")
    if (dry := ctx["open"](rows0)) is not None:
        return dry
    state["rows"] = rows0
    if field_jobs:
        submit_and_wait(ctx["holder"], field_jobs, say, ctx["progress"], ctx["echo"], what="local fields")
    ok = [sc for sc, r in zip(scans, rows0) if r["status"] != "failed"]
    ok_hashes = [h for sc, h in zip(scans, hashes) if sc in ok]
    ckpt, c_sha = _adapt_cohort(ctx["holder"], ok, ok_hashes, plan, a_par, s["w_path"], s["w_sha"], ctx["deriv"],
                                say) if ok else (None, None)
    failed = {r["scan"]: r for r in rows0 if r["status"] == "failed"}
    if ckpt is None and ok:  # the adaptation failed: every scan of the cohort with it
        for sc in ok:
            failed[sc.id] = {**next(r for r in rows0 if r["scan"] == sc.id), "status": "failed",
                             "step": "adapt", "error": c_sha}
    r2, jobs = plan_scans(ok, ok_hashes, **plan, weights=str(ckpt), w_sha=c_sha) if ckpt is not None else ([], [])
    by = {r["scan"]: r for r in r2}
    state["rows"], state["jobs"] = [failed.get(sc.id) or by[sc.id] for sc in scans], jobs
    return None


def _execute(ctx: dict, state: dict):
    """Plan (and, unless a dry run, run) every scan; the dry run's summary or None (``state`` filled)."""
    s, say = ctx["settings"], ctx["say"]
    if s["a_par"] is not None:
        if (dry := _protocol(ctx, state)) is not None:
            return dry
    else:
        weights = None if s["w_path"] is None or ctx["weights"] is None else str(s["w_path"])
        rows, jobs = plan_scans(ctx["scans"], ctx["hashes"], **ctx["plan"], weights=weights, w_sha=s["w_sha"])
        if (dry := ctx["open"](rows)) is not None:
            return dry
        state["rows"], state["jobs"] = rows, jobs
    rows, jobs = state["rows"], state["jobs"]
    n_skip = sum(r["status"] == "skipped" for r in rows)
    n_bad = sum(r["status"] == "failed" for r in rows)
    reuse = sum(j["field_ready"] for _, j in jobs)
    say(f"  to run: {len(jobs)}, up to date: {n_skip}, unusable: {n_bad}"
        + (f" (field reused for {reuse})" if reuse else ""))
    if jobs:
        submit_and_wait(ctx["holder"], jobs, say, ctx["progress"], ctx["echo"])
    return None


def _discover_and_hash(root: Path, only, say) -> tuple:
    """(scans, their input hashes, the derivatives folder); the client hashes every input once."""
    scans = discover(root, only)
    deriv = root / "derivatives" / DERIVATIVES
    say(f"napari-qsm batch: {len(scans)} scan(s) under {root} "
        f"({sum(x.kind == 'raw' for x in scans)} raw echoes, {sum(x.kind == 'field' for x in scans)} local fields)"
        f" -> {deriv}")
    with ThreadPoolExecutor(max_workers=4) as pool:
        hashes = list(pool.map(lambda x: input_hashes(x, root), scans))
    return scans, hashes, deriv


def run_batch(root, method: str = "tkd", params: Optional[dict] = None, field_params: Optional[dict] = None,
              weights=None, *, client=None, scheduler: Optional[str] = None, workers: Optional[int] = None,
              threads_per_worker: int = 1, memory_limit=None, only: Optional[Sequence[str]] = None,
              dry_run: bool = False, overwrite: bool = False, device: str = "auto",
              adapt_protocol: bool = False, adapt_params: Optional[dict] = None, dicom: bool = False,
              progress: Optional[Callable] = None, echo: bool = True) -> BatchSummary:
    """Reconstruct every scan of the BIDS dataset ``root`` on Dask; BIDS derivatives out (docs/batch.md).

    Parameters
    ----------
    root : path
        The dataset: ``sub-*/[ses-*/]anat`` with MEGRE echoes or local fields.
    method, params : str, dict
        An inversion of :mod:`napari_qsm.methods` and its parameters (public names; strings accepted).
    field_params : dict, optional
        The front end for raw echoes, ``{"background": "pdf", "background.radius": 6, "phase_units":
        "siemens"}`` (:func:`napari_qsm.pipeline.split_field_items`).
    weights : path, optional
        Network checkpoint (default: the shipped one); the base of ``adapt_protocol``.
    client, scheduler, workers, threads_per_worker, memory_limit
        A ``distributed.Client`` (not closed), else a scheduler address, else a LocalCluster of
        ``workers`` processes (default :func:`~napari_qsm.batch.default_workers`), each with
        ``threads_per_worker`` threads and ``memory_limit`` (bytes or "4GB").
    only, dry_run, overwrite, device
        Subject labels; plan only; recompute up-to-date scans; "auto", "cpu" or "cuda[:N]".
    adapt_protocol, adapt_params
        First adapt QSMInvNet+ once over every scan's local field (one task, checkpoint in
        ``derivatives/napari-qsm/adapted/``, reused while cohort and parameters match), then
        ``dsbn`` with it on every scan.
    dicom : bool
        Also write each χ as a DICOM series (``<prefix>_desc-<method>_Chimap_dicom/``).
    progress, echo
        Called with a :class:`~napari_qsm.core.progress.Progress` per finished scan; print the plan,
        dashboard and a bar to stderr.

    Returns
    -------
    BatchSummary
        One row per scan (status, seconds, field residual, failing step and error, worker);
        ``batch_summary.tsv`` unless ``dry_run``. Bad arguments raise ValueError before any work;
        a bad scan fails only its row.

    References
    ----------
    .. [1] Gorgolewski K. J. et al., The brain imaging data structure, Sci. Data 3 (2016) 160044.
    """
    t_start = time.perf_counter()
    root = Path(root).resolve()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if echo else (lambda *a: None)
    s = _settings(method, params, field_params, weights, adapt_protocol, adapt_params)
    mem_bytes = parse_bytes(memory_limit)
    if threads_per_worker < 1 or (workers is not None and workers < 1):
        raise ValueError("--workers and --threads-per-worker must be at least 1")
    scans, hashes, deriv = _discover_and_hash(root, only, say)
    plan = dict(root=root, m=s["m"], par=s["par"], fsteps=s["fsteps"], recipe=s["recipe"],
                field_recipe=s["field_recipe"], fload=s["fload"], overwrite=overwrite, device=device, dicom=dicom)
    holder = ClientHolder(client, scheduler, workers, threads_per_worker, mem_bytes, say,
                          lambda ids: estimate_bytes([x for x in scans if x.id in ids], s["m"]))

    ctx = dict(root=root, scans=scans, hashes=hashes, plan=plan, settings=s, say=say, holder=holder,
               progress=progress, echo=echo, deriv=deriv, weights=weights, dry_run=dry_run, t_start=t_start)
    ctx["open"] = lambda planned: _open_or_dry(ctx, planned)
    return _run_and_report(ctx)


def _open_or_dry(ctx: dict, planned):
    """Dry run: say the plan and return its summary; otherwise create the derivatives folder (None)."""
    if ctx["dry_run"]:
        say_rows(planned, ctx["say"])
        return BatchSummary(planned, None, time.perf_counter() - ctx["t_start"], dry_run=True)
    ctx["deriv"].mkdir(parents=True, exist_ok=True)
    dataset_description(ctx["deriv"], ctx["root"])
    return None


def _run_and_report(ctx: dict) -> BatchSummary:
    """Run the plan; the summary written (also when interrupted: what finished is kept) and said."""
    deriv, holder, say, dry_run = ctx["deriv"], ctx["holder"], ctx["say"], ctx["dry_run"]
    state: dict = {}
    try:
        if (dry := _execute(ctx, state)) is not None:
            return dry
    except BaseException:  # interrupted (Ctrl-C) or the scheduler went away: keep what finished
        if not dry_run and "rows" in state:
            for r in state["rows"]:
                if r["status"] == "planned":
                    r.update(status="not run", step="interrupted")
            write_summary(state["rows"], deriv)
        raise
    finally:
        holder.close()
        if deriv.is_dir() and not dry_run:
            clean_tmp(deriv)
    rows = state["rows"]
    summary = BatchSummary(rows, write_summary(rows, deriv), time.perf_counter() - ctx["t_start"], holder.dashboard,
                           holder.n_workers)
    say(f"napari-qsm batch: {len(summary.done)} done, {len(summary.skipped)} up to date, {len(summary.failed)} failed "
        f"in {summary.seconds:.1f} s -> {summary.path}")
    for r in summary.failed:
        say(f"  FAILED {r['scan']} [{r['step']}] {r['error']}")
    return summary
