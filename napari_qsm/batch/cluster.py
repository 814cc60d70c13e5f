"""The Dask side of a batch: how many workers fit, the client, submitting tasks and following them."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from .discovery import BatchScan
from .reports import bar
from .tasks import process_scan

__all__ = ["estimate_bytes", "default_workers", "parse_bytes", "ClientHolder", "submit_and_wait"]


def estimate_bytes(scans: Sequence[BatchScan], method) -> int:
    """Rough peak memory of one task: the largest scan's voxels × bytes per voxel of the work."""
    import nibabel as nib
    biggest, echoes = 1, 1
    for s in scans:
        try:
            f = s.inputs["magnitude"][0] if s.kind == "raw" else s.inputs["field"]
            shape = nib.load(str(f)).header.get_data_shape()
        except Exception:
            continue
        n = int(shape[0]) * int(shape[1]) * int(shape[2])
        ne = len(s.inputs["magnitude"]) if s.kind == "raw" else 1
        if len(shape) > 3:
            ne *= int(shape[3])
        if n * (ne + 8) > biggest * (echoes + 8):
            biggest, echoes = n, ne
    # echoes: magnitude, phase, complex and fit temporaries (~40 B per voxel and echo); inversions:
    # 2x-padded complex FFT work arrays (MEDI keeps ~a dozen; networks more) ~ 600 B per voxel
    per_voxel = 40 * echoes + (1500 if getattr(method, "accepts_weights", False) else 600)
    return int(max(1 << 30, biggest * per_voxel + (600 << 20)))  # + interpreter, torch and numpy


def default_workers(task_bytes: int, threads_per_worker: int = 1, n_tasks: Optional[int] = None) -> int:
    """Workers that fit the machine: CPUs // threads, and the available memory // a task's peak."""
    import psutil
    cpus = max(1, (os.cpu_count() or 1) // max(1, threads_per_worker))
    mem = max(1, int(psutil.virtual_memory().available * 0.85) // max(1, task_bytes))
    n = min(cpus, mem)
    if n_tasks:
        n = min(n, n_tasks)
    return max(1, n)


def parse_bytes(v) -> Optional[int]:
    """``"4GB"`` / ``4e9`` → bytes (None stays None); ValueError naming ``--memory-limit`` otherwise."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v)
    from dask.utils import parse_bytes as dask_parse
    try:
        return int(dask_parse(str(v)))
    except (ValueError, TypeError):
        raise ValueError(f"--memory-limit: expected a size like 4GB or 4GiB, got {v!r}") from None


class ClientHolder:
    """The Dask client: the caller's, one to ``scheduler``, or a LocalCluster started when first needed."""

    def __init__(self, client, scheduler, workers, threads, mem_bytes, say, estimate):
        self.client, self.scheduler, self.workers, self.threads = client, scheduler, workers, threads
        self.mem_bytes, self.say, self.estimate = mem_bytes, say, estimate
        self.own_client = self.own_cluster = None
        self.dashboard, self.n_workers = "", 0
        self.n_tasks = 1
        self.ids: set = set()

    def _start_local(self):
        from distributed import Client, LocalCluster
        task_bytes = self.estimate(self.ids)
        n = self.workers or default_workers(self.mem_bytes or task_bytes, self.threads, self.n_tasks)
        mem = self.mem_bytes
        if mem is None:
            import psutil
            mem = max(task_bytes, int(psutil.virtual_memory().total * 0.9) // n)
        env = {k: str(self.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        self.own_cluster = LocalCluster(n_workers=n, threads_per_worker=self.threads, processes=True,
                                        memory_limit=mem, env=env, silence_logs=40)
        return Client(self.own_cluster)

    def get(self):
        if self.client is None:
            if self.scheduler:
                from distributed import Client
                self.client = self.own_client = Client(self.scheduler)
            else:
                self.client = self.own_client = self._start_local()
        if not self.n_workers:
            self.n_workers = len(self.client.scheduler_info().get("workers", {}))
            self.dashboard = self.client.dashboard_link or ""
            try:
                import bokeh  # noqa: F401
                note = ""
            except ImportError:
                note = " (not served: `pip install bokeh` to see it)"
            self.say(f"  Dask scheduler {getattr(self.client.scheduler, 'address', '?')}, {self.n_workers} worker(s); "
                     f"dashboard {self.dashboard or 'n/a'}{note}")
        return self.client

    def close(self):
        if self.own_client is not None:
            self.own_client.close()
        if self.own_cluster is not None:
            self.own_cluster.close()


def _finished(fut, row) -> None:
    """Copy a task's record (or the worker's failure) into its summary row."""
    try:
        rec = fut.result()
    except Exception as exc:  # KilledWorker (the task killed too many workers), lost scheduler...
        name = type(exc).__name__
        hint = " (every worker that ran it died: out of memory?)" if name == "KilledWorker" else ""
        rec = {"status": "failed", "step": "worker", "error": f"{name}: {' '.join(str(exc).split())}{hint}"}
    rec.pop("traceback", None)
    row.update({k: v for k, v in rec.items() if k in row})


def submit_and_wait(holder: ClientHolder, jobs, say, progress, echo=True, what="scans") -> None:
    """One :func:`~napari_qsm.batch.tasks.process_scan` task per job; rows updated as they finish, a bar on stderr."""
    from distributed import as_completed

    from ..core.progress import Progress
    holder.n_tasks = max(holder.n_tasks, len(jobs))
    holder.ids |= {job["id"] for _, job in jobs}
    client = holder.get()
    tty = sys.stderr.isatty()
    t0 = time.perf_counter()
    futures = {}
    for row, job in jobs:
        key = f"qsm-{job['id']}-{'field-' if job.get('field_only') else ''}{job['fingerprint'][:12]}"
        futures[client.submit(process_scan, job, key=key, pure=False, retries=0)] = row
    done = failed = 0
    try:
        for fut in as_completed(list(futures)):
            row = futures[fut]
            _finished(fut, row)
            done += 1
            failed += row["status"] == "failed"
            last = f"{row['scan']} {row['status']}" + (f" ({row['seconds']:.1f} s)" if row.get("seconds") else "")
            line = bar(done, len(jobs), failed, t0, last).replace(" scans", f" {what}")
            if echo and tty:
                print("\r" + line[:150].ljust(150), end="" if done < len(jobs) else "\n", file=sys.stderr, flush=True)
            elif echo:
                say(line)
            if progress is not None:
                progress(Progress(step=done, total=len(jobs), message=last, stage="batch" if what == "scans" else what,
                                  elapsed=time.perf_counter() - t0))
    except BaseException:
        for f in futures:
            f.cancel()
        raise
