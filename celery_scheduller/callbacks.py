"""Beat's callback runner: ``service_responded`` for timed-out attempts, off beat's publishing loop.

Beat leases overdue attempts in its loop and hands each to this runner. A few threads call the owner's
``service_responded``, timing each call; their decisions are stored through the process's response writer
(batched as a worker's are). A call that runs past ``CALLBACK_BUDGET`` is answered as a failed callback
(back-off, then ``failed`` at ``CALLBACK_MAX_FAILURES``) and its thread replaced, so a slow or hanging
callback delays its own alarm only: never publishing, never another alarm's answer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
import time

from . import observe, responses, writer
from .conf import settings
from .message import Message, Response
from .wire import AttemptRef

logger = logging.getLogger("celery_scheduller")

#: Threads that call ``service_responded``, and how many more may be started to replace ones held past
#: their budget (a hung callback keeps its thread; past this many the runner stops replacing them).
THREADS = 4
SPARE_THREADS = 32


@dataclasses.dataclass(eq=False)
class _Job:
    ref: AttemptRef
    message: Message
    response: Response
    now: dt.datetime
    started: float | None = None
    abandoned: bool = False


class CallbackRunner:
    """Runs ``service_responded`` for overdue attempts in threads of its own, each call within a budget."""

    def __init__(self, threads: int = THREADS) -> None:
        self._size = threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[int, _Job] = {}  # by alarm pk: queued or running
        self._threads: dict[threading.Thread, _Job | None] = {}
        self._abandoned = 0

    def submit(self, ref: AttemptRef, message: Message, response: Response, now: dt.datetime) -> bool:
        """Queue ``service_responded`` for ``ref``; False when one for that alarm is queued or running."""
        with self._lock:
            if ref.pk in self._pending:
                return False
            job = self._pending[ref.pk] = _Job(ref, message, response, now)
            if len([t for t, j in self._threads.items() if t.is_alive()]) - self._abandoned < self._size:
                self._start()
        self._jobs.put(job)
        return True

    def busy(self) -> int:
        """Calls queued or running."""
        with self._lock:
            return len(self._pending)

    def watch(self, now: dt.datetime) -> int:
        """Answer calls running past CALLBACK_BUDGET as failed callbacks and replace their threads; returns
        how many were answered so."""
        budget = settings.integer("CALLBACK_BUDGET") / 1000
        late: list[_Job] = []
        with self._lock:
            for job in list(self._threads.values()):
                if job is None or job.abandoned or job.started is None:
                    continue
                if time.monotonic() - job.started > budget:
                    job.abandoned = True
                    self._abandoned += 1
                    self._pending.pop(job.ref.pk, None)
                    late.append(job)
                    if self._abandoned <= SPARE_THREADS:
                        self._start()
                    else:
                        logger.error("%s service_responded calls hang; no thread replaces them", self._abandoned)
        for job in late:
            reason = f"service_responded ran longer than CALLBACK_BUDGET ({budget * 1000:.0f} ms)"
            observe.callback(job.ref.scheduller, budget, failed=True)
            logger.error(
                "alarm %s: %s; answered as a failed callback",
                job.ref.message_id,
                reason,
                extra={"alarm_id": job.ref.message_id, "action": "callback_overran"},
            )
            self._store(responses.callback_failed(job.ref, job.message.with_response(job.response), now, reason))
        return len(late)

    def close(self, timeout: float = 10.0) -> None:
        """Let queued calls finish (up to ``timeout`` s), then end the threads."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="celery_scheduller-callbacks", daemon=True)
        self._threads[thread] = None
        thread.start()

    def _run(self) -> None:
        from . import db

        me = threading.current_thread()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                with self._lock:
                    job.started = time.monotonic()
                    self._threads[me] = job
                try:
                    decided = responses.decide(job.ref, job.message, job.response, job.now)
                finally:
                    took = time.monotonic() - job.started
                    with self._lock:
                        self._threads[me] = None
                        abandoned = job.abandoned
                        if not abandoned:
                            self._pending.pop(job.ref.pk, None)
                logger.debug(
                    "service_responded for alarm %s took %.3f s",
                    job.ref.message_id,
                    took,
                    extra={"alarm_id": job.ref.message_id, "action": "callback", "seconds": took},
                )
                if abandoned:  # answered as overrun already; this thread was replaced
                    with self._lock:
                        self._abandoned -= 1
                    return
                self._store(decided)
        finally:
            with self._lock:
                self._threads.pop(me, None)
            db.connection().close()

    def _store(self, decided: responses.Decided) -> None:
        try:
            if writer.serves():
                writer.default.submit(decided)
            else:
                responses.store_many([decided])
        except Exception:
            logger.exception(
                "storing the answer to a timeout of alarm %s failed; it is answered again after TIMEOUT_LEASE",
                decided.answered.id,
                extra={"alarm_id": decided.answered.id, "action": "error"},
            )
