"""Atomic file writes with the user's normal permissions.

Every file the project writes (results, sidecars, CSV tables, checkpoints, weight cards) goes
through :func:`atomic_write`: the content is written to a temporary file in the target folder and
renamed over the target, so a crash or a cancel never leaves a half-written file. ``mkstemp``
creates its file ``-rw-------``; the final file gets ``0o666 & ~umask`` instead (``-rw-r--r--``
under the usual umask 022), like any file the user's programs create, so colleagues who share
the folder can read the results.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_write", "atomic_files", "default_file_mode", "sha256_file"]


def default_file_mode() -> int:
    """``0o666`` less the process umask (read without changing it for other threads)."""
    try:  # Linux ≥ 4.7 reports the umask without setting it
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, writer: Callable[[str], None]) -> Path:
    """Call ``writer(tmp_path)`` to write a temporary file beside ``path``, then rename it to ``path``.

    The temporary name keeps the target's suffix (``.nii.gz`` included), so writers that choose the
    format from the suffix (nibabel, torch) behave as for the target. Nothing is left on failure.
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


@contextmanager
def atomic_files(*paths) -> Iterator[list]:
    """Temporary files beside ``paths`` (one each, same suffix) that become ``paths`` together.

    For a set written as one (a checkpoint and its card): the ``with`` body writes the temporary
    names it is given; on success each gets the user's normal mode (:func:`default_file_mode`,
    ``-rw-r--r--`` under umask 022, not ``mkstemp``'s ``-rw-------``) and is renamed over its
    target, in the order given. On failure nothing is left behind.

    Parameters
    ----------
    *paths : path-like
        The final file names.

    Returns
    -------
    list of str
        The temporary names, in the order of ``paths`` (yielded by the context manager).
    """
    tmps = []
    try:
        for p in map(Path, paths):
            suffix = "".join(p.suffixes[-2:]) if p.name.lower().endswith(".nii.gz") else p.suffix
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=str(p.parent))
            os.close(fd)
            tmps.append(tmp)
        yield list(tmps)
        mode = default_file_mode()
        for tmp, p in zip(tmps, paths):
            os.chmod(tmp, mode)
            os.replace(tmp, p)
    finally:
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (inputs, weights and checkpoints in sidecars)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
