"""The store on the project's database: each transition in the form this database runs best — PostgreSQL's
single statements (``postgres``) where they exist, Django queries (``orm``) everywhere else."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from django.db.models import QuerySet

from .. import db, states
from ..message import Message, Response, compact_json
from ..models import Alarm, BeatRecord
from ..wire import AttemptRef
from . import orm, postgres
from . import transitions as t
from .rows import ROW_FIELDS, Answered, NewAlarm, NewAttempt, leased, message_from_row


def _on_postgresql() -> bool:
    return db.vendor() == "postgresql"


def _kept_responses(pks: list[int]) -> dict[int, Response]:
    """The responses kept by attempts whose ``service_responded`` failed (``REDECIDE``), by pk."""
    if not pks:
        return {}
    found = {}
    for pk, stored in Alarm.objects.filter(pk__in=pks).values_list("pk", "last_response"):
        if not isinstance(stored, dict):
            continue
        try:
            found[pk] = Response.from_json(stored)
        except (KeyError, TypeError, ValueError):
            continue  # not one this package wrote: answered as a timeout
    return found


def _pending(scheduller: str, load_from: dt.datetime | None, load_until: dt.datetime) -> QuerySet[Alarm]:
    """The Scheduller's pending alarms due in ``(load_from, load_until]``."""
    query = Alarm.objects.filter(scheduller=scheduller, state=states.PENDING, dispatch_at__lte=load_until)
    return query if load_from is None else query.filter(dispatch_at__gt=load_from)


class DatabaseStore:
    """The one writer of alarm state. Every change is one guarded transition (``transitions``); zero rows
    changed means another process got there first, reported as ``False`` / an empty result, never
    overwritten."""

    message_from_row = staticmethod(message_from_row)

    # -- dispatch -------------------------------------------------------------------------------------------

    def insert(self, batches: Iterable[Sequence[NewAlarm]], keep_history: bool, *, pipelined: bool = False) -> None:
        """Store new pending alarms, batch by batch, each taken from ``batches`` once the previous one is sent;
        an id already on the schedule is left as it is. With history kept, an ended alarm of the same id is
        replaced: ids may be scheduled again.

        ``pipelined`` on PostgreSQL (history not kept): the batches go out in pipeline mode, the database
        storing one batch while the caller makes the next. An error of either side leaves the batches sent
        so far to the caller's transaction to roll back."""
        postgresql = _on_postgresql()
        if pipelined and postgresql and not keep_history and postgres.pipeline_supported():
            with postgres.bound_cursor() as cursor, db.connection().connection.pipeline():
                for batch in batches:
                    postgres.insert(batch, cursor)
            return
        for batch in batches:
            if keep_history:
                orm.remove_ended([new.message.id for new in batch])
            if postgresql:
                with postgres.bound_cursor() as cursor:
                    postgres.insert(batch, cursor)
            else:
                orm.insert(batch)

    def insert_one(self, new: NewAlarm, keep_history: bool) -> bool:
        """Store one new pending alarm unless its id is on the schedule (with history kept, an ended alarm of
        the id is replaced); True when it was stored, False when the id was there already."""
        if keep_history:
            orm.remove_ended([new.message.id])
        if _on_postgresql():
            return postgres.insert_one(new)
        return orm.insert_one(new)

    def stored(self, message_id: str) -> Message | None:
        """The Message stored under ``message_id``, whichever Scheduller owns it; None when there is none."""
        row = Alarm.objects.filter(message_id=message_id).values(*ROW_FIELDS).first()
        return None if row is None else message_from_row(row)

    # -- beat -----------------------------------------------------------------------------------------------

    def pending_between(
        self, scheduller: str, load_from: dt.datetime | None, load_until: dt.datetime
    ) -> Iterable[dict[str, Any]]:
        """Pending alarms due in ``(load_from, load_until]``."""
        query = _pending(scheduller, load_from, load_until)
        rows: Iterable[dict[str, Any]] = query.order_by("dispatch_at").values(*ROW_FIELDS).iterator(chunk_size=5_000)
        return rows

    def on_schedule(self, scheduller: str, aggregate_id: str) -> list[dict[str, Any]]:
        """The Scheduller's alarms of ``aggregate_id`` that are pending or published, soonest first."""
        query = Alarm.objects.filter(scheduller=scheduller, aggregate_id=aggregate_id, state__in=states.ACTIVE)
        return list(query.order_by("dispatch_at", "pk").values(*ROW_FIELDS))

    def due_times_between(
        self, scheduller: str, load_from: dt.datetime | None, load_until: dt.datetime
    ) -> Iterable[tuple[str, dt.datetime]]:
        """``(message_id, dispatch_at)`` of the alarms ``pending_between`` returns: what beat's heap holds."""
        query = _pending(scheduller, load_from, load_until)
        rows: Iterable[tuple[str, dt.datetime]] = query.values_list("message_id", "dispatch_at").iterator(
            chunk_size=5_000
        )
        return rows

    def count_in_flight(self, schedullers: Sequence[str], up_to: int, now: dt.datetime) -> int:
        """How many attempts of these Schedullers are published, due by ``now`` and unanswered, counting at
        most ``up_to`` (one published ahead counts from its due time: ``MAX_IN_FLIGHT``)."""
        if _on_postgresql():  # beat asks before claims: a prepared statement, not the ORM
            return postgres.count_in_flight(schedullers, up_to, now)
        return orm.count_in_flight(schedullers, up_to, now)

    def claim_due(
        self,
        schedullers: Sequence[str],
        now: dt.datetime,
        limit: int,
        until: dt.datetime | None = None,
        since: dt.datetime | None = None,
    ) -> list[dict[str, Any]]:
        """``transitions.CLAIM`` of up to ``limit`` pending alarms due by ``until`` (default ``now``) and, with
        ``since``, not before it. Rows locked by another beat are skipped, so several beats share the work and
        each attempt is claimed by exactly one. Returned rows carry the new ``attempt`` and ``deadline``."""
        until = now if until is None else until
        if _on_postgresql():
            return postgres.claim(schedullers, now, limit, until, since)
        return orm.claim(schedullers, now, limit, until, since)

    def claim_due_within(
        self,
        schedullers: Sequence[str],
        now: dt.datetime,
        limit: int,
        cap: int,
        until: dt.datetime | None = None,
        since: dt.datetime | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """``claim_due`` of at most the room ``cap`` leaves beside the attempts in flight; returns that room
        (before this claim) and the claimed rows. One statement on PostgreSQL."""
        if _on_postgresql():
            return postgres.claim_within(schedullers, now, limit, cap, until, since)
        room = cap - self.count_in_flight(schedullers, cap, now)
        return room, self.claim_due(schedullers, now, min(limit, room), until, since) if room > 0 else []

    def release(self, refs: Iterable[AttemptRef], now: dt.datetime) -> int:
        """``transitions.RELEASE``: attempts whose publish failed go back to pending."""
        return sum(orm.update(t.RELEASE, ref, {}, now, None) for ref in refs)

    def lease_timeouts(
        self, schedullers: Sequence[str], now: dt.datetime, lease_until: dt.datetime, limit: int
    ) -> list[tuple[AttemptRef, Message]]:
        """``transitions.LEASE_TIMEOUT``: one beat becomes the handler of each overdue attempt until
        ``lease_until``; if it dies first, another takes the attempt over. A late worker response no longer
        matches the deadline and is ignored."""
        rows = orm.lease_timeouts(schedullers, now, lease_until, limit)
        return leased(rows, lease_until, _kept_responses([row["pk"] for row in rows if row["callback_failures"]]))

    def redecide(
        self, ref: AttemptRef, response: Response, deadline: dt.datetime, failures: int, note: str, now: dt.datetime
    ) -> bool:
        """``transitions.REDECIDE``: ``service_responded`` failed for attempt ``ref`` (``failures`` times in a
        row): the attempt keeps ``response`` and is decided again once ``deadline`` passes (beat leases it as it
        does a timeout, and passes the response kept); the task is not run again."""
        stored = response.to_json()
        answered = Answered.of(ref, stored, now, note)
        values = {"deadline": deadline, "last_response": compact_json(stored), "callback_failures": failures}
        if _on_postgresql():
            return postgres.REDECIDE.run(ref, {**values, "now": now}, answered)
        return orm.update(t.REDECIDE, ref, values, now, answered)

    def record_beat(
        self,
        name: str,
        started_at: dt.datetime,
        now: dt.datetime,
        windows: dict[str, str],
        published: int,
        timeouts: int,
    ) -> None:
        """Record a beat's windows and counters for ``scheduller_status``; remove the dashboard's activity
        rows older than ``activity.KEEP``."""
        from .. import activity

        activity.remove_old(now)
        BeatRecord.objects.update_or_create(
            name=name,
            defaults={
                "started_at": started_at,
                "last_seen": now,
                "windows": windows,
                "published": published,
                "timeouts": timeouts,
            },
        )

    def prune(self, before: dt.datetime, limit: int) -> int:
        """``transitions.PRUNE`` of up to ``limit`` alarms that ended before ``before``, oldest first, with their
        history; one statement on PostgreSQL, where rows another pruner holds are skipped."""
        if _on_postgresql():
            return postgres.prune(before, limit)
        return orm.prune(before, limit)

    def prune_backlog(self, before: dt.datetime, up_to: int) -> tuple[int, dt.datetime | None]:
        """How many ended alarms wait to be pruned (at most ``up_to`` counted) and when the oldest ended."""
        return orm.prune_backlog(before, up_to)

    def prune_task_records(self, now: dt.datetime, limit: int) -> int:
        """Up to ``limit`` Django Tasks results (``task_backend``) past their ``RESULT_TTL``."""
        return orm.prune_task_records(now, limit)

    # -- answers (workers and beat's timeouts) --------------------------------------------------------------

    def finish(self, ref: AttemptRef, response: Response, now: dt.datetime, keep_history: bool) -> bool:
        """``transitions.FINISH`` after ``OK``, if ``ref`` is still the current attempt: kept as ``finished``
        with its history row, or (without history) removed with its history. One statement on PostgreSQL."""
        if keep_history:
            return self._answer(t.FINISH, ref, response, now, "ok")
        if self.finishes_in_one_statement(keep_history):
            return ref.pk in self.finish_many([ref])
        return orm.remove(t.FINISH, ref)

    def finishes_in_one_statement(self, keep_history: bool) -> bool:
        """Whether ``finish_many`` ends many alarms in one statement here (PostgreSQL, history not kept)."""
        return not keep_history and _on_postgresql()

    def finish_many(self, refs: Sequence[AttemptRef]) -> set[int]:
        """``finish`` without history for many attempts in one statement; the pks of the alarms that ended."""
        return postgres.FINISH_REMOVED_MANY.run(refs)

    def fail(self, ref: AttemptRef, reason: str, now: dt.datetime, response: Response | None = None) -> bool:
        """``transitions.FAIL``: a published attempt that cannot be delivered, with ``reason`` as its response;
        or, given the attempt's ``response`` (a ``Fail`` answer), that response with the decision
        ``failed: <reason>``. Kept whatever KEEP_FINISHED says, so an operator sees it."""
        if response is not None:
            return self._answer(t.FAIL, ref, response, now, f"failed: {reason}", reason)
        return self._answer(t.FAIL, ref, Response("error", error=reason), now, "failed")

    def _answer(
        self,
        transition: t.Transition,
        ref: AttemptRef,
        response: Response,
        now: dt.datetime,
        decision: str,
        reason: str | None = None,
    ) -> bool:
        stored = response.to_json()  # made safe once, stored twice
        if reason is not None:  # ``Fail(reason)``: the reason beside the response that led to it
            stored = {**stored, "reason": reason}
        answered = Answered.of(ref, stored, now, decision)
        values = {"last_response": compact_json(stored), "now": now}
        if _on_postgresql():
            return postgres.ENDING[transition.name].run(ref, values, answered)
        return orm.update(transition, ref, values, now, answered)

    def retry(
        self,
        ref: AttemptRef,
        message: Message,
        dispatch_at: dt.datetime,
        timeout_ms: int,
        response: Response | None,
        now: dt.datetime,
        decision: str = "retry",
        callback_failures: int = 0,
    ) -> bool:
        """``transitions.RETRY``: ``message`` as the alarm's next attempt at ``dispatch_at``, if ``ref`` is
        still current; ``callback_failures``: ``service_responded``'s failures in a row so far."""
        new = NewAttempt(ref, message, dispatch_at, timeout_ms, response, now, decision, callback_failures)
        values, answered = new.prepared()
        if _on_postgresql():
            return (postgres.RETRY if answered else postgres.RETRY_UNANSWERED).run(ref, values, answered)
        return orm.update(t.RETRY, ref, values, now, answered)

    def retries_in_one_statement(self) -> bool:
        """Whether ``retry_many`` stores many retries in one statement here (PostgreSQL)."""
        return _on_postgresql()

    def retry_many(self, retries: Sequence[NewAttempt]) -> set[int]:
        """``retry`` for many attempts (of distinct alarms, each with a response) in one statement; the pks of
        the alarms stored as retries."""
        prepared = [retry.prepared() for retry in retries]
        return postgres.RETRY_MANY.run(
            [retry.ref for retry in retries],
            [values for values, _answered in prepared],
            [answered for _values, answered in prepared],
        )

    def is_current(self, ref: AttemptRef) -> bool:
        """Whether ``ref`` is still the alarm's published attempt (same pk, attempt and deadline)."""
        return orm.guarded(t.FINISH, ref).exists()

    def held_verdicts(self, refs: Sequence[AttemptRef]) -> dict[int, str]:
        """Whether a worker runs (``"run"``), drops (``"drop"``) or waits to decide (``"wait"``) each attempt
        it held ahead of its time, now due (by pk). One statement on PostgreSQL, one short transaction
        elsewhere."""
        pks = [ref.pk for ref in refs]
        return orm.held_verdicts(refs, postgres.held_rows(pks) if _on_postgresql() else orm.held_rows(pks))

    # -- the API's changes ----------------------------------------------------------------------------------

    def cancel(
        self,
        scheduller: str,
        now: dt.datetime,
        keep_history: bool,
        *,
        message_ids: Iterable[str] = (),
        aggregate_id: str = "",
    ) -> tuple[list[str], list[tuple[str, int, int]]]:
        """``transitions.CANCEL`` by message id or by aggregate; returns the ids cancelled, and the ``(message
        id, attempt, pk)`` of those published ahead of their time: attempts a worker holds unstarted, which the
        caller revokes. A published attempt's late response is then ignored."""
        found = orm.cancel(scheduller, now, keep_history, list(message_ids), aggregate_id)
        ahead = [
            (message_id, attempt, pk)
            for pk, message_id, state, attempt, due in found
            if state == states.PUBLISHED and due > now
        ]
        return [message_id for _, message_id, *_ in found], ahead

    def reschedule(
        self, scheduller: str, message_id: str, dispatch_at: dt.datetime, now: dt.datetime
    ) -> tuple[bool, tuple[str, int, int] | None]:
        """Move a pending alarm, or one a worker holds ahead of its time, to ``dispatch_at``: whether it moved,
        and the held attempt ``(message id, attempt, pk)`` the caller revokes."""
        return orm.reschedule(scheduller, message_id, dispatch_at, now)

    def restart(self, scheduller: str, message_id: str, dispatch_at: dt.datetime, now: dt.datetime) -> bool:
        """Put an ended alarm back on the schedule at ``dispatch_at``."""
        return orm.restart(scheduller, message_id, dispatch_at, now)
