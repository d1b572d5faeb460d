"""The worker's response writer: one thread per worker process stores what its tasks' ``service_responded``
decided, on a database connection of its own.

Why a thread of its own:

- Celery's Django fixup closes the task's database connections before and after every task (with
  prefork and Django's pool it closes the pool), so a write from the task itself reconnects per task;
  the writer's connection belongs to the writer's thread, which the fixup never touches, and lives as
  long as the worker process (its statements stay prepared).
- The task thread hands the decision over and returns to Celery at once. Where the tasks run in the process
  that holds alarms until their time (``-P threads``), a store waits for a gap between their due times
  (``before_store``, set by ``prefetch``), so the process is free when each comes due. The writer waits
  ``RESPONSE_BATCH_WAIT`` (50 ms) after a decision and stores it with those that came meanwhile
  (``responses.store_many``: on PostgreSQL every ``Retry`` in one statement, and every ``OK`` in another
  without history): a busy worker spends less than one round trip and one thread wake-up per task.

What it changes: the response is stored up to ``RESPONSE_BATCH_WAIT`` after the task's ``task_postrun``
(the attempt's deadline guards it as before), and ``alarm_responded`` / ``alarm_finished`` /
``alarm_retried`` are sent from the writer thread. A decision the process did not store before it died
(``kill -9``) is answered by beat as a timeout after ``dispatch_timeout``: delivered again, at least once.
Queued decisions are stored before a worker process exits normally (``stop``).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .responses import Decided

logger = logging.getLogger("celery_scheduller")

#: At most this many decisions are stored by one call of ``responses.store_many``.
BATCH = 500


class _Stop(threading.Event):
    """Queued by ``stop``: store what came before, close the connection, end the thread."""


class ResponseWriter:
    """Stores ``Decided`` responses from a thread of its own; started on first use in each process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._queue: queue.SimpleQueue[Decided | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: called (in the writer's thread) before each store; the worker's guard sets it (``prefetch``)
        self.before_store: Callable[[], None] | None = None

    def submit(self, decided: Decided) -> None:
        """Queue ``decided`` for storing; returns at once."""
        if not self._running():  # first use, a forked child (the parent's thread is not here), or stopped
            self._start()
        self._queue.put(decided)

    def warm(self) -> None:
        """Start the writer's thread and connect it now (at a worker's start), not with the first response."""
        if not self._running():
            self._start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is stored; False if ``timeout`` passed first."""
        return self._mark(threading.Event(), timeout)

    def stop(self, timeout: float = 30.0) -> bool:
        """Store everything queued so far, close the writer's connection and end its thread (the next
        ``submit`` starts another); False if ``timeout`` passed first."""
        with self._lock:
            stopped = self._mark(_Stop(), timeout)
            self._pid = None
            return stopped

    def _mark(self, marker: threading.Event, timeout: float) -> bool:
        if not self._running():
            return True
        self._queue.put(marker)
        return marker.wait(timeout)

    def _running(self) -> bool:
        return self._pid == os.getpid() and self._thread is not None and self._thread.is_alive()

    def _start(self) -> None:
        with self._lock:
            if self._running():
                return
            if self._pid != os.getpid():  # a forked child leaves the parent's queued decisions to it
                self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name="celery_scheduller-writer", daemon=True
            )
            self._thread.start()
            self._pid = os.getpid()

    def _run(self, pending: queue.SimpleQueue[Decided | threading.Event]) -> None:
        from . import db

        own_connection()
        connect()
        stops: list[threading.Event] = []
        while not stops or not pending.empty():  # once stopping, also what was submitted meanwhile
            batch = [pending.get()]
            if not stops and not isinstance(batch[0], threading.Event):
                time.sleep(_batch_wait())  # let the responses of the next tasks join this one
            while len(batch) < BATCH:
                try:
                    batch.append(pending.get_nowait())
                except queue.Empty:
                    break
            decisions = [item for item in batch if not isinstance(item, threading.Event)]
            if decisions:
                if not stops and self.before_store is not None:
                    self.before_store()  # the worker's: not as a held alarm comes due
                self._store(decisions)
            for item in batch:
                if isinstance(item, _Stop):
                    stops.append(item)
                elif isinstance(item, threading.Event):
                    item.set()
        db.connection().close()
        for stop in stops:
            stop.set()

    def _store(self, decisions: Sequence[Decided]) -> None:
        from . import db, responses

        for last_try in (False, True):
            try:
                responses.store_many(decisions)
                return
            except Exception:
                # Most often a connection the server dropped while idle: reconnect and store again.
                # Every write names the attempt it answers, so what the first try stored is not stored
                # twice (it is logged as ignored). Left unstored, the attempts time out and are retried.
                db.connection().close()
                if last_try:
                    logger.exception(
                        "storing %d responses failed; their attempts will time out and be delivered again",
                        len(decisions),
                        extra={"action": "hook_error", "alarm_ids": [d.answered.id for d in decisions][:20]},
                    )


@functools.cache
def serves() -> bool:
    """Whether decisions go through the process's response writer: on every database but SQLite, whose
    single writer lock a second connection per process would only contend for."""
    from . import db

    return db.vendor() != "sqlite"


def own_connection() -> None:
    """Give the calling thread a database connection outside Django's connection pool (Django 5.1+,
    ``OPTIONS["pool"]``). The pool is shared by the process's threads, and Celery's Django fixup closes
    it around every task in a prefork child: a writer that drew from it would find it closed when it
    connects (``PoolClosed``) and lose the batch. Without a pool configured, the thread's own connection
    is already its own."""
    import copy

    from django.db import connections

    from . import db

    alias = db.alias()
    current = connections[alias]
    if not current.settings_dict.get("OPTIONS", {}).get("pool"):
        return
    settings_dict = copy.deepcopy(current.settings_dict)
    settings_dict["OPTIONS"].pop("pool")
    connections[alias] = type(current)(settings_dict, alias)  # this thread only


def connect() -> None:
    """Open the calling thread's connection ahead of its first statement; a failure is left to that statement
    (which reconnects)."""
    from . import db

    try:
        db.connection().ensure_connection()
    except Exception:
        logger.warning("cannot connect to the database yet; the first statement tries again", exc_info=True)


def _batch_wait() -> float:
    """``RESPONSE_BATCH_WAIT`` in seconds; its default where it is invalid (the system check reports it)."""
    from .conf import DEFAULTS, settings
    from .exceptions import ConfigurationError

    try:
        return settings.response_batch_wait() / 1000
    except ConfigurationError:
        return float(DEFAULTS["RESPONSE_BATCH_WAIT"]) / 1000


#: The writer of this process.
default = ResponseWriter()
