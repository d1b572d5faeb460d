"""Retention: ended alarms kept past KEEP_FINISHED (with their attempt history) and Django Tasks results past
their RESULT_TTL are removed at least as fast as they end.

A pass deletes PRUNE_BATCH rows per statement, oldest first, one short transaction each, back to back
until a batch comes back short: it has caught up, and the next pass starts PRUNE_INTERVAL later. A pass
still deleting after PRUNE_INTERVAL has not caught up: it logs how far behind it is (``prune_behind``) and
the next pass starts at once. So the rows kept level off near ``rate × KEEP_FINISHED`` at any rate the
database can delete, and ``scheduller_status`` shows what waits to be pruned.

Beat runs one ``Pruner``. On PostgreSQL and MariaDB its passes run in a thread of their own, on a
connection of their own, so beat's claims and publishes never wait for them; on SQLite (one writer at a
time) they run inside beat's tick. ``scheduller_prune`` deletes with the same statements by hand, with a cut-off
and a batch size of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from . import db, observe
from .clock import to_datetime
from .conf import settings
from .store import Store

logger = logging.getLogger("celery_scheduller")

#: Seconds between two statements of a pass: the database serves claims and answers between them.
BATCH_PAUSE = 0.002
#: ``prune_backlog`` counts at most this many rows when reporting a pass that fell behind.
BACKLOG_COUNT_LIMIT = 1_000_000


@dataclasses.dataclass
class PassReport:
    """What one pass removed, and whether it caught up."""

    alarms: int = 0
    task_records: int = 0
    batches: int = 0
    seconds: float = 0.0
    caught_up: bool = True
    #: when it did not catch up: the ended alarms still older than KEEP_FINISHED (at most
    #: BACKLOG_COUNT_LIMIT counted) and how long before the cut-off the oldest of them ended
    behind_rows: int = 0
    behind_seconds: float = 0.0

    @property
    def removed(self) -> int:
        return self.alarms + self.task_records


class Pruner:
    """Removes what retention says has to go; ``due(now)`` asks for a pass (beat calls it every PRUNE_INTERVAL)."""

    def __init__(
        self,
        store: Store,
        serves_task_records: Callable[[], bool],
        background: bool | None = None,
    ) -> None:
        self.store = store
        self._serves_task_records = serves_task_records
        self._background = background
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._asked = (0.0, 0.0)  # (now given to the last ``due``, monotonic time then)
        #: the last pass's report, and the totals since the process started
        self.last: PassReport | None = None
        self.total_alarms = 0
        self.total_task_records = 0

    # -- the passes ---------------------------------------------------------------------------------------------

    def run_pass(self, now: float, time_limit: float | None = None) -> PassReport:
        """Delete batch after batch of what ended before ``now − KEEP_FINISHED`` (and expired results) until a
        batch comes back short, or ``time_limit`` seconds (default PRUNE_INTERVAL) of real time are spent."""
        limit = settings.integer("PRUNE_BATCH")
        budget = settings.integer("PRUNE_INTERVAL") / 1000 if time_limit is None else time_limit
        keep = settings.keep_finished()
        before = None if keep is None else to_datetime(now) - keep
        tasks = self._serves_task_records()
        report = PassReport()
        started = time.monotonic()
        alarms_left, records_left = before is not None, tasks
        while alarms_left or records_left:
            if alarms_left and before is not None:
                pruned = self.store.prune(before, limit)
                observe.pruned(pruned)
                report.alarms += pruned
                alarms_left = pruned >= limit
            if records_left:
                pruned = self.store.prune_task_records(to_datetime(now), limit)
                report.task_records += pruned
                records_left = pruned >= limit
            report.batches += 1
            if self._stopped.is_set():  # beat is stopping: the rest waits for the next beat's passes
                break
            if (alarms_left or records_left) and time.monotonic() - started >= budget:
                report.caught_up = False
                break
            if alarms_left or records_left:
                time.sleep(BATCH_PAUSE)
        report.seconds = time.monotonic() - started
        if not report.caught_up and before is not None and alarms_left:
            report.behind_rows, oldest = self.store.prune_backlog(before, BACKLOG_COUNT_LIMIT)
            report.behind_seconds = 0.0 if oldest is None else (before - oldest).total_seconds()
        self._note(report)
        return report

    def _note(self, report: PassReport) -> None:
        self.last = report
        self.total_alarms += report.alarms
        self.total_task_records += report.task_records
        if report.removed:
            logger.info(
                "pruned %s ended alarms and %s expired task results in %s batches (%.3f s)",
                report.alarms,
                report.task_records,
                report.batches,
                report.seconds,
                extra={"action": "pruned", "count": report.removed},
            )
        if not report.caught_up:
            logger.warning(
                "pruning is behind: %s ended alarms older than KEEP_FINISHED remain, the oldest %.0f s past it; "
                "the next pass starts at once (raise PRUNE_BATCH, or see the operating guide)",
                report.behind_rows,
                report.behind_seconds,
                extra={"action": "prune_behind", "count": report.behind_rows},
            )

    # -- beat's side --------------------------------------------------------------------------------------------

    def background(self) -> bool:
        """Whether passes run in a thread of their own: on a database that takes writes side by side."""
        if self._background is None:
            self._background = db.vendor() != "sqlite"
        return self._background

    def due(self, now: float) -> None:
        """A pass is due: run it now (SQLite), or wake the pruning thread (a pass under way goes on)."""
        if not self.background():
            self.run_pass(now)
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="celery_scheduller-pruner", daemon=True)
            self._thread.start()
        self._asked = (now, time.monotonic())
        self._wake.set()

    def _now(self) -> float:
        """The time of the last ``due`` (beat's clock), moved on by the real time since."""
        asked, at = self._asked
        return asked + (time.monotonic() - at)

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                self._wake.wait()
                self._wake.clear()
                if self._stopped.is_set():
                    break
                try:
                    while not self._stopped.is_set() and not self.run_pass(self._now()).caught_up:
                        pass  # behind: the next pass at once
                except Exception:
                    logger.exception("pruning failed; the next pass tries again", extra={"action": "prune_error"})
        finally:
            db.connection().close()  # this thread's own connection

    def close(self, timeout: float = 10.0) -> None:
        """Stop the pruning thread after its current statement."""
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
