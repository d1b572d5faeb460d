"""The one writer of alarm state.

Every change is one conditional statement whose WHERE names the state (and, for a published alarm,
the attempt and deadline) it expects. Zero rows changed means another process got there first; the
functions report it (``False`` / an empty list) and callers log it, they never overwrite.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import transaction
from django.db.models import F, QuerySet

from . import states
from .message import Message, Response, from_json_value, to_json_value
from .models import Alarm

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
)


class ClaimConflict(Exception):
    """A guarded update changed fewer rows than were locked for it; the whole claim is rolled back."""


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptRef:
    """Names one published attempt of one alarm: the WHERE of every response write."""

    pk: int
    scheduller: str
    attempt: int
    deadline: dt.datetime

    def to_json(self) -> dict[str, Any]:
        """JSON-native form, carried in the task's headers."""
        return {
            "pk": self.pk,
            "scheduller": self.scheduller,
            "attempt": self.attempt,
            "deadline": self.deadline.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttemptRef:
        """Inverse of ``to_json``."""
        return cls(
            pk=int(data["pk"]),
            scheduller=str(data["scheduller"]),
            attempt=int(data["attempt"]),
            deadline=dt.datetime.fromisoformat(data["deadline"]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class NewAlarm:
    """An alarm ready to insert: a validated message with ``assigns["dispatch_at"]`` set."""

    scheduller: str
    message: Message
    aggregate_id: str
    timeout_ms: int


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


def insert(alarms: Sequence[NewAlarm], batch_size: int = 2_000) -> None:
    """Store new pending alarms; an id that already exists is left as it is (not raised)."""
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
        for new in alarms
    ]
    Alarm.objects.bulk_create(rows, batch_size=batch_size, ignore_conflicts=True)


def pending_between(
    scheduller: str, load_from: dt.datetime | None, load_until: dt.datetime
) -> Iterable[dict[str, Any]]:
    """Pending alarms due in ``(load_from, load_until]`` (everything up to ``load_until`` without a start)."""
    query = Alarm.objects.filter(scheduller=scheduller, state=states.PENDING, dispatch_at__lte=load_until)
    if load_from is not None:
        query = query.filter(dispatch_at__gt=load_from)
    rows: Iterable[dict[str, Any]] = query.order_by("dispatch_at").values(*ROW_FIELDS).iterator(chunk_size=5_000)
    return rows


def claim_due(schedullers: Sequence[str], now: dt.datetime, limit: int) -> list[dict[str, Any]]:
    """Claim up to ``limit`` pending alarms due at ``now``: pending → published, attempt + 1.

    Rows locked by another beat are skipped, so several beats share the work and each attempt is
    claimed by exactly one of them. Returned rows carry the new ``attempt`` and ``deadline``.
    """
    with transaction.atomic():
        rows = list(
            Alarm.objects.select_for_update(skip_locked=True)
            .filter(state=states.PENDING, scheduller__in=schedullers, dispatch_at__lte=now)
            .order_by("dispatch_at")
            .values(*ROW_FIELDS)[:limit]
        )
        by_timeout: dict[int, list[int]] = defaultdict(list)
        for row in rows:
            by_timeout[row["timeout_ms"]].append(row["pk"])
        for timeout_ms, pks in by_timeout.items():
            deadline = now + dt.timedelta(milliseconds=timeout_ms)
            changed = Alarm.objects.filter(pk__in=pks, state=states.PENDING).update(
                state=states.PUBLISHED,
                attempt=F("attempt") + 1,
                published_at=now,
                deadline=deadline,
                updated_at=now,
            )
            if changed != len(pks):
                raise ClaimConflict(f"claimed {changed} of {len(pks)} locked alarms")
    for row in rows:
        row["attempt"] += 1
        row["deadline"] = now + dt.timedelta(milliseconds=row["timeout_ms"])
    return rows


def release(refs: Iterable[AttemptRef], now: dt.datetime) -> int:
    """Return attempts whose publish failed to pending, so the next claim publishes them again."""
    released = 0
    for ref in refs:
        released += _published(ref).update(state=states.PENDING, deadline=None, published_at=None, updated_at=now)
    return released


def finish(ref: AttemptRef) -> bool:
    """End the alarm after ``OK``: remove it, if ``ref`` is still its current attempt."""
    deleted, _ = _published(ref).delete()
    return deleted > 0


def retry(
    ref: AttemptRef,
    message: Message,
    dispatch_at: dt.datetime,
    timeout_ms: int,
    response: Response | None,
    now: dt.datetime,
) -> bool:
    """Store ``message`` as the alarm's next attempt at ``dispatch_at``, if ``ref`` is still current."""
    changed: int = _published(ref).update(
        state=states.PENDING,
        task_name=message.service_name,
        raw_request=to_json_value(message.raw_request, "raw_request"),
        assigns=to_json_value(message.assigns, "assigns"),
        dispatch_at=dispatch_at,
        timeout_ms=timeout_ms,
        deadline=None,
        last_response=None if response is None else response.to_json(),
        updated_at=now,
    )
    return changed > 0


def lease_timeouts(
    schedullers: Sequence[str], now: dt.datetime, lease_until: dt.datetime, limit: int
) -> list[tuple[AttemptRef, Message]]:
    """Take published attempts whose deadline passed, moving their deadline to ``lease_until``.

    The lease makes one beat the handler of each timeout; if it dies before answering, another beat
    takes the attempt over once the lease runs out. A late worker response no longer matches the
    deadline and is ignored.
    """
    with transaction.atomic():
        rows = list(
            Alarm.objects.select_for_update(skip_locked=True)
            .filter(state=states.PUBLISHED, scheduller__in=schedullers, deadline__lte=now)
            .order_by("deadline")
            .values(*ROW_FIELDS)[:limit]
        )
        if rows:
            pks = [row["pk"] for row in rows]
            changed = Alarm.objects.filter(pk__in=pks, state=states.PUBLISHED, deadline__lte=now).update(
                deadline=lease_until, updated_at=now
            )
            if changed != len(pks):
                raise ClaimConflict(f"leased {changed} of {len(pks)} locked timeouts")
    return [
        (AttemptRef(row["pk"], row["scheduller"], row["attempt"], lease_until), message_from_row(row)) for row in rows
    ]


def published_attempt(message_id: str, attempt: int) -> tuple[AttemptRef, Message] | None:
    """The published attempt ``attempt`` of ``message_id``, or None if it is not the current one."""
    row = (
        Alarm.objects.filter(message_id=message_id, attempt=attempt, state=states.PUBLISHED).values(*ROW_FIELDS).first()
    )
    if row is None or row["deadline"] is None:
        return None
    return AttemptRef(row["pk"], row["scheduller"], row["attempt"], row["deadline"]), message_from_row(row)


def cancel(scheduller: str, message_ids: Iterable[str]) -> int:
    """Remove alarms by message id; a published attempt's late response is then ignored."""
    deleted, _ = Alarm.objects.filter(
        scheduller=scheduller, message_id__in=list(message_ids), state__in=states.TRANSITIONS["cancel"]
    ).delete()
    return deleted


def cancel_aggregate(scheduller: str, aggregate_id: str) -> int:
    """Remove every alarm of ``aggregate_id``."""
    deleted, _ = Alarm.objects.filter(
        scheduller=scheduller, aggregate_id=aggregate_id, state__in=states.TRANSITIONS["cancel"]
    ).delete()
    return deleted


def _published(ref: AttemptRef) -> QuerySet[Alarm]:
    return Alarm.objects.filter(pk=ref.pk, state=states.PUBLISHED, attempt=ref.attempt, deadline=ref.deadline)
