"""The one writer of alarm state.

Every change is one conditional statement whose WHERE names the state (and, for a published alarm,
the attempt and deadline) it expects. Zero rows changed means another process got there first; the
functions report it (``False`` / an empty list) and callers log it, they never overwrite.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from django.db.models import F, Q, QuerySet

from . import compat, db, states
from .exceptions import SchedullerError
from .message import Message, Response, compact_json, from_json_value, to_json_value
from .models import Alarm, AlarmAttempt, BeatRecord
from .wire import AttemptRef

#: The columns beat and the hooks need to rebuild a Message and address its attempt.
ROW_FIELDS = (
    "pk",
    "message_id",
    "scheduller",
    "task_name",
    "raw_request",
    "assigns",
    "correlation_id",
    "causation_id",
    "aggregate_id",
    "dispatch_at",
    "attempt",
    "timeout_ms",
    "deadline",
    "published_at",
    "callback_failures",
)


_ALARM = Alarm._meta.db_table
_ATTEMPT = AlarmAttempt._meta.db_table


def _bound_cursor(*, binary: bool = False) -> Any:
    """PostgreSQL: a Django cursor (logged and counted like any other) over psycopg's server-binding
    cursor. Parameters travel apart from the SQL, so a statement run again and again on one connection
    is prepared once (psycopg's ``prepare_threshold``) instead of quoted in Python and planned per call:
    the worker's hook and beat's claim run the same few statements for every alarm."""
    import psycopg

    connection = db.connection()
    connection.ensure_connection()
    cursor = psycopg.Cursor(connection.connection)
    if binary:  # results in binary: no text parsing of timestamps, JSON decoded by psycopg
        cursor.format = psycopg.pq.Format.BINARY
    return compat.prepare_cursor(connection, cursor)


class ClaimConflict(SchedullerError):
    """A guarded update changed fewer rows than were locked for it; the whole claim is rolled back."""


@dataclasses.dataclass(frozen=True, slots=True)
class NewAlarm:
    """An alarm ready to insert: a validated message with ``assigns["dispatch_at"]`` set."""

    scheduller: str
    message: Message
    aggregate_id: str
    timeout_ms: int
    #: raw_request and assigns already encoded (by dispatch's checks), to encode each message once
    raw_json: str | None = None
    assigns_json: str | None = None


def message_from_row(row: dict[str, Any]) -> Message:
    """The Message stored in a row fetched with ``ROW_FIELDS``."""
    return Message(
        service_name=row["task_name"],
        raw_request=from_json_value(row["raw_request"]),
        id=row["message_id"],
        correlation_id=row["correlation_id"] or row["message_id"],
        causation_id=row["causation_id"] or row["message_id"],
        assigns=from_json_value(row["assigns"]),
    )


def insert(batches: Iterable[Sequence[NewAlarm]], keep_history: bool, *, pipelined: bool = False) -> None:
    """Store new pending alarms, batch by batch, each taken from ``batches`` once the previous one is sent;
    an id already on the schedule is left as it is (not raised). With history kept, an ended alarm of the
    same id is replaced: ids may be scheduled again.

    ``pipelined`` on PostgreSQL (history not kept): the batches go out in pipeline mode, the database
    storing one batch while the caller makes the next (``dispatch_many`` checks and encodes its messages
    there). An error of either side leaves the batches sent so far to the caller's transaction to roll back.
    """
    if pipelined and db.vendor() == "postgresql" and not keep_history and _pipeline_supported():
        with _bound_cursor() as cursor, db.connection().connection.pipeline():
            for batch in batches:
                cursor.execute(_INSERT_POSTGRESQL, [states.PENDING, *_columns(batch)])
        return
    for batch in batches:
        if keep_history:
            _remove_ended([new.message.id for new in batch])
        if db.vendor() == "postgresql":
            columns = _columns(batch)
            with _bound_cursor() as cursor:
                if len(batch) == 1:  # ``dispatch``: one row costs less to send than ten one-element arrays
                    cursor.execute(_INSERT_ONE_POSTGRESQL, [states.PENDING, *(column[0] for column in columns)])
                else:
                    cursor.execute(_INSERT_POSTGRESQL, [states.PENDING, *columns])
            continue
        rows = [
            Alarm(
                message_id=new.message.id,
                scheduller=new.scheduller,
                task_name=new.message.service_name,
                raw_request=to_json_value(new.message.raw_request, "raw_request"),
                assigns=to_json_value(new.message.assigns, "assigns"),
                correlation_id=new.message.correlation_id,
                causation_id=new.message.causation_id,
                aggregate_id=new.aggregate_id,
                dispatch_at=new.message.assigns["dispatch_at"],
                state=states.PENDING,
                timeout_ms=new.timeout_ms,
            )
            for new in batch
        ]
        Alarm.objects.bulk_create(rows, ignore_conflicts=True)


def _pipeline_supported() -> bool:
    """psycopg's pipeline mode needs libpq 14 or later (its binary wheels bundle one)."""
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


# ``insert`` on PostgreSQL: one ``INSERT … SELECT FROM unnest(…)`` per batch, no model instances, column
# arrays bound on the server in binary (``%b``; Django's own cursor would quote every string)
_INSERT_POSTGRESQL = (
    f"INSERT INTO {_ALARM} (message_id, scheduller, task_name, raw_request, assigns, correlation_id, "
    "causation_id, aggregate_id, dispatch_at, timeout_ms, state, attempt, created_at, updated_at) "
    "SELECT m, s, t, r::jsonb, a::jsonb, c, ca, ag, d, tm, %s, 0, now(), now() FROM unnest("
    "%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], "
    "%b::timestamptz[], %b::int[]) AS x(m, s, t, r, a, c, ca, ag, d, tm) "
    "ON CONFLICT (message_id) DO NOTHING"
)


_INSERT_ONE_POSTGRESQL = (
    f"INSERT INTO {_ALARM} (state, message_id, scheduller, task_name, raw_request, assigns, correlation_id, "
    "causation_id, aggregate_id, dispatch_at, timeout_ms, attempt, created_at, updated_at) "
    "VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, 0, now(), now()) "
    "ON CONFLICT (message_id) DO NOTHING"
)


def _columns(batch: Sequence[NewAlarm]) -> list[list[Any]]:
    """``_INSERT_POSTGRESQL``'s column arrays of one batch."""
    messages = [new.message for new in batch]
    return [
        [message.id for message in messages],
        [new.scheduller for new in batch],
        [message.service_name for message in messages],
        [new.raw_json or _compact(new.message.raw_request, "raw_request") for new in batch],
        [new.assigns_json or _compact(new.message.assigns, "assigns") for new in batch],
        [message.correlation_id for message in messages],
        [message.causation_id for message in messages],
        [new.aggregate_id for new in batch],
        [message.assigns["dispatch_at"] for message in messages],
        [new.timeout_ms for new in batch],
    ]


def _compact(value: Any, where: str) -> str:
    return compact_json(to_json_value(value, where))


def pending_between(
    scheduller: str, load_from: dt.datetime | None, load_until: dt.datetime
) -> Iterable[dict[str, Any]]:
    """Pending alarms due in ``(load_from, load_until]`` (everything up to ``load_until`` without a start)."""
    query = Alarm.objects.filter(scheduller=scheduller, state=states.PENDING, dispatch_at__lte=load_until)
    if load_from is not None:
        query = query.filter(dispatch_at__gt=load_from)
    rows: Iterable[dict[str, Any]] = query.order_by("dispatch_at").values(*ROW_FIELDS).iterator(chunk_size=5_000)
    return rows


def due_times_between(
    scheduller: str, load_from: dt.datetime | None, load_until: dt.datetime
) -> Iterable[tuple[str, dt.datetime]]:
    """``(message_id, dispatch_at)`` of the alarms ``pending_between`` returns: what beat's heap holds."""
    query = Alarm.objects.filter(scheduller=scheduller, state=states.PENDING, dispatch_at__lte=load_until)
    if load_from is not None:
        query = query.filter(dispatch_at__gt=load_from)
    rows: Iterable[tuple[str, dt.datetime]] = query.values_list("message_id", "dispatch_at").iterator(chunk_size=5_000)
    return rows


# the published attempts of the Schedullers ``ANY(%s)``, at most ``LIMIT %s`` of them (state = published)
_IN_FLIGHT_SQL = f"SELECT 1 FROM {_ALARM} WHERE state = %s AND scheduller = ANY(%s) LIMIT %s"


def count_in_flight(schedullers: Sequence[str], up_to: int) -> int:
    """How many attempts of these Schedullers are published and unanswered, counting at most ``up_to``."""
    if db.vendor() == "postgresql":  # beat asks before every claim: a prepared statement, not the ORM
        with _bound_cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM ({_IN_FLIGHT_SQL}) f", [states.PUBLISHED, list(schedullers), up_to])
            return int(cursor.fetchone()[0])
    return Alarm.objects.filter(state=states.PUBLISHED, scheduller__in=schedullers).values("pk")[:up_to].count()


def claim_due(
    schedullers: Sequence[str],
    now: dt.datetime,
    limit: int,
    until: dt.datetime | None = None,
    since: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """Claim up to ``limit`` pending alarms due by ``until`` (default ``now``) and, with ``since``, not
    before it: pending → published, attempt + 1, deadline ``timeout_ms`` after ``now`` or, for an alarm
    published ahead of its time, after that time.

    Rows locked by another beat are skipped, so several beats share the work and each attempt is
    claimed by exactly one of them. Returned rows carry the new ``attempt`` and ``deadline``.
    """
    until = now if until is None else until
    if db.vendor() == "postgresql":
        return _claim_due_postgresql(schedullers, now, limit, until, since)
    due = Alarm.objects.filter(state=states.PENDING, scheduller__in=schedullers, dispatch_at__lte=until)
    if since is not None:
        due = due.filter(dispatch_at__gte=since)
    with db.atomic():
        rows = list(due.select_for_update(skip_locked=True).order_by("dispatch_at").values(*ROW_FIELDS)[:limit])
        # one update per timeout for the due alarms, one per timeout for those published ahead
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for row in rows:
            groups[row["timeout_ms"], row["dispatch_at"] > now].append(row["pk"])
        for (timeout_ms, ahead), pks in groups.items():
            timeout = dt.timedelta(milliseconds=timeout_ms)
            changed = Alarm.objects.filter(pk__in=pks, state=states.PENDING).update(
                state=states.PUBLISHED,
                attempt=F("attempt") + 1,
                published_at=now,
                deadline=F("dispatch_at") + timeout if ahead else now + timeout,
                updated_at=now,
            )
            if changed != len(pks):
                raise ClaimConflict(f"claimed {changed} of {len(pks)} locked alarms")
    for row in rows:
        row["attempt"] += 1
        row["deadline"] = max(now, row["dispatch_at"]) + dt.timedelta(milliseconds=row["timeout_ms"])
        row["published_at"] = now
    return rows


def claim_due_within(
    schedullers: Sequence[str],
    now: dt.datetime,
    limit: int,
    cap: int,
    until: dt.datetime | None = None,
    since: dt.datetime | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """``claim_due`` of at most the room ``cap`` leaves beside the attempts in flight; returns that room
    (``cap`` minus ``count_in_flight``, before this claim) and the claimed rows. One statement on
    PostgreSQL, where beat claims this way before every batch: a round trip less per claim."""
    if db.vendor() != "postgresql":
        room = cap - count_in_flight(schedullers, cap)
        return room, claim_due(schedullers, now, min(limit, room), until, since) if room > 0 else []
    with _bound_cursor(binary=True) as cursor:
        cursor.execute(_CLAIM_WITHIN_SQL, _claim_within_params(schedullers, now, limit, cap, until, since))
        found = cursor.fetchall()
    # one row per claimed alarm, each with the room; one of NULLs beside it when none was claimed
    return int(found[0][0]), _claimed([values[1:] for values in found if values[1] is not None])


def _claim_within_params(
    schedullers: Sequence[str],
    now: dt.datetime,
    limit: int,
    cap: int,
    until: dt.datetime | None = None,
    since: dt.datetime | None = None,
) -> list[Any]:
    return [cap, states.PUBLISHED, list(schedullers), cap, *_claim_params(schedullers, now, limit, until, since)]


def _claim_due_postgresql(
    schedullers: Sequence[str], now: dt.datetime, limit: int, until: dt.datetime, since: dt.datetime | None
) -> list[dict[str, Any]]:
    """``claim_due`` as one statement: lock (skipping rows other beats hold), update, return."""
    with _bound_cursor(binary=True) as cursor:
        cursor.execute(_CLAIM_SQL, _claim_params(schedullers, now, limit, until, since))
        return _claimed(cursor.fetchall())


def _claim_sql(limit: str) -> str:
    """The PostgreSQL claim, taking at most ``limit`` (SQL) rows; parameters from ``_claim_params``.

    The claimed ids are collected first (``ARRAY(…)``, evaluated once) and the rows updated by pk: as
    ``id IN (SELECT …)`` the planner joined them with a scan of the whole table. The due rows are read per
    Scheduller (``LATERAL``), each as one ordered range of the (scheduller, state, dispatch_at) index, so a
    claim reads about as many rows as it takes. The range starts at ``since`` (beat's floor): each claimed
    row leaves its pending index entry behind until VACUUM, and a claim from the beginning would walk them.
    Rows locked beyond the outer ``LIMIT`` stay pending and are let go when the statement ends.
    """
    # the JSON columns as text, decoded row by row (``_claimed``): one undecodable row fails alone
    as_text = {"pk": "id", "raw_request": "raw_request::text", "assigns": "assigns::text"}
    columns = ", ".join(as_text.get(field, field) for field in ROW_FIELDS)
    return (
        f"UPDATE {_ALARM} SET state = %s, attempt = attempt + 1, published_at = %s, "
        "deadline = GREATEST(%s, dispatch_at) + timeout_ms * interval '1 millisecond', updated_at = %s "
        "WHERE id = ANY(ARRAY(SELECT due.id FROM unnest(%s::text[]) AS served(name), "
        f"LATERAL (SELECT id, dispatch_at FROM {_ALARM} "
        "WHERE scheduller = served.name AND state = %s AND dispatch_at BETWEEN %s AND %s "
        f"ORDER BY dispatch_at LIMIT {limit} FOR UPDATE SKIP LOCKED) due "
        f"ORDER BY due.dispatch_at LIMIT {limit})) "
        f"RETURNING {columns}"
    )


# Built once, not per claim: ``claim_due``'s statement, and ``claim_due_within``'s (the room under the cap,
# and a claim of at most that many)
_CLAIM_SQL = _claim_sql("%s")
_CLAIM_WITHIN_SQL = (
    f"WITH room AS (SELECT %s - count(*) AS n FROM ({_IN_FLIGHT_SQL}) f), "
    f"claimed AS ({_claim_sql('LEAST(%s, GREATEST((SELECT n FROM room), 0))')}) "
    "SELECT room.n, claimed.* FROM room LEFT JOIN claimed ON true"
)


#: ``since`` of a claim from the beginning: before any time Django stores
BEGINNING = dt.datetime.min.replace(tzinfo=dt.UTC)


def _claim_params(
    schedullers: Sequence[str],
    now: dt.datetime,
    limit: int,
    until: dt.datetime | None = None,
    since: dt.datetime | None = None,
) -> list[Any]:
    until = now if until is None else until
    since = BEGINNING if since is None else since
    return [states.PUBLISHED, now, now, now, list(schedullers), states.PENDING, since, until, limit, limit]


def _claimed(found: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """The claim's returned columns as rows (``ROW_FIELDS``), earliest due first."""
    rows = [dict(zip(ROW_FIELDS, values, strict=True)) for values in found]
    for row in rows:
        try:
            for field in ("raw_request", "assigns"):
                if isinstance(row[field], str):
                    row[field] = json.loads(row[field])
        except (ValueError, RecursionError) as exc:  # the row is failed by beat, not the claim
            row["unreadable"] = f"{field}: {type(exc).__name__}: {exc}"
    rows.sort(key=lambda row: row["dispatch_at"])
    return rows


def release(refs: Iterable[AttemptRef], now: dt.datetime) -> int:
    """Return attempts whose publish failed to pending, so the next claim publishes them again."""
    released = 0
    for ref in refs:
        released += _published(ref).update(state=states.PENDING, deadline=None, published_at=None, updated_at=now)
    return released


def finish(ref: AttemptRef, response: Response, now: dt.datetime, keep_history: bool) -> bool:
    """End the alarm after ``OK``, if ``ref`` is still its current attempt.

    Without history the row goes (the attempt history too, if earlier attempts left one); with history
    it becomes ``finished`` and the attempt is recorded. One statement on PostgreSQL either way.
    """
    if keep_history:
        return _end(ref, states.FINISHED, response, now, "ok")
    if finishes_in_one_statement(keep_history):
        # the alarm and its history in one round trip: the worker's hook runs this for every task
        return ref.pk in finish_many([ref])
    query = _published(ref)
    deleted = compat.raw_delete(query)  # one DELETE: no collector, no transaction of its own
    if deleted and ref.attempt > 1:
        AlarmAttempt.objects.filter(message_id=ref.message_id).delete()
    return deleted > 0


def finishes_in_one_statement(keep_history: bool) -> bool:
    """Whether ``finish_many`` ends many alarms in one statement here (PostgreSQL, history not kept)."""
    return not keep_history and db.vendor() == "postgresql"


# The rows are found by pk alone (``id = ANY``); the state is compared in the join, not as a filter of
# the table. With ``a.state = 'published'`` as a filter, the planner — trusting statistics taken while nearly
# every row was pending — hashed every published row, and every not yet vacuumed version of one, on every
# call: ~870 buffers a call in the benchmark at 500/s, against ~5 per row now.
_FINISH_MANY_SQL = (
    f"WITH gone AS (DELETE FROM {_ALARM} a USING unnest(%s::bigint[], %s::int[], %s::timestamptz[], %s::text[]) "
    "AS r(pk, attempt, deadline, state) WHERE a.id = ANY(%s::bigint[]) AND a.id = r.pk AND a.state = r.state "
    "AND a.attempt = r.attempt AND a.deadline = r.deadline RETURNING a.id, a.message_id, a.attempt), "
    f"history AS (DELETE FROM {_ATTEMPT} WHERE message_id IN (SELECT message_id FROM gone WHERE attempt > 1)) "
    "SELECT id FROM gone"
)


def _finish_many_params(refs: Sequence[AttemptRef]) -> list[Any]:
    pks = [ref.pk for ref in refs]
    return [pks, [ref.attempt for ref in refs], [ref.deadline for ref in refs], [states.PUBLISHED] * len(refs), pks]


def finish_many(refs: Sequence[AttemptRef]) -> set[int]:
    """``finish`` without history for many attempts in one statement (``finishes_in_one_statement``);
    returns the pks of the alarms that ended (the others were answered, timed out or cancelled)."""
    with _bound_cursor() as cursor:
        cursor.execute(_FINISH_MANY_SQL, _finish_many_params(refs))
        return {pk for (pk,) in cursor.fetchall()}


def fail(ref: AttemptRef, reason: str, now: dt.datetime) -> bool:
    """Mark a published attempt that cannot be delivered ``failed``, with ``reason`` as its response.

    Kept whatever KEEP_FINISHED says, so an operator sees it; pruned with the rest of the history.
    """
    return _end(ref, states.FAILED, Response("error", error=reason), now, "failed")


def _end(ref: AttemptRef, state: str, response: Response, now: dt.datetime, decision: str) -> bool:
    """Keep the alarm as history in the ended ``state``, recording its last attempt."""
    last = response.to_json()
    if db.vendor() == "postgresql":
        return _update_and_record(
            "state = %s, deadline = NULL, finished_at = %s, last_response = %s, updated_at = %s",
            [state, now, compact_json(last), now],
            ref,
            last,
            now,
            decision,
        )
    with db.atomic():
        changed = _published(ref).update(
            state=state, deadline=None, finished_at=now, last_response=last, updated_at=now
        )
        if changed:
            _record_attempt(ref, last, now, decision)
    return changed > 0


def _update_and_record(
    assignments: str, values: list[Any], ref: AttemptRef, stored: dict[str, Any], now: dt.datetime, decision: str
) -> bool:
    """PostgreSQL: the guarded UPDATE of ``ref`` and the attempt's history row in one statement; ``stored``
    is the response as stored (``Response.to_json``)."""
    where, params = _published_sql(ref)
    with _bound_cursor() as cursor:
        cursor.execute(
            f"WITH changed AS (UPDATE {_ALARM} SET {assignments} WHERE {where} RETURNING message_id) "
            f"INSERT INTO {_ATTEMPT} (message_id, attempt, published_at, responded_at, status, error, decision) "
            "SELECT message_id, %s, %s, %s, %s, %s, %s FROM changed",
            [
                *values,
                *params,
                ref.attempt,
                ref.published_at,
                now,
                stored["status"],
                stored["error"] or "",
                decision[:50],
            ],
        )
        return bool(cursor.rowcount > 0)


def retry(
    ref: AttemptRef,
    message: Message,
    dispatch_at: dt.datetime,
    timeout_ms: int,
    response: Response | None,
    now: dt.datetime,
    decision: str = "retry",
    callback_failures: int = 0,
) -> bool:
    """Store ``message`` as the alarm's next attempt at ``dispatch_at``, if ``ref`` is still current;
    ``callback_failures``: ``service_responded``'s failures in a row so far (0 after a valid answer)."""
    stored = None if response is None else response.to_json()  # made safe once, stored twice
    if db.vendor() == "postgresql" and stored is not None:
        return _update_and_record(
            "state = %s, task_name = %s, raw_request = %s, assigns = %s, dispatch_at = %s, timeout_ms = %s, "
            "deadline = NULL, last_response = %s, callback_failures = %s, failing = %s, updated_at = %s",
            [
                states.PENDING,
                message.service_name,
                _compact(message.raw_request, "raw_request"),
                _compact(message.assigns, "assigns"),
                dispatch_at,
                timeout_ms,
                compact_json(stored),
                callback_failures,
                _failing(response, callback_failures),
                now,
            ],
            ref,
            stored,
            now,
            decision,
        )
    with db.atomic():
        changed: int = _published(ref).update(
            state=states.PENDING,
            task_name=message.service_name,
            raw_request=to_json_value(message.raw_request, "raw_request"),
            assigns=to_json_value(message.assigns, "assigns"),
            dispatch_at=dispatch_at,
            timeout_ms=timeout_ms,
            deadline=None,
            last_response=stored,
            callback_failures=callback_failures,
            failing=_failing(response, callback_failures),
            updated_at=now,
        )
        if changed and stored is not None:
            _record_attempt(ref, stored, now, decision)
    return changed > 0


def _failing(response: Response | None, callback_failures: int) -> bool:
    """Whether a retry after ``response`` leaves the alarm failing (the admin's view)."""
    return callback_failures > 0 or (response is not None and response.status != "ok")


def retries_in_one_statement() -> bool:
    """Whether ``retry_many`` stores many retries in one statement here (PostgreSQL)."""
    return db.vendor() == "postgresql"


# ``retry`` with its history row, for many attempts at once: rows found by pk, guarded in the join as in
# ``_FINISH_MANY_SQL``, each retry's values from the arrays.
_RETRY_MANY_SQL = (
    "WITH r AS (SELECT * FROM unnest(%s::bigint[], %s::int[], %s::timestamptz[], %s::text[], %s::text[], "
    "%s::text[], %s::timestamptz[], %s::int[], %s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[], "
    "%s::timestamptz[], %s::int[], %s::bool[]) AS r(pk, attempt, deadline, task_name, raw_request, assigns, "
    "dispatch_at, timeout_ms, last_response, published_at, status, error, decision, now, failures, failing)), "
    f"changed AS (UPDATE {_ALARM} a SET state = %s, task_name = r.task_name, raw_request = r.raw_request::jsonb, "
    "assigns = r.assigns::jsonb, dispatch_at = r.dispatch_at, timeout_ms = r.timeout_ms, deadline = NULL, "
    "last_response = r.last_response::jsonb, callback_failures = r.failures, failing = r.failing, "
    "updated_at = r.now "
    "FROM r WHERE a.id = ANY(%s::bigint[]) "
    "AND a.id = r.pk AND a.state = %s AND a.attempt = r.attempt AND a.deadline = r.deadline "
    "RETURNING a.id, a.message_id, r.attempt, r.published_at, r.now, r.status, r.error, r.decision), "
    f"history AS (INSERT INTO {_ATTEMPT} (message_id, attempt, published_at, responded_at, status, error, decision) "
    "SELECT message_id, attempt, published_at, now, status, error, decision FROM changed) "
    "SELECT id FROM changed"
)


@dataclasses.dataclass(frozen=True, slots=True)
class NewAttempt:
    """One retry for ``retry_many``: ``retry``'s arguments."""

    ref: AttemptRef
    message: Message
    dispatch_at: dt.datetime
    timeout_ms: int
    response: Response
    now: dt.datetime
    decision: str
    callback_failures: int = 0


def retry_many(retries: Sequence[NewAttempt]) -> set[int]:
    """``retry`` for many attempts (of distinct alarms) in one statement (``retries_in_one_statement``);
    returns the pks of the alarms stored as retries (the others were answered, timed out or cancelled)."""
    refs = [retry.ref for retry in retries]
    pks = [ref.pk for ref in refs]
    responses = [retry.response.to_json() for retry in retries]
    with _bound_cursor() as cursor:
        cursor.execute(
            _RETRY_MANY_SQL,
            [
                pks,
                [ref.attempt for ref in refs],
                [ref.deadline for ref in refs],
                [retry.message.service_name for retry in retries],
                [_compact(retry.message.raw_request, "raw_request") for retry in retries],
                [_compact(retry.message.assigns, "assigns") for retry in retries],
                [retry.dispatch_at for retry in retries],
                [retry.timeout_ms for retry in retries],
                [compact_json(stored) for stored in responses],
                [ref.published_at for ref in refs],
                [retry.response.status for retry in retries],
                [stored["error"] or "" for stored in responses],
                [retry.decision[:50] for retry in retries],
                [retry.now for retry in retries],
                [retry.callback_failures for retry in retries],
                [_failing(retry.response, retry.callback_failures) for retry in retries],
                states.PENDING,
                pks,
                states.PUBLISHED,
            ],
        )
        return {pk for (pk,) in cursor.fetchall()}


def _record_attempt(ref: AttemptRef, stored: dict[str, Any], now: dt.datetime, decision: str) -> None:
    """The history row of an answered attempt; ``stored`` is its response as stored."""
    AlarmAttempt.objects.create(
        message_id=ref.message_id,
        attempt=ref.attempt,
        published_at=ref.published_at,
        responded_at=now,
        status=stored["status"],
        error=stored["error"] or "",
        decision=decision[:50],
    )


def lease_timeouts(
    schedullers: Sequence[str], now: dt.datetime, lease_until: dt.datetime, limit: int
) -> list[tuple[AttemptRef, Message]]:
    """Take published attempts whose deadline passed, moving their deadline to ``lease_until``.

    The lease makes one beat the handler of each timeout; if it dies before answering, another beat
    takes the attempt over once the lease runs out. A late worker response no longer matches the
    deadline and is ignored.
    """
    with db.atomic():
        rows = list(
            Alarm.objects.select_for_update(skip_locked=True)
            .filter(Q(deadline__lte=now) | Q(deadline__isnull=True), state=states.PUBLISHED, scheduller__in=schedullers)
            .order_by("deadline")
            .values(*ROW_FIELDS)[:limit]
        )
        if rows:
            pks = [row["pk"] for row in rows]
            # a published row without a deadline (edited by hand) is treated as overdue: it is answered
            changed = Alarm.objects.filter(
                Q(deadline__lte=now) | Q(deadline__isnull=True), pk__in=pks, state=states.PUBLISHED
            ).update(deadline=lease_until, updated_at=now)
            if changed != len(pks):
                raise ClaimConflict(f"leased {changed} of {len(pks)} locked timeouts")
    return [(dataclasses.replace(AttemptRef.of_row(row), deadline=lease_until), message_from_row(row)) for row in rows]


def is_current(ref: AttemptRef) -> bool:
    """Whether ``ref`` is still the alarm's published attempt (same pk, attempt and deadline)."""
    return _published(ref).exists()


def cancel(
    scheduller: str, now: dt.datetime, keep_history: bool, *, message_ids: Iterable[str] = (), aggregate_id: str = ""
) -> tuple[list[str], list[tuple[str, int]]]:
    """Take alarms off the schedule by message id or by aggregate; returns the ids cancelled, and the
    ``(message id, attempt)`` of those published ahead of their time (not due at ``now``): the attempts
    a worker holds but has not started, which the caller revokes.

    A published attempt's late response is then ignored. Without history the rows are removed.
    """
    active = Alarm.objects.filter(scheduller=scheduller, state__in=states.TRANSITIONS["cancel"])
    query = (
        active.filter(aggregate_id=aggregate_id) if aggregate_id else active.filter(message_id__in=list(message_ids))
    )
    with db.atomic():
        # Locked as read: a beat claiming one of them meanwhile (publishing it ahead) has it locked, so this
        # waits and reads it published, and the caller revokes it; a later claim no longer finds it pending.
        found = list(query.select_for_update().values_list("pk", "message_id", "state", "attempt", "dispatch_at"))
        if not found:
            return [], []
        guarded = active.filter(pk__in=[pk for pk, *_ in found])
        if keep_history:
            changed = guarded.update(state=states.CANCELLED, deadline=None, finished_at=now, updated_at=now)
        else:
            changed, _ = guarded.delete()
            AlarmAttempt.objects.filter(message_id__in=[message_id for _, message_id, *_ in found]).delete()
        if changed != len(found):
            raise ClaimConflict(f"cancelled {changed} of {len(found)} alarms; another process changed them")
    ahead = [
        (message_id, attempt) for _, message_id, state, attempt, due in found if state == states.PUBLISHED and due > now
    ]
    return [message_id for _, message_id, *_ in found], ahead


def reschedule(scheduller: str, message_id: str, dispatch_at: dt.datetime, now: dt.datetime) -> bool:
    """Move a pending alarm to ``dispatch_at``; False when it is not pending (published, ended, gone)."""
    changed = Alarm.objects.filter(
        scheduller=scheduller, message_id=message_id, state__in=states.TRANSITIONS["reschedule"]
    ).update(dispatch_at=dispatch_at, updated_at=now)
    return changed > 0


def restart(scheduller: str, message_id: str, dispatch_at: dt.datetime, now: dt.datetime) -> bool:
    """Put an ended (finished, failed, cancelled) alarm back on the schedule at ``dispatch_at``."""
    row = (
        Alarm.objects.filter(scheduller=scheduller, message_id=message_id, state__in=states.TRANSITIONS["restart"])
        .values("pk", "assigns", "state")
        .first()
    )
    if row is None:
        return False
    assigns = {**row["assigns"], "dispatch_at": to_json_value(dispatch_at)}
    changed = Alarm.objects.filter(pk=row["pk"], state=row["state"]).update(
        state=states.PENDING,
        dispatch_at=dispatch_at,
        assigns=assigns,
        deadline=None,
        finished_at=None,
        callback_failures=0,
        failing=False,
        updated_at=now,
    )
    return changed > 0


def prune(before: dt.datetime, limit: int) -> int:
    """Remove up to ``limit`` ended alarms (and their attempt history) that ended before ``before``."""
    with db.atomic():
        found = list(
            Alarm.objects.filter(state__in=states.TRANSITIONS["prune"], finished_at__lt=before)
            .order_by("finished_at")
            .values_list("pk", "message_id")[:limit]
        )
        if not found:
            return 0
        deleted, _ = Alarm.objects.filter(
            pk__in=[pk for pk, _ in found], state__in=states.TRANSITIONS["prune"]
        ).delete()
        AlarmAttempt.objects.filter(message_id__in=[message_id for _, message_id in found]).delete()
    return deleted


def record_beat(
    name: str, started_at: dt.datetime, now: dt.datetime, windows: dict[str, str], published: int, timeouts: int
) -> None:
    """Record a beat's windows and counters for ``scheduller_status``."""
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


def _remove_ended(message_ids: list[str]) -> None:
    ended = list(
        Alarm.objects.filter(message_id__in=message_ids, state__in=states.ENDED).values_list("message_id", flat=True)
    )
    if ended:
        Alarm.objects.filter(message_id__in=ended, state__in=states.ENDED).delete()
        AlarmAttempt.objects.filter(message_id__in=ended).delete()


def _published_sql(ref: AttemptRef) -> tuple[str, list[Any]]:
    """``_published`` as SQL, for the PostgreSQL single-statement paths."""
    return "id = %s AND state = %s AND attempt = %s AND deadline = %s", [
        ref.pk,
        states.PUBLISHED,
        ref.attempt,
        ref.deadline,
    ]


def _published(ref: AttemptRef) -> QuerySet[Alarm]:
    return Alarm.objects.filter(pk=ref.pk, state=states.PUBLISHED, attempt=ref.attempt, deadline=ref.deadline)
