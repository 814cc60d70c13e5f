"""BIDS names, in one place: entities, MEGRE echoes, the napari-qsm derivatives layout.

Raw multi-echo GRE (BIDS MEGRE): ``<prefix>_echo-<N>_part-mag|phase_MEGRE.nii[.gz]``, ``<prefix>``
holding the other entities (``sub-01[_ses-2][_acq-x][_run-1]``). Derivatives of ``napari-qsm batch``:
``ROOT/derivatives/napari-qsm/sub-*/[ses-*/]anat/<prefix>_desc-<method>_Chimap.nii.gz`` and
``<prefix>_<map>.nii.gz`` (local field, mask, ...). Used by the echo loader, the batch planner and
the napari reader and derivatives dock.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["ENTITIES", "DERIVATIVES", "CHI_SUFFIX", "strip_ext", "is_nifti", "entities", "label",
           "megre_groups", "find_megre", "has_megre", "anat_folders", "derivatives_anat", "chi_name",
           "chi_prefix", "chi_method"]

#: the entities napari-qsm reads, in BIDS order
ENTITIES = ("sub", "ses", "acq", "run", "echo", "part")
#: ROOT/derivatives/<this>
DERIVATIVES = "napari-qsm"
CHI_SUFFIX = "_Chimap.nii.gz"

_ECHO = re.compile(r"_echo-(\d+)(?=_)")
_PART = re.compile(r"_part-(mag|phase)(?=_)")
_MEGRE = "_MEGRE"


def strip_ext(name: str) -> str:
    """``sub-01_mask.nii.gz`` → ``sub-01_mask`` (``.nii.gz`` and ``.nii``, any case; other names unchanged)."""
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def is_nifti(p: Path) -> bool:
    """A visible NIfTI file (``.nii`` or ``.nii.gz``)."""
    n = p.name.lower()
    return p.is_file() and (n.endswith(".nii") or n.endswith(".nii.gz")) and not p.name.startswith(".")


def entities(name: str) -> dict:
    """The BIDS entities of a file name: ``{"sub": "01", "echo": "2", ..., "suffix": "MEGRE"}``.

    Parameters
    ----------
    name : str
        A file name (extension optional).

    Returns
    -------
    dict
        ``key -> value`` for every ``key-value`` part (the keys of :data:`ENTITIES` and any other),
        and ``"suffix"``: the last part when it holds no ``-`` (absent otherwise).
    """
    out: dict = {}
    parts = strip_ext(Path(name).name).split("_")
    for k, part in enumerate(parts):
        if "-" in part:
            key, _, val = part.partition("-")
            out[key] = val
        elif k == len(parts) - 1:
            out["suffix"] = part
    return out


def label(value: str, prefix: str) -> str:
    """``label("01", "sub-")`` → ``"sub-01"``; a value that already has the prefix is kept."""
    v = str(value).strip()
    return v if v.startswith(prefix) else prefix + v


def megre_groups(paths: Iterable[Path]) -> dict[tuple[Path, str], dict[str, dict[int, Path]]]:
    """MEGRE files grouped by acquisition: ``{(folder, prefix): {"mag": {echo: path}, "phase": {echo: path}}}``.

    ``prefix`` is the name without ``_echo-N``, ``_part-…`` and ``_MEGRE`` (``sub-01_acq-x``). Files
    that are not ``*_MEGRE`` or lack an echo or part entity are left out.
    """
    groups: dict = {}
    for p in paths:
        p = Path(p)
        stem = strip_ext(p.name)
        if not stem.endswith(_MEGRE):
            continue
        e, part = _ECHO.search(stem), _PART.search(stem)
        if not e or not part:
            continue
        prefix = _PART.sub("", _ECHO.sub("", stem))[: -len(_MEGRE)]
        groups.setdefault((p.parent, prefix), {"mag": {}, "phase": {}})[part.group(1)][int(e.group(1))] = p
    return groups


def has_megre(folder, depth: Optional[int] = None) -> bool:
    """Whether ``folder`` holds MEGRE magnitude or phase files (any depth, or up to ``depth`` levels below)."""
    folder = Path(folder)
    if depth is None:
        return any(folder.rglob("*_part-mag_*MEGRE.nii*")) or any(folder.rglob("*_part-phase_*MEGRE.nii*"))
    pats = ["/".join(["*"] * d + ["*_part-mag_*MEGRE.nii*"]) for d in range(depth + 1)]
    return any(p for pat in pats for p in folder.glob(pat) if is_nifti(p))


def find_megre(folder) -> dict[tuple[Path, str], dict[str, dict[int, Path]]]:
    """Every MEGRE acquisition under ``folder`` (any depth; ``derivatives`` folders left out), as :func:`megre_groups`."""
    files = [p for p in sorted(Path(folder).rglob("*MEGRE.nii*")) if is_nifti(p) and "derivatives" not in p.parts]
    return megre_groups(files)


def anat_folders(root, only: Optional[Iterable[str]] = None) -> list[tuple[Path, str, Optional[str]]]:
    """``(anat folder, subject, session or None)`` under a BIDS ``root``: ``sub-*/anat`` and ``sub-*/ses-*/anat``.

    ``only``: subject labels to keep ("sub-01" or "01"); an unknown label raises ValueError.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"BIDS root: {root} is not a folder")
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if only:
        want = {label(s, "sub-") for s in only}
        missing = sorted(want - {p.name for p in subjects})
        if missing:
            raise ValueError(f"--only: {', '.join(missing)} not found under {root} "
                             f"(subjects: {', '.join(p.name for p in subjects) or 'none'})")
        subjects = [p for p in subjects if p.name in want]
    out = []
    for sub in subjects:
        for anat in [sub / "anat"] + sorted(s / "anat" for s in sub.glob("ses-*") if s.is_dir()):
            if anat.is_dir():
                out.append((anat, sub.name, anat.parent.name if anat.parent != sub else None))
    return out


def derivatives_anat(root, subject: str, session: Optional[str] = None) -> Path:
    """``ROOT/derivatives/napari-qsm/<subject>/[<session>/]anat``."""
    d = Path(root) / "derivatives" / DERIVATIVES / subject
    return (d / session if session else d) / "anat"


def chi_name(prefix: str, method: str) -> str:
    """``<prefix>_desc-<method>_Chimap.nii.gz``."""
    return f"{prefix}_desc-{method}{CHI_SUFFIX}"


def chi_prefix(name: str) -> str:
    """The scan prefix of a χ map's file name (the part before ``_desc-``)."""
    return name[: -len(CHI_SUFFIX)].split("_desc-")[0] if name.endswith(CHI_SUFFIX) else name.split("_desc-")[0]


def chi_method(name: str) -> str:
    """The ``desc-<method>`` entity of a χ map's file name, or ``""``."""
    part = name.split("_desc-")
    return part[1].split("_")[0] if len(part) > 1 else ""
