"""Beat's alarm loop: load windows, claim what is due, publish it, answer overdue attempts.

``AlarmEngine.tick(now, producer)`` is one pass; it reads no clock itself. The beat shell
(``schedulers.AlarmScheduler``) reads the clock once per tick and handles errors around it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from . import registry, responses, signals, store
from .conf import settings
from .hooks import header_of, task_id_of
from .message import Message, Response
from .planning import DueHeap, Window, next_wakeup
from .scheduller import known_tasks

logger = logging.getLogger("celery_scheduller")


class PublishFailed(Exception):
    """The broker refused a publish; the claimed attempts were released to pending."""


def to_datetime(moment: float) -> dt.datetime:
    """An epoch timestamp as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(moment, dt.UTC)


def _half_spent(ref: store.AttemptRef, timeout_ms: int) -> float:
    """When half of an attempt's response time is gone (epoch seconds)."""
    return ref.deadline.timestamp() - timeout_ms / 2000


class AlarmEngine:
    """The alarm side of one beat process: the loaded windows and the heap of due times."""

    def __init__(
        self,
        app: Celery,
        names: Callable[[], Sequence[str]] = registry.names,
        name: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.app = app
        self._names = names
        # read while publishing a batch, to stop before the rest of it would go out half expired
        self._clock = clock or time.time
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.heap = DueHeap()
        self.windows: dict[str, Window] = {}
        self.next_poll_at = float("-inf")
        self.next_record_at = float("-inf")
        self.next_prune_at = float("-inf")
        self.started_at: float | None = None
        self.published = 0
        self.timeouts = 0

    def tick(self, now: float, producer: Any) -> float:
        """One pass at ``now`` (epoch seconds); returns the seconds until the next pass is needed."""
        names = self._names()
        if not names:
            return settings.positive_ms("POLL_INTERVAL") / 1000
        for name in names:
            self._load_window(name, now)
        polling = now >= self.next_poll_at
        more = False
        if self.heap.pop_due(now) or polling:
            more = self._publish_due(names, to_datetime(now), producer)
        if polling:
            more = self._answer_timeouts(names, to_datetime(now)) or more
            self.next_poll_at = now + settings.positive_ms("POLL_INTERVAL") / 1000
        if now >= self.next_record_at:
            self._record(now)
        if now >= self.next_prune_at:
            self._prune(now)
        if more:
            return 0.0
        return next_wakeup(
            now,
            self.heap.next_due(),
            self.next_poll_at,
            self.next_record_at,
            self.next_prune_at,
            *(window.next_load_at for window in self.windows.values()),
        )

    def _record(self, now: float) -> None:
        """Tell ``scheduller_status`` this beat is alive and what it holds."""
        if self.started_at is None:
            self.started_at = now
        windows = {
            name: to_datetime(window.loaded_until).isoformat()
            for name, window in self.windows.items()
            if window.loaded_until is not None
        }
        store.record_beat(
            self.name, to_datetime(self.started_at), to_datetime(now), windows, self.published, self.timeouts
        )
        self.next_record_at = now + settings.positive_ms("BEAT_RECORD_INTERVAL") / 1000

    def _prune(self, now: float) -> None:
        """Remove kept history older than KEEP_FINISHED, one batch per prune interval."""
        self.next_prune_at = now + settings.positive_ms("PRUNE_INTERVAL") / 1000
        keep = settings.keep_finished()
        if keep is None:
            return
        pruned = store.prune(to_datetime(now) - keep, settings.positive_ms("PRUNE_BATCH"))
        if pruned:
            logger.info("pruned %s ended alarms", pruned, extra={"action": "pruned", "count": pruned})

    def _load_window(self, name: str, now: float) -> None:
        window = self.windows.get(name)
        scheduller = registry.get(name)
        if window is None:
            interval = scheduller.in_memory_interval()
            if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
                raise ValueError(f"{name}.in_memory_interval() must return a positive integer (ms), got {interval!r}")
            window = self.windows[name] = Window(interval / 1000)
        if not window.load_due(now):
            return
        load_from, load_until = window.next_load(now)
        messages = scheduller.load_alarms(
            None if load_from is None else to_datetime(load_from), to_datetime(load_until)
        )
        held = 0
        for message in messages:
            due = message.dispatch_at
            if due is not None and self.heap.push(message.id, due.timestamp()):
                held += 1
        window.loaded(load_until, now)
        logger.info(
            "loaded %s alarms of %s due until %s (%s held)",
            held,
            name,
            to_datetime(load_until).isoformat(),
            len(self.heap),
            extra={"action": "loaded", "scheduller": name},
        )

    def _publish_due(self, names: Sequence[str], now: dt.datetime, producer: Any) -> bool:
        """Claim one batch of due alarms and publish it; True when the batch was full."""
        limit = settings.positive_ms("BATCH_SIZE")
        rows = store.claim_due(names, now, limit)
        late_before = now - dt.timedelta(milliseconds=settings.LATE_AFTER)
        known = self._known_tasks()
        sent = 0
        for index, row in enumerate(rows):
            ref = store.AttemptRef.of_row(row)
            if self._clock() >= _half_spent(ref, row["timeout_ms"]):
                # Publishing fell behind: what is left would reach workers close to (or past) its deadline
                # and expire unrun. Give it back; the next claim gives it a fresh deadline.
                store.release([store.AttemptRef.of_row(r) for r in rows[index:]], now)
                logger.warning(
                    "publishing fell behind: released %s claimed alarms",
                    len(rows) - index,
                    extra={"action": "released", "count": len(rows) - index},
                )
                self.published += sent
                return True
            message = store.message_from_row(row)
            if row["dispatch_at"] < late_before:
                message = message.assign("late", True)
            if known is not None and message.service_name not in known:
                self._fail(ref, message, f"UnknownTask: no Celery task named {message.service_name!r}", now)
                continue
            try:
                self._send(ref, message, producer)
            except Exception as exc:
                unsent = [store.AttemptRef.of_row(r) for r in rows[index:]]
                store.release(unsent, now)
                raise PublishFailed(f"publishing alarm {message.id} failed; released {len(unsent)} claims") from exc
            sent += 1
            signals.send(signals.alarm_published, ref.scheduller, message=message, attempt=ref.attempt)
            logger.debug(
                "published alarm %s attempt %s",
                message.id,
                ref.attempt,
                extra={"alarm_id": message.id, "attempt": ref.attempt, "action": "published"},
            )
        self.published += sent
        if rows:
            logger.info("published %s alarms", len(rows), extra={"action": "published", "count": len(rows)})
        return len(rows) == limit

    def _known_tasks(self) -> set[str] | None:
        """The app's registered task names, or None when the app has no tasks of its own."""
        return known_tasks(self.app)

    def _fail(self, ref: store.AttemptRef, message: Message, reason: str, now: dt.datetime) -> None:
        # Publishing would only make the worker drop it; mark it failed, visible, not retried forever.
        if store.fail(ref, reason, now):
            logger.error("alarm %s failed: %s", message.id, reason, extra={"alarm_id": message.id, "action": "failed"})
            signals.send(signals.alarm_failed, ref.scheduller, message=message, attempt=ref.attempt, reason=reason)

    def _send(self, ref: store.AttemptRef, message: Message, producer: Any) -> None:
        self.app.send_task(
            message.service_name,
            kwargs=message.raw_request,
            task_id=task_id_of(message.id, ref.attempt),
            headers=header_of(ref, message),
            expires=ref.deadline,
            producer=producer,
            retry=False,
        )

    def _answer_timeouts(self, names: Sequence[str], now: dt.datetime) -> bool:
        """Answer attempts whose deadline passed with a ``timeout`` response; True when more may wait."""
        limit = settings.positive_ms("BATCH_SIZE")
        lease_until = now + dt.timedelta(milliseconds=settings.positive_ms("TIMEOUT_LEASE"))
        leased = store.lease_timeouts(names, now, lease_until, limit)
        for ref, message in leased:
            responses.respond(ref, message, Response("timeout"), now)
        self.timeouts += len(leased)
        return len(leased) == limit
