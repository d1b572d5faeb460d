"""The database clock's measurements of its offset (``clock.DatabaseClock``), with a local clock and a database
reading given by the test (no services)."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery_scheduller import clock


class _Connection:
    closed = 0

    def close(self) -> None:
        _Connection.closed += 1


def _clock(monkeypatch: Any, go: threading.Event | None = None) -> tuple[clock.DatabaseClock, list[float], list[str]]:
    local = [1_000.0]
    made = clock.DatabaseClock(local=lambda: local[0], resync=60)
    threads: list[str] = []

    def sync() -> None:  # a database reading: the test's own thread at once, another when ``go`` is set
        threads.append(threading.current_thread().name)
        if go is not None and threading.current_thread() is not threading.main_thread():
            go.wait(5)
        made.offset = 0.25 * len(threads)

    monkeypatch.setattr(made, "_sync", sync)
    monkeypatch.setattr("celery_scheduller.db.connection", lambda: _Connection())
    return made, local, threads


def test_the_offset_is_measured_in_the_callers_thread_and_again_after_the_resync_period(monkeypatch):
    made, local, threads = _clock(monkeypatch)
    assert made.now() == 1_000.25
    local[0] += 30
    assert made.now() == 1_030.25  # within the period: no new measurement
    local[0] += 31
    assert made.now() == 1_061.5
    assert threads == [threading.current_thread().name] * 2


def test_apart_a_later_measurement_runs_on_a_thread_of_its_own_and_the_caller_goes_on_with_the_last_offset(
    monkeypatch,
):
    go = threading.Event()
    made, local, threads = _clock(monkeypatch, go)
    made.apart = True
    assert made.now() == 1_000.25  # the first one: the caller needs it, in its own thread
    local[0] += 61
    closed = _Connection.closed
    assert made.now() == 1_061.25  # stale by a minute: the measurement is under way, not waited for
    go.set()
    deadline = time.monotonic() + 5
    while len(threads) < 2 or _Connection.closed == closed:
        assert time.monotonic() < deadline, "the clock was not measured again"
        time.sleep(0.002)
    assert threads == [threading.current_thread().name, "celery_scheduller-clock"]
    assert made.now() == 1_061.5  # the new offset, and no third measurement within the period
    assert len(threads) == 2 and _Connection.closed == closed + 1  # the thread's connection closed


def test_apart_a_measurement_still_under_way_is_not_started_again(monkeypatch):
    go = threading.Event()
    made, local, threads = _clock(monkeypatch, go)
    made.apart = True
    made.now()
    for _ in range(3):  # a database that does not answer for minutes
        local[0] += 61
        made.now()
    time.sleep(0.05)
    assert threads.count("celery_scheduller-clock") == 1  # one thread waits on it, not one a minute
    go.set()
