"""One persistent background thread that runs every piece of model work, in order.

The network, its device and the cuDNN/autotune state stay on one thread for the whole session
(a fresh thread per prediction re-pays the GPU warm-up). Callers get `concurrent.futures.Future`s and
poll them from their own event loop, so the worker never touches a GUI.

`submit_latest(key, ...)` is for previews that go stale: a request that has not started yet is
cancelled when a newer one with the same key arrives, so a stream of updates costs one computation
per idle moment instead of one per event.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional


@dataclass
class _Job:
    future: Future
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict = field(default_factory=dict)
    key: Optional[Hashable] = None


class InferenceWorker:
    """A single daemon thread that runs submitted callables first in, first out."""

    def __init__(self, name: str = "SAMMed3D-worker") -> None:
        self._queue: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._running: Optional[_Job] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue `fn(*args, **kwargs)`; its result or exception arrives through the returned future."""
        return self._enqueue(_Job(Future(), fn, args, kwargs))

    def submit_latest(self, key: Hashable, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Like `submit`, but first cancel any queued, not yet started job submitted with the same key."""
        if key is None:  # the key of every plain `submit` job: they would all be cancelled
            raise ValueError("submit_latest needs a key other than None; use submit() for a job without one.")
        job = _Job(Future(), fn, args, kwargs, key)
        with self._condition:
            stale = [queued for queued in self._queue if queued.key == key]
            for queued in stale:
                self._queue.remove(queued)
            self._append(job)
        _cancel(stale)
        return job.future

    @property
    def busy(self) -> bool:
        """Whether a job is running or waiting."""
        with self._condition:
            return self._running is not None or bool(self._queue)

    @property
    def pending(self) -> int:
        """How many jobs wait to start."""
        with self._condition:
            return len(self._queue)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def shutdown(self, wait: bool = True, cancel_pending: bool = True, timeout: Optional[float] = None) -> None:
        """Stop accepting work; cancel the queue (or let it drain) and, with `wait`, join the thread."""
        with self._condition:
            self._closed = True
            cancelled = list(self._queue) if cancel_pending else []
            if cancel_pending:
                self._queue.clear()
            self._condition.notify_all()
        _cancel(cancelled)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _enqueue(self, job: _Job) -> Future:
        with self._condition:
            self._append(job)
        return job.future

    def _append(self, job: _Job) -> None:
        """Queue `job`; the caller holds the lock."""
        if self._closed:
            raise RuntimeError("The SAMMed3D worker has been shut down: create a new one.")
        self._queue.append(job)
        self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
                self._running = job
            try:
                result = job.fn(*job.args, **job.kwargs)
            except BaseException as error:  # handed to the caller through the future
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
            finally:
                with self._condition:
                    self._running = None


def _cancel(jobs: list[_Job]) -> None:
    """Cancel jobs taken off the queue, outside the lock: a future runs its done-callbacks as it is cancelled,
    and a callback may submit again or wait for the worker.

    The worker never pops these jobs, so they are also marked notified here, as an executor does before it
    would run them: `concurrent.futures.wait()` and `as_completed()` see a cancelled future only then (they
    blocked until their timeout)."""
    for job in jobs:
        if job.future.cancel():  # always, for a job that never started
            job.future.set_running_or_notify_cancel()
