"""Progress reporting and cooperative cancellation for long work.

Every long job (MEDI, training, adaptation, large inference) accepts

* ``progress``: a callable taking a :class:`Progress` record (or ``None``), and
* ``cancel``: a :class:`CancelToken` (or ``None``; anything with an ``is_set()`` method works,
  e.g. a :class:`threading.Event`).

Jobs call :func:`check_cancel` at least every ~0.5 s of work and raise :class:`Cancelled`
promptly, leaving nothing half-written.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np


class Cancelled(Exception):
    """Raised by a long job when its cancel token was set."""


@dataclass
class Progress:
    """One progress report of a long job.

    step / total: work units done and expected (total None when unknown).
    message: short human text ("MEDI GN 2/10, CG 14").
    losses: named scalars (cost, residual, L_S, L_T, lambda, ...).
    preview: optional array (e.g. current chi estimate) for live display.
    stage: optional name of the current stage.
    """

    step: int
    total: Optional[int] = None
    message: str = ""
    losses: dict = field(default_factory=dict)
    preview: Optional[np.ndarray] = None
    stage: str = ""
    elapsed: float = 0.0

    def format(self) -> str:
        """One line for a console or a dock's status: ``[stage] step/total message losses (elapsed s)``.

        Losses the message already spells out (an adaptation writes ``L_T=… R=… λ=… ETA``) and NaN
        placeholders (losses not computed in this run) are left out.
        """
        frac = f"{self.step}/{self.total}" if self.total else f"{self.step}"
        msg = self.message or ""
        losses = " ".join(f"{k}={v:.4g}" for k, v in self.losses.items()
                          if not any(a in msg for a in (f"{k}=",) + _SPELLED.get(k, ()))
                          and not (isinstance(v, float) and math.isnan(v)))
        stage = f"[{self.stage}] " if self.stage else ""
        return " ".join(part for part in (stage + frac, msg, losses, f"({self.elapsed:.1f}s)") if part)

    @property
    def fraction(self) -> Optional[float]:
        if not self.total:
            return None
        return min(1.0, max(0.0, self.step / self.total))


class CancelToken:
    """Thread-safe cancel flag. ``cancel()`` from any thread; jobs poll ``is_set()``."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    set = cancel

    def is_set(self) -> bool:
        return self._event.is_set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def reset(self) -> None:
        self._event.clear()


ProgressCallback = Callable[[Progress], Any]


def check_cancel(cancel) -> None:
    """Raise :class:`Cancelled` if ``cancel`` (token, Event or callable) is set."""
    if cancel is None:
        return
    if hasattr(cancel, "is_set"):
        flag = cancel.is_set()
    elif callable(cancel):
        flag = bool(cancel())
    else:
        flag = bool(cancel)
    if flag:
        raise Cancelled("cancelled by user")


class Reporter:
    """Small helper jobs use: ``rep = Reporter(progress, cancel, total)``; ``rep(step, msg, **losses)``.

    Each call first checks the cancel token, then sends a :class:`Progress` record.
    """

    def __init__(self, progress: Optional[ProgressCallback], cancel=None, total: Optional[int] = None,
                 stage: str = "") -> None:
        self.progress = progress
        self.cancel = cancel
        self.total = total
        self.stage = stage
        self.t0 = time.perf_counter()

    def __call__(self, step: int, message: str = "", preview=None, total=None, **losses) -> None:
        check_cancel(self.cancel)
        if self.progress is not None:
            self.progress(Progress(step=step, total=self.total if total is None else total,
                                   message=message, losses={k: float(v) for k, v in losses.items()},
                                   preview=preview, stage=self.stage,
                                   elapsed=time.perf_counter() - self.t0))

    def check(self) -> None:
        check_cancel(self.cancel)


# how messages spell some loss names (the adaptation writes "R=" for TV, "λ=" and "ETA")
_SPELLED = {"TV": ("R=",), "lambda": ("λ=",), "eta_s": ("ETA ",)}


def stderr_progress(min_interval: float = 0.5) -> ProgressCallback:
    """A progress callback printing one line to stderr at most every ``min_interval`` seconds."""
    last = [0.0]

    def _cb(p: Progress) -> None:
        now = time.perf_counter()
        final = p.total is not None and p.step >= p.total
        if now - last[0] < min_interval and not final:
            return
        last[0] = now
        print(p.format(), file=sys.stderr, flush=True)

    return _cb
