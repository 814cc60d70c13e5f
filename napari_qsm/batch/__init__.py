"""Whole BIDS datasets on Dask distributed: every scan from raw echoes or a local field to χ, BIDS derivatives out.

    from napari_qsm.batch import run_batch
    summary = run_batch("/data/study", method="medi", params={"lambda": "auto"})

or ``napari-qsm batch /data/study --method medi``. Modules: ``discovery`` (the scans, the derivatives'
names), ``fingerprints`` (what is up to date), ``tasks`` (one scan on a worker), ``reports`` (the
summary), ``cluster`` (Dask), ``run`` (:func:`run_batch`). Inputs, outputs, resuming and clusters:
``docs/batch.md``. No Qt, no napari.
"""

from ..core.files import sha256_file  # noqa: F401  (tests and benchmarks import it from here too)
from ..pipeline import split_field_items as parse_field_params
from .cluster import default_workers
from .discovery import DERIVATIVES, FIELD_SUFFIXES, BatchScan, discover, output_paths
from .fingerprints import input_hashes, plan_scans as _plan  # noqa: F401  (benchmarks/bench_batch.py)
from .reports import SUMMARY_COLUMNS, BatchSummary
from .run import run_batch
from .tasks import adapt_task, process_scan, warm_worker

__all__ = ["run_batch", "discover", "BatchScan", "BatchSummary", "default_workers", "DERIVATIVES",
           "output_paths", "SUMMARY_COLUMNS", "parse_field_params", "process_scan", "adapt_task", "warm_worker",
           "input_hashes", "FIELD_SUFFIXES", "sha256_file"]
