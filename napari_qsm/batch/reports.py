"""What a batch says and leaves: the summary table (``batch_summary.tsv``), the plan and the progress bar,
the derivatives' ``dataset_description.json``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .fingerprints import read_json

__all__ = ["SUMMARY_COLUMNS", "BatchSummary", "write_summary", "dataset_description", "clean_tmp", "bar", "say_rows"]

SUMMARY_COLUMNS = ("scan", "kind", "status", "seconds", "field_residual", "step", "error", "worker")


@dataclass
class BatchSummary:
    """What :func:`~napari_qsm.batch.run_batch` returns: one row per scan (``SUMMARY_COLUMNS``) and where it was written."""

    rows: list
    path: Optional[Path]
    seconds: float
    dashboard: str = ""
    workers: int = 0
    dry_run: bool = False

    def _with(self, status) -> list:
        return [r for r in self.rows if r["status"] == status]

    @property
    def done(self) -> list:
        return self._with("done")

    @property
    def skipped(self) -> list:
        return self._with("skipped")

    @property
    def failed(self) -> list:
        return self._with("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        lines = ["\t".join(SUMMARY_COLUMNS)]
        lines += ["\t".join(_tsv(r.get(c)) for c in SUMMARY_COLUMNS) for r in self.rows]
        return "\n".join(lines) + "\n"


def _tsv(v) -> str:
    if v is None:
        return "n/a"  # BIDS: n/a for missing values
    if isinstance(v, float):
        return f"{v:.3f}"
    return " ".join(str(v).split())  # one line, no tabs


def write_summary(rows, deriv: Path) -> Path:
    """``deriv/batch_summary.tsv``, written atomically."""
    from ..core.files import atomic_write
    path = deriv / "batch_summary.tsv"
    text = BatchSummary(rows, path, 0.0).table()

    def w(tmp):
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    return atomic_write(path, w)


def bar(done: int, total: int, failed: int, t0: float, last: str) -> str:
    """``[#####.....] 3/10 scans, 1 failed, 42 s  sub-03 done (4.1 s)``."""
    width = 28
    n = int(width * done / max(1, total))
    fail = f", {failed} failed" if failed else ""
    return (f"{'[' + '#' * n + '.' * (width - n) + ']'} {done}/{total} scans{fail}, {time.perf_counter() - t0:.0f} s"
            + (f"  {last}" if last else ""))


def say_rows(rows, say) -> None:
    """The plan, one line per scan."""
    for r in rows:
        st = {"skipped": "up to date", "planned": "to run"}.get(r["status"], r["status"])
        say(f"  {r['scan']:32s} {r['kind']:5s} {st}" + (f"  [{r['step']}] {r['error']}" if r["error"] else ""))


def dataset_description(deriv: Path, root: Path) -> None:
    """The derivatives' ``dataset_description.json`` (DatasetType derivative, GeneratedBy), kept when current."""
    from .. import __version__
    from ..core.io import write_json
    path = deriv / "dataset_description.json"
    desc = read_json(path) or {}
    gen = {"Name": "napari-qsm", "Version": __version__,
           "Description": "quantitative susceptibility mapping (napari-qsm batch)"}
    generated = [g for g in desc.get("GeneratedBy", []) if isinstance(g, dict)] \
        if isinstance(desc.get("GeneratedBy"), list) else []
    if desc.get("DatasetType") == "derivative" and gen in generated:
        return
    src = read_json(root / "dataset_description.json") or {}
    new = {"Name": f"napari-qsm QSM derivatives of {src.get('Name', root.name)}",
           "BIDSVersion": src.get("BIDSVersion", "1.9.0"), "DatasetType": "derivative",
           "GeneratedBy": [g for g in generated if g.get("Name") != "napari-qsm"] + [gen],
           "SourceDatasets": [{"URL": "bids:raw:"}], "DatasetLinks": {"raw": "../../"}}
    write_json(path, new)


def clean_tmp(deriv: Path) -> int:
    """Remove temporary files a killed worker left behind (only while no task is running)."""
    n = 0
    for p in deriv.rglob(".tmp-*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n
