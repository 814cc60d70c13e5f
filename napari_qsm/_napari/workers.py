"""Running core jobs from napari without freezing it.

:func:`run_job` is a generator for napari's ``thread_worker``: it runs ``job(progress)`` (a
blocking core call that reports :class:`~napari_qsm.core.progress.Progress` records) in a helper
thread and yields those records as they arrive, plus ``None`` heartbeats every ``poll`` seconds so
that a worker ``quit()`` is honoured even while a solver is silent. When the generator is closed
or the worker quits, the job's :class:`~napari_qsm.core.progress.CancelToken` is set and the core
raises ``Cancelled`` at its next check. The job's return value becomes the worker's return value;
its exception is re-raised in the worker (→ the ``errored`` signal).

:class:`JobRunner` wraps this for a dock widget: one job at a time, a napari progress bar fed by
the records, callbacks on the main thread, registration with the viewer window so that closing
napari cancels the run.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Optional

from ..core.progress import Cancelled, CancelToken, Progress

_DONE = object()


class JobFailed(Exception):
    """A job's exception, carried out of the worker (``original`` is the real one).

    superqt's generator worker treats a RuntimeError raised by the generator as "worker deleted"
    and drops it silently (no ``errored``, no ``finished``); torch reports many failures (e.g. out
    of memory) as RuntimeError, so every job error is wrapped.
    """

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


def run_job(job: Callable[[Callable[[Progress], None]], Any], token: CancelToken, poll: float = 0.1,
            min_interval: float = 0.05):
    """Generator: run ``job(progress_callback)`` in a helper thread; yield Progress / None; return its result."""
    q: "queue.Queue" = queue.Queue()
    box: dict = {}

    def target():
        try:
            box["result"] = job(q.put)
        except BaseException as exc:  # noqa: BLE001 - handed to the worker thread
            box["error"] = exc
        finally:
            q.put(_DONE)

    t = threading.Thread(target=target, name="napari-qsm-job", daemon=True)
    t.start()
    last_emit = 0.0
    try:
        done = False
        while not done:
            try:
                item = q.get(timeout=poll)
            except queue.Empty:
                yield None
                continue
            latest = None
            history = []
            while True:  # coalesce a burst of records; keep the latest, and every loss record
                if item is _DONE:
                    done = True
                    break
                latest = item
                if getattr(item, "losses", None):
                    history.append(item)
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            if latest is not None:
                if len(history) > 1:
                    latest.history = history  # type: ignore[attr-defined]
                now = time.perf_counter()
                if done or now - last_emit >= min_interval or history:
                    last_emit = now
                    yield latest
    finally:
        if t.is_alive():
            token.cancel()
            t.join(timeout=30)
    if "error" in box:
        err = box["error"]
        if isinstance(err, Cancelled):
            raise Cancelled(str(err))
        raise JobFailed(err) from err
    return box.get("result")


class JobRunner:
    """One background job at a time for a dock widget.

    ``start(job, on_result=..., description=...)`` runs ``job(progress_cb)`` (called with the
    cancel token available as ``runner.token``) in a napari generator worker. Callbacks run on
    the main thread: ``on_progress(Progress)``, ``on_result(value)``, ``on_error(exc)``,
    ``on_cancelled()``, ``on_finished()``.
    """

    def __init__(self, viewer=None, provider: str = "napari-qsm") -> None:
        self.viewer = viewer
        self.provider = provider
        self.worker = None
        self.token: Optional[CancelToken] = None
        self.pbar = None
        self._task_id = None
        self._cancel_requested = False
        self._detached = False

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, job, *, description: str, on_progress=None, on_result=None, on_error=None,
              on_cancelled=None, on_finished=None, total: Optional[int] = None) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.worker is not None:
            raise RuntimeError("a job is already running")
        token = CancelToken()
        self.token = token
        self._cancel_requested = False
        self._detached = False
        worker = create_worker(run_job, job, token, _start_thread=False, _ignore_errors=True)
        self.worker = worker
        self.pbar = progress(total=total or 0, desc=description)
        worker.aborted.connect(token.cancel)  # quit() → cancel the core job

        over = []  # set once the job has ended: progress delivered late (re-entrantly, while a handler
        # processes events, e.g. napari's progress widget) must not overwrite what the result handler showed

        def _yielded(p):
            if p is None or self.worker is not worker or self._detached or over:
                return
            self._update_pbar(p)  # napari's progress widget may process events: the job can end in there
            if on_progress is not None and not over:
                on_progress(p)

        def _returned(value):
            over.append(True)
            if self.worker is not worker or self._detached:
                return
            if on_result is not None:
                on_result(value)

        def _errored(exc):
            over.append(True)
            if self._detached:
                return
            if isinstance(exc, Cancelled) or self._cancel_requested:
                if on_cancelled is not None:
                    on_cancelled()
                return
            if on_error is not None:
                on_error(getattr(exc, "original", exc))

        def _aborted():
            over.append(True)
            if on_cancelled is not None and not self._detached:
                on_cancelled()

        def _finished():
            if self.worker is worker:
                self._cleanup()
            if on_finished is not None and not self._detached:
                on_finished()

        worker.yielded.connect(_yielded)
        worker.returned.connect(_returned)
        worker.errored.connect(_errored)
        worker.aborted.connect(_aborted)
        worker.finished.connect(_finished)
        self._register_task(description)
        worker.start()

    def cancel(self, detach: bool = False) -> None:
        """Ask the running job to stop (returns at once; the core stops within about a second).

        ``detach``: the owner is going away (dock or viewer closed): no callbacks any more.
        """
        if self.worker is None:
            return
        self._cancel_requested = True
        if detach:
            self._detached = True
        if self.token is not None:
            self.token.cancel()
        self.worker.quit()
        if self.pbar is not None:
            self.pbar.set_description("cancelling…")

    def wait(self, timeout: float = 30.0) -> None:
        """Block (processing no events) until the helper thread is gone; for shutdown paths."""
        if self.worker is not None:
            self.worker.await_workers(msecs=int(timeout * 1000))

    def _update_pbar(self, p: Progress) -> None:
        if self.pbar is None:
            return
        try:
            if p.total and self.pbar.total != p.total:
                self.pbar.total = int(p.total)
            if p.total:
                delta = min(int(p.step), int(p.total)) - int(self.pbar.n)
                if delta:
                    self.pbar.update(delta)  # emits the event the Qt progress bar listens to
            msg = p.message or p.stage
            if msg:
                self.pbar.set_description(msg[:80])
            self.pbar.refresh()
        except Exception:  # a progress bar problem must never break the run
            pass

    def _register_task(self, description: str) -> None:
        # napari 0.9 has no public API for this yet: the window's task-status registry is what makes
        # napari ask before closing and cancel the run when it closes (private, so guarded).
        window = getattr(self.viewer, "window", None)
        if window is None:
            return
        try:
            from napari.utils.task_status import Status

            me = weakref.ref(self)  # napari's task registry keeps its items (and callbacks) for good: a strong
            # reference here kept every dock's runner, and through it the viewer, alive after napari closed it

            def _cancel_cb():  # napari is closing the window
                runner = me()
                if runner is not None:
                    runner.cancel(detach=True)
                return True

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self._task_id = window._register_task_status(self.provider, Status.BUSY, description,
                                                             cancel_callback=_cancel_cb)
        except Exception:
            self._task_id = None

    def _cleanup(self) -> None:
        if self.pbar is not None:
            try:
                self.pbar.close()
            except Exception:
                pass
        self.pbar = None
        if self._task_id is not None:
            try:
                from napari.utils.task_status import Status
                status = Status.CANCELLED if self._cancel_requested else Status.COMPLETED
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    self.viewer.window._update_task_status(self._task_id, status)
            except Exception:
                pass
        self._task_id = None
        self.worker = None
