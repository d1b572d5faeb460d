"""Per-minute activity of each process, for the admin's dashboard: published, finished, retried, failed,
cancelled, error answers and a histogram of task start lateness.

Every process counts in memory and writes its own rows (``models.ActivityMinute``, one per process and
minute) every ``ACTIVITY_INTERVAL`` from a thread of its own, and when it stops. No two processes
write the same row, so the hot path never waits on a lock: a process's figures reach the dashboard at
most ``ACTIVITY_INTERVAL`` late. Beat removes rows older than ``KEEP``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from typing import Any

logger = logging.getLogger("celery_scheduller")

#: Upper bounds (seconds) of the start-lateness buckets; one more bucket counts what is above the last.
LATENESS_BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
#: How long the rows are kept.
KEEP = dt.timedelta(days=1)
COUNTERS = ("published", "finished", "retried", "failed", "cancelled", "errors")


def bucket_of(seconds: float) -> int:
    """The index of the lateness bucket ``seconds`` falls in."""
    for index, bound in enumerate(LATENESS_BOUNDS):
        if seconds <= bound:
            return index
    return len(LATENESS_BOUNDS)


def quantile(buckets: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` of ``buckets`` (None when empty; for the last,
    open bucket, the last bound): what the dashboard shows as p50 and p99."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank and count:
            return LATENESS_BOUNDS[min(index, len(LATENESS_BOUNDS) - 1)]
    return LATENESS_BOUNDS[-1]


class Recorder:
    """This process's counts per minute, written by a daemon thread (started on first use, again after a fork)."""

    def __init__(self, interval: float | None = None) -> None:
        #: seconds between writes; None: ACTIVITY_INTERVAL
        self.interval = interval
        self._lock = threading.Lock()
        self._minutes: dict[dt.datetime, dict[str, Any]] = {}
        self._dirty: set[dt.datetime] = set()
        self._pid = 0
        self._thread: threading.Thread | None = None
        self.source = ""

    def count(self, what: str, n: int = 1, at: float | None = None) -> None:
        """Add ``n`` to counter ``what`` (one of ``COUNTERS``) of the current minute."""
        with self._lock:
            self._row(at)[what] += n

    def lateness(self, seconds: float, at: float | None = None) -> None:
        """A task started ``seconds`` after its due time."""
        with self._lock:
            self._row(at)["lateness"][bucket_of(seconds)] += 1

    def _row(self, at: float | None) -> dict[str, Any]:
        if self._pid != os.getpid():
            self._forked()
        moment = time.time() if at is None else at
        minute = dt.datetime.fromtimestamp(moment - moment % 60, dt.UTC)
        row = self._minutes.get(minute)
        if row is None:
            row = self._minutes[minute] = {**dict.fromkeys(COUNTERS, 0), "lateness": [0] * (len(LATENESS_BOUNDS) + 1)}
        self._dirty.add(minute)
        return row

    def _forked(self) -> None:
        # a new process (or a pool process forked with its parent's counts): count afresh, write from a new thread
        self._pid = os.getpid()
        self._minutes, self._dirty = {}, set()
        self.source = f"{socket.gethostname()}:{self._pid}"[:255]
        self._thread = threading.Thread(target=self._loop, name="celery_scheduller-activity", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from .conf import settings

        while True:
            time.sleep(self.interval or (settings.get("ACTIVITY_INTERVAL") or 10_000) / 1000)
            self.flush()

    def flush(self) -> None:
        """Write the minutes counted since the last write; minutes over a while ago are then forgotten."""
        from . import db
        from .models import ActivityMinute

        with self._lock:
            dirty = {minute: _copy(self._minutes[minute]) for minute in self._dirty}
            self._dirty = set()
            source = self.source
            horizon = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
            for minute in [m for m in self._minutes if m < horizon and m not in dirty]:
                del self._minutes[minute]
        if not dirty:
            return
        try:
            for minute, row in sorted(dirty.items()):
                ActivityMinute.objects.update_or_create(minute=minute, source=source, defaults=row)
        except Exception:
            with self._lock:
                self._dirty |= set(dirty)  # written next time
            logger.warning("writing the activity counts failed", exc_info=True, extra={"action": "activity_error"})
        finally:
            if threading.current_thread() is self._thread:
                db.connection().close()

    def flush_at_exit(self) -> None:
        """Write what is counted now (beat or a worker process is stopping); the thread goes on until the
        process exits."""
        if self._pid == os.getpid():
            self.flush()


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "lateness": list(row["lateness"])}


default = Recorder()


def remove_old(now: dt.datetime) -> int:
    """Remove rows older than KEEP (beat, with its record)."""
    from .models import ActivityMinute

    removed, _ = ActivityMinute.objects.filter(minute__lt=now - KEEP).delete()
    return removed
