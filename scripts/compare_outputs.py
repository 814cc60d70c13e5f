"""Max abs difference between the NIfTI images (and JSON sidecars) of two output folders (issue 23).

Usage::

    PYTHONPATH=/work/main python -m napari_qsm.cli phantom BEFORE --raw
    PYTHONPATH=$PWD       python -m napari_qsm.cli phantom AFTER --raw
    python scripts/compare_outputs.py BEFORE AFTER

Prints one line per image: bit-identical, or the max abs difference, the max of |before| and their
ratio; JSON files are compared as text after dropping volatile keys (times, versions). Exits 1 when a
file is missing on one side or an image changed shape.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

VOLATILE = {"seconds", "version", "date", "created", "time", "GeneratedBy", "wall_seconds"}


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _floats(a, b, path="") -> float:
    """Max abs difference of the numbers of two JSON trees of the same shape (inf if the shapes differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max([_floats(a[k], b[k]) for k in a] + [0.0])
    if isinstance(a, list) and isinstance(b, list):
        return float("inf") if len(a) != len(b) else max([_floats(x, y) for x, y in zip(a, b)] + [0.0])
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def _phase(x, y, mag_a, mag_b) -> None:
    """Phase images: the wrapped difference, and the difference of the complex signal m·e^{iφ} (a phase
    change of a voxel with almost no signal is round-off of the signal, not of the image)."""
    import nibabel as nib
    ma = np.asarray(nib.load(str(mag_a)).dataobj, np.float64)
    mb = np.asarray(nib.load(str(mag_b)).dataobj, np.float64)
    a, b = x.astype(np.float64), y.astype(np.float64)
    if np.abs(a).max() > 4.0:   # integer phase (siemens units): to radians
        a, b = a * np.pi / 4096.0, b * np.pi / 4096.0
    dphi = np.abs(np.angle(np.exp(1j * (a - b))))
    ds = np.abs(ma * np.exp(1j * a) - mb * np.exp(1j * b))
    strong = ma > 0.1 * ma.max()
    print(f"    wrapped phase diff: max {dphi.max():.3g} rad, {dphi[strong].max() if strong.any() else 0:.3g} rad where "
          f"the magnitude is > 10 % of its max; complex signal: max |diff| {ds.max():.3g} (max magnitude {ma.max():.3g})")


def compare(before: Path, after: Path) -> int:
    import nibabel as nib
    bad = 0
    files = sorted({p.relative_to(before) for p in before.rglob("*") if p.is_file()}
                   | {p.relative_to(after) for p in after.rglob("*") if p.is_file()})
    for rel in files:
        a, b = before / rel, after / rel
        if not (a.exists() and b.exists()):
            print(f"{rel}: only in {'before' if a.exists() else 'after'}")
            bad = 1
            continue
        if rel.suffix == ".json":
            ja, jb = _clean(json.loads(a.read_text())), _clean(json.loads(b.read_text()))
            d = _floats(ja, jb)
            print(f"{rel}: {'identical' if ja == jb else f'numbers differ by at most {d:.3g}'}")
            continue
        if not rel.name.endswith((".nii", ".nii.gz")):
            continue
        ia, ib = nib.load(str(a)), nib.load(str(b))
        x, y = np.asarray(ia.dataobj), np.asarray(ib.dataobj)
        if x.shape != y.shape or not np.array_equal(ia.affine, ib.affine):
            print(f"{rel}: shape or affine changed {x.shape} -> {y.shape}")
            bad = 1
            continue
        if np.array_equal(x, y):
            print(f"{rel}: bit-identical ({x.dtype})")
            continue
        d = np.abs(x.astype(np.float64) - y.astype(np.float64))
        m = float(np.abs(x.astype(np.float64)).max())
        print(f"{rel}: max |diff| {d.max():.3g} (max |before| {m:.3g}, ratio {d.max() / max(m, 1e-30):.2g}; "
              f"{int((d > 0).sum())} of {d.size} voxels differ; {x.dtype})")
        if "part-phase" in rel.name and (before / str(rel).replace("part-phase", "part-mag")).exists():
            _phase(x, y, before / str(rel).replace("part-phase", "part-mag"), after / str(rel).replace("part-phase", "part-mag"))
    return bad


if __name__ == "__main__":
    sys.exit(compare(Path(sys.argv[1]), Path(sys.argv[2])))
