"""The inference worker: one thread, first in first out, latest-request-wins previews, clean shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, as_completed, wait

import pytest

from SAMMed3DLib.worker import InferenceWorker

TIMEOUT = 10


@pytest.fixture
def worker():
    worker = InferenceWorker()
    yield worker
    worker.shutdown(wait=True, timeout=TIMEOUT)


def blocker(worker: InferenceWorker):
    """Occupy the worker until the returned event is set, so that later jobs stay queued."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(TIMEOUT)

    future = worker.submit(hold)
    assert started.wait(TIMEOUT)
    return release, future


def test_results_come_back_through_futures_in_submission_order(worker):
    seen = []
    futures = [worker.submit(lambda n=n: seen.append(n) or n * n) for n in range(20)]
    assert [f.result(TIMEOUT) for f in futures] == [n * n for n in range(20)]
    assert seen == list(range(20))


def test_all_jobs_run_on_the_one_worker_thread(worker):
    threads = {worker.submit(threading.get_ident).result(TIMEOUT) for _ in range(5)}
    assert threads == {worker.thread.ident}
    assert worker.thread.ident != threading.get_ident()


def test_arguments_and_keywords_are_passed(worker):
    assert worker.submit(lambda a, b, c=0: (a, b, c), 1, 2, c=3).result(TIMEOUT) == (1, 2, 3)


def test_exceptions_reach_the_caller_and_the_worker_keeps_going(worker):
    def fail():
        raise ValueError("bad click")

    failed = worker.submit(fail)
    with pytest.raises(ValueError, match="bad click"):
        failed.result(TIMEOUT)
    assert worker.submit(lambda: "still alive").result(TIMEOUT) == "still alive"


def test_submit_latest_cancels_the_queued_request_with_the_same_key(worker):
    release, running = blocker(worker)
    ran = []
    first = worker.submit_latest("preview", ran.append, 1)
    other = worker.submit_latest("other", ran.append, "x")
    second = worker.submit_latest("preview", ran.append, 2)
    third = worker.submit_latest("preview", ran.append, 3)
    assert first.cancelled() and second.cancelled()
    assert worker.pending == 2
    release.set()
    third.result(TIMEOUT)
    other.result(TIMEOUT)
    running.result(TIMEOUT)
    assert ran == ["x", 3]
    with pytest.raises(CancelledError):
        first.result(0)


def test_a_cancelled_request_s_callback_may_submit_again_or_wait_for_the_worker(worker):
    """Futures run their done-callbacks as they are cancelled: that happens outside the worker's lock."""
    release, running = blocker(worker)
    ran = []
    superseded = worker.submit_latest("preview", ran.append, "first")
    superseded.add_done_callback(lambda future: worker.submit_latest("preview", ran.append, "again"))
    waited = []
    superseded.add_done_callback(lambda future: waited.append(worker.busy))  # takes the worker's lock
    worker.submit_latest("preview", ran.append, "second")
    assert worker.pending == 1 and waited == [True]  # "again" replaced "second": still one per key
    release.set()
    worker.submit(lambda: None).result(TIMEOUT)
    assert ran == ["again"]


def test_submit_latest_does_not_cancel_a_running_request(worker):
    started, release = threading.Event(), threading.Event()

    def slow_preview():
        started.set()
        release.wait(TIMEOUT)
        return "old"

    running = worker.submit_latest("preview", slow_preview)
    assert started.wait(TIMEOUT)
    newer = worker.submit_latest("preview", lambda: "new")
    assert not running.cancelled()
    release.set()
    assert running.result(TIMEOUT) == "old"
    assert newer.result(TIMEOUT) == "new"


def test_busy_reflects_running_and_queued_work(worker):
    assert not worker.busy
    release, running = blocker(worker)
    assert worker.busy
    release.set()
    running.result(TIMEOUT)
    worker.submit(lambda: None).result(TIMEOUT)
    for _ in range(100):
        if not worker.busy:
            break
        threading.Event().wait(0.01)
    assert not worker.busy


def test_shutdown_cancels_queued_jobs_finishes_the_running_one_and_stops_the_thread():
    worker = InferenceWorker()
    release, running = blocker(worker)
    queued = worker.submit(lambda: "never")
    threading.Timer(0.05, release.set).start()
    worker.shutdown(wait=True, timeout=TIMEOUT)
    assert queued.cancelled()
    assert running.done() and not running.cancelled()
    assert not worker.thread.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(lambda: None)


def test_shutdown_can_let_the_queue_drain():
    worker = InferenceWorker()
    release, _ = blocker(worker)
    queued = [worker.submit(lambda n=n: n) for n in range(3)]
    threading.Timer(0.05, release.set).start()
    worker.shutdown(wait=True, cancel_pending=False, timeout=TIMEOUT)
    assert [f.result(0) for f in queued] == [0, 1, 2]
    assert not worker.thread.is_alive()


def test_a_future_cancelled_by_the_caller_is_skipped(worker):
    release, _ = blocker(worker)
    ran = []
    skipped = worker.submit(ran.append, "skipped")
    assert skipped.cancel()
    kept = worker.submit(ran.append, "kept")
    release.set()
    kept.result(TIMEOUT)
    assert ran == ["kept"]


def test_submit_latest_without_a_key_is_refused_as_it_would_cancel_every_plain_job():
    worker = InferenceWorker()
    try:
        with pytest.raises(ValueError, match="needs a key other than None"):
            worker.submit_latest(None, lambda: 1)
    finally:
        worker.shutdown()


def test_superseded_and_dropped_requests_finish_for_wait_and_as_completed():
    worker = InferenceWorker()
    gate = threading.Event()
    try:
        worker.submit(gate.wait)  # keeps the queue waiting
        superseded = worker.submit_latest("preview", lambda: 1)
        worker.submit_latest("preview", lambda: 2)
        assert superseded.cancelled()
        assert wait([superseded], timeout=1).done == {superseded}  # it blocked until the timeout
        assert list(as_completed([superseded], timeout=1)) == [superseded]
        dropped = worker.submit(lambda: 3)
        worker.shutdown(wait=False)
        assert dropped.cancelled() and wait([dropped], timeout=1).done == {dropped}
    finally:
        gate.set()
        worker.shutdown(timeout=5)
