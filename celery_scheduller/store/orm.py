"""The transitions as Django queries, rendered from ``transitions``: the form SQLite and MariaDB run, and
the one every database runs for the rarer changes (cancel, reschedule, restart, lease, prune)."""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from django.db.models import F, Q, QuerySet

from .. import compat, db, states
from ..exceptions import ClaimConflict
from ..models import Alarm, AlarmAttempt, TaskRecord
from ..wire import AttemptRef
from . import transitions as t
from .rows import ROW_FIELDS, Answered, NewAlarm


def guarded(transition: t.Transition, ref: AttemptRef) -> QuerySet[Alarm]:
    """The row ``transition`` may change: in one of its source states and, for a published attempt, still the
    attempt ``ref`` names."""
    conditions: dict[str, Any] = {"state__in": transition.source}
    for column in transition.guard:
        conditions["pk" if column == "id" else column] = getattr(ref, "pk" if column == "id" else column)
    return Alarm.objects.filter(**conditions)


def effect(transition: t.Transition, values: dict[str, Any], now: dt.datetime, **computed: Any) -> dict[str, Any]:
    """``transition``'s columns as ``QuerySet.update`` arguments; ``computed``: values the ORM cannot derive
    in SQL on every database (the claim's deadline)."""
    found: dict[str, Any] = {}
    for column, value in transition.columns():
        if isinstance(value, t.Given):
            given = values[value.key]
            found[column] = json.loads(given) if value.sql_type == "jsonb" and isinstance(given, str) else given
        elif isinstance(value, t.Fixed):
            found[column] = value.value
        elif isinstance(value, t.Now):
            found[column] = now
        elif isinstance(value, t.NextAttempt):
            found[column] = F(column) + 1
        else:
            found[column] = computed[column]
    return found


def record(answered: Answered) -> None:
    """The history row of an answered attempt."""
    AlarmAttempt.objects.create(
        message_id=answered.ref.message_id,
        attempt=answered.ref.attempt,
        published_at=answered.ref.published_at,
        responded_at=answered.now,
        status=answered.status,
        error=answered.error,
        decision=answered.decision,
    )


def update(
    transition: t.Transition, ref: AttemptRef, values: dict[str, Any], now: dt.datetime, answered: Answered | None
) -> bool:
    """``transition`` on the attempt ``ref``, with its history row when ``answered``: one transaction."""
    if answered is None:  # one statement: a transaction of its own
        return guarded(transition, ref).update(**effect(transition, values, now)) > 0
    with db.atomic():
        changed = guarded(transition, ref).update(**effect(transition, values, now))
        if changed:
            record(answered)
    return changed > 0


def remove(transition: t.Transition, ref: AttemptRef) -> bool:
    """``transition``'s removing form (history not kept): the row goes, and its attempt history with it."""
    deleted = compat.raw_delete(guarded(transition, ref))  # one DELETE: no collector, no transaction of its own
    if deleted and (ref.attempt > 1 or ref.callback_failures > 0):  # history rows exist
        AlarmAttempt.objects.filter(message_id=ref.message_id).delete()
    return deleted > 0


def _new_row(new: NewAlarm) -> Alarm:
    """The unsaved row of a new alarm (``transitions.INSERT_COLUMNS``, JSON decoded for the ORM)."""
    values = dict(zip((column for column, _ in t.INSERT_COLUMNS), new.values(), strict=True))
    for column, sql_type in t.INSERT_COLUMNS:
        if sql_type == "jsonb":
            values[column] = json.loads(values[column])
    return Alarm(**values, state=t.INSERTED_STATE)


def insert(batch: Sequence[NewAlarm]) -> None:
    Alarm.objects.bulk_create([_new_row(new) for new in batch], ignore_conflicts=True)


def insert_one(new: NewAlarm) -> bool:
    """Insert one alarm unless its id is stored (in a savepoint: the caller's transaction goes on); True
    when it was inserted."""
    from django.db import IntegrityError

    try:
        with db.atomic():
            _new_row(new).save(force_insert=True, using=db.alias())
    except IntegrityError:
        if not Alarm.objects.filter(message_id=new.message.id).exists():
            raise  # another constraint: not a duplicate id
        return False
    return True


def claim(
    schedullers: Sequence[str], now: dt.datetime, limit: int, until: dt.datetime, since: dt.datetime | None
) -> list[dict[str, Any]]:
    """``transitions.CLAIM`` of up to ``limit`` rows, locked first (skipping rows other beats hold)."""
    due = Alarm.objects.filter(state__in=t.CLAIM.source, scheduller__in=schedullers, dispatch_at__lte=until)
    if since is not None:
        due = due.filter(dispatch_at__gte=since)
    with db.atomic():
        rows = list(due.select_for_update(skip_locked=True).order_by("dispatch_at").values(*ROW_FIELDS)[:limit])
        # one update per timeout for the due alarms, one per timeout for those published ahead (the deadline
        # counts from the due time): ``DeadlineFromDue`` in terms every database's ORM has
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for row in rows:
            groups[row["timeout_ms"], row["dispatch_at"] > now].append(row["pk"])
        for (timeout_ms, ahead), pks in groups.items():
            timeout = dt.timedelta(milliseconds=timeout_ms)
            deadline = F("dispatch_at") + timeout if ahead else now + timeout
            changed = Alarm.objects.filter(pk__in=pks, state__in=t.CLAIM.source).update(
                **effect(t.CLAIM, {}, now, deadline=deadline)
            )
            if changed != len(pks):
                raise ClaimConflict(f"claimed {changed} of {len(pks)} locked alarms")
    for row in rows:
        row["attempt"] += 1
        row["deadline"] = max(now, row["dispatch_at"]) + dt.timedelta(milliseconds=row["timeout_ms"])
        row["published_at"] = now
    return rows


def count_in_flight(schedullers: Sequence[str], up_to: int, now: dt.datetime) -> int:
    published = Alarm.objects.filter(state=t.CLAIM.target, scheduller__in=schedullers, dispatch_at__lte=now)
    return published.values("pk")[:up_to].count()


def lease_timeouts(
    schedullers: Sequence[str], now: dt.datetime, lease_until: dt.datetime, limit: int
) -> list[dict[str, Any]]:
    """``transitions.LEASE_TIMEOUT``: published attempts whose deadline passed (or that have none: edited by
    hand, treated as overdue), locked and given to this caller until ``lease_until``."""
    overdue = Q(deadline__lte=now) | Q(deadline__isnull=True)
    source = t.LEASE_TIMEOUT.source
    with db.atomic():
        rows = list(
            Alarm.objects.select_for_update(skip_locked=True)
            .filter(overdue, state__in=source, scheduller__in=schedullers)
            .order_by("deadline")
            .values(*ROW_FIELDS)[:limit]
        )
        if rows:
            pks = [row["pk"] for row in rows]
            changed = Alarm.objects.filter(overdue, pk__in=pks, state__in=source).update(
                **effect(t.LEASE_TIMEOUT, {"lease_until": lease_until}, now)
            )
            if changed != len(pks):
                raise ClaimConflict(f"leased {changed} of {len(pks)} locked timeouts")
    return rows


def cancel(
    scheduller: str, now: dt.datetime, keep_history: bool, message_ids: Sequence[str], aggregate_id: str
) -> list[tuple[int, str, str, int, dt.datetime]]:
    """``transitions.CANCEL`` of alarms by id or by aggregate; returns ``(pk, message id, state, attempt,
    due)`` of each, as read before."""
    active = Alarm.objects.filter(scheduller=scheduller, state__in=t.CANCEL.source)
    query = active.filter(aggregate_id=aggregate_id) if aggregate_id else active.filter(message_id__in=message_ids)
    with db.atomic():
        # Locked as read: a beat claiming one of them meanwhile (publishing it ahead) has it locked, so this
        # waits and reads it published, and the caller revokes it; a later claim no longer finds it pending.
        found = list(query.select_for_update().values_list("pk", "message_id", "state", "attempt", "dispatch_at"))
        if not found:
            return []
        guarded_rows = active.filter(pk__in=[pk for pk, *_ in found])
        if keep_history:
            changed = guarded_rows.update(**effect(t.CANCEL, {}, now))
        else:
            changed, _ = guarded_rows.delete()
            AlarmAttempt.objects.filter(message_id__in=[message_id for _, message_id, *_ in found]).delete()
        if changed != len(found):
            raise ClaimConflict(f"cancelled {changed} of {len(found)} alarms; another process changed them")
    return found


def reschedule(
    scheduller: str, message_id: str, dispatch_at: dt.datetime, now: dt.datetime
) -> tuple[bool, tuple[str, int, int] | None]:
    """``transitions.RESCHEDULE``: a pending alarm, or one published ahead and due more than
    ``states.HANDOVER_MS`` after ``now``, to ``dispatch_at``. Returns whether it moved, and the ``(message id,
    attempt, pk)`` a worker holds when it was published ahead (the caller revokes it; the worker's guard drops it)."""
    movable = Q(state=states.PENDING) | Q(
        state=states.PUBLISHED, dispatch_at__gt=now + dt.timedelta(milliseconds=states.HANDOVER_MS)
    )
    with db.atomic():
        # Locked as read: a beat claiming it meanwhile skips it; a worker's guard waits for this to commit.
        found = (
            Alarm.objects.filter(movable, scheduller=scheduller, message_id=message_id, state__in=t.RESCHEDULE.source)
            .select_for_update()
            .values_list("pk", "state", "attempt")
            .first()
        )
        if found is None:
            return False, None
        pk, state, attempt = found
        changed = Alarm.objects.filter(pk=pk, state=state, attempt=attempt).update(
            **effect(t.RESCHEDULE, {"dispatch_at": dispatch_at}, now)
        )
    if not changed:
        return False, None
    return True, ((message_id, attempt, pk) if state == states.PUBLISHED else None)


#: What a worker does with an alarm it held ahead of its time, now due (``held_verdicts``).
RUN, DROP, WAIT = "run", "drop", "wait"


def held_rows(pks: Sequence[int]) -> dict[int, tuple[str, int, dt.datetime | None] | None]:
    """``postgres.held_rows`` through the ORM, in one short transaction: for each pk its (state, attempt,
    deadline) where this transaction could lock it, None while another one holds it; gone rows left out."""
    with db.atomic():
        rows: dict[int, tuple[str, int, dt.datetime | None] | None] = {
            pk: (state, attempt, deadline)
            for pk, state, attempt, deadline in Alarm.objects.filter(pk__in=pks)
            .select_for_update(skip_locked=True)
            .values_list("pk", "state", "attempt", "deadline")
        }
    missing = [pk for pk in pks if pk not in rows]
    locked = set(Alarm.objects.filter(pk__in=missing).values_list("pk", flat=True)) if missing else set()
    return {**rows, **{pk: None for pk in locked}}


def held_verdicts(
    refs: Sequence[AttemptRef], found: dict[int, tuple[str, int, dt.datetime | None] | None]
) -> dict[int, str]:
    """For each held attempt (by pk), from its row as ``held_rows`` found it: ``RUN`` while it is still the
    alarm's published attempt, ``DROP`` once it is not (cancelled, rescheduled, answered as lost, removed),
    ``WAIT`` while another transaction holds the row (a cancel or reschedule not yet committed: its outcome
    decides)."""
    verdicts = {}
    for ref in refs:
        if ref.pk not in found:
            verdicts[ref.pk] = DROP  # gone: ended and removed
        elif found[ref.pk] is None:
            verdicts[ref.pk] = WAIT
        else:
            current = found[ref.pk] == (states.PUBLISHED, ref.attempt, ref.deadline)
            verdicts[ref.pk] = RUN if current else DROP
    return verdicts


def restart(scheduller: str, message_id: str, dispatch_at: dt.datetime, now: dt.datetime) -> bool:
    """``transitions.RESTART``: an ended alarm back on the schedule at ``dispatch_at``."""
    from ..message import to_json_value

    row = (
        Alarm.objects.filter(scheduller=scheduller, message_id=message_id, state__in=t.RESTART.source)
        .values("pk", "assigns", "state")
        .first()
    )
    if row is None:
        return False
    assigns = {**row["assigns"], "dispatch_at": to_json_value(dispatch_at)}
    changed = Alarm.objects.filter(pk=row["pk"], state=row["state"]).update(
        **effect(t.RESTART, {"dispatch_at": dispatch_at, "assigns": assigns}, now)
    )
    return changed > 0


def prune(before: dt.datetime, limit: int) -> int:
    """``transitions.PRUNE``: up to ``limit`` ended alarms (and their history) that ended before ``before``."""
    with db.atomic():
        found = list(
            Alarm.objects.filter(state__in=t.PRUNE.source, finished_at__lt=before)
            .order_by("finished_at")
            .values_list("pk", "message_id")[:limit]
        )
        if not found:
            return 0
        deleted, _ = Alarm.objects.filter(pk__in=[pk for pk, _ in found], state__in=t.PRUNE.source).delete()
        AlarmAttempt.objects.filter(message_id__in=[message_id for _, message_id in found]).delete()
    return int(deleted)


def prune_backlog(before: dt.datetime, up_to: int) -> tuple[int, dt.datetime | None]:
    """How many ended alarms ended before ``before`` (counting at most ``up_to``), and when the oldest ended:
    what pruning has yet to remove. Both read the (finished_at, state) index from its oldest end."""
    ended = Alarm.objects.filter(state__in=t.PRUNE.source, finished_at__lt=before)
    oldest = ended.order_by("finished_at").values_list("finished_at", flat=True).first()
    if oldest is None:
        return 0, None
    return ended.order_by().values("pk")[:up_to].count(), oldest


def prune_task_records(now: dt.datetime, limit: int) -> int:
    """Up to ``limit`` Django Tasks results past their ``RESULT_TTL``, the longest expired first."""
    expired = list(
        TaskRecord.objects.filter(expires_at__lt=now).order_by("expires_at").values_list("pk", flat=True)[:limit]
    )
    if not expired:
        return 0
    deleted, _ = TaskRecord.objects.filter(pk__in=expired).delete()
    return int(deleted)


def remove_ended(message_ids: list[str]) -> None:
    """Ended alarms of these ids (kept as history) go, so the ids may be dispatched again."""
    ended = list(
        Alarm.objects.filter(message_id__in=message_ids, state__in=t.PRUNE.source).values_list("message_id", flat=True)
    )
    if ended:
        Alarm.objects.filter(message_id__in=ended, state__in=t.PRUNE.source).delete()
        AlarmAttempt.objects.filter(message_id__in=ended).delete()
