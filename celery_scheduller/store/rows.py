"""What the store reads and writes, independent of the database: the row fields beat and the hooks use,
a new alarm, a retry, and the values each transition is given."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..message import Message, Response, compact_json, from_json_value, to_json_value
from ..wire import AttemptRef
from .transitions import INSERT_COLUMNS

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

#: ``since`` of a claim from the beginning: before any time Django stores
BEGINNING = dt.datetime.min.replace(tzinfo=dt.UTC)


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

    def values(self) -> tuple[Any, ...]:
        """The row's ``INSERT_COLUMNS``, JSON as compact text."""
        message = self.message
        return (
            message.id,
            self.scheduller,
            message.service_name,
            self.raw_json or compact(message.raw_request, "raw_request"),
            self.assigns_json or compact(message.assigns, "assigns"),
            message.correlation_id,
            message.causation_id,
            self.aggregate_id,
            message.assigns["dispatch_at"],
            self.timeout_ms,
        )


assert len(INSERT_COLUMNS) == 10


@dataclasses.dataclass(frozen=True, slots=True)
class NewAttempt:
    """One retry: the alarm's next attempt at ``dispatch_at`` after ``response`` answered ``ref``."""

    ref: AttemptRef
    message: Message
    dispatch_at: dt.datetime
    timeout_ms: int
    response: Response | None
    now: dt.datetime
    decision: str = "retry"
    #: ``service_responded``'s failures in a row so far (0 after a valid answer)
    callback_failures: int = 0

    def prepared(self) -> tuple[dict[str, Any], Answered | None]:
        """``transitions.RETRY``'s given values (with ``now``) and the answered attempt's history row (None
        without a response); the response is made safe once for both."""
        stored = None if self.response is None else self.response.to_json()
        values = {
            "task_name": self.message.service_name,
            "raw_request": compact(self.message.raw_request, "raw_request"),
            "assigns": compact(self.message.assigns, "assigns"),
            "dispatch_at": self.dispatch_at,
            "timeout_ms": self.timeout_ms,
            "last_response": None if stored is None else compact_json(stored),
            "callback_failures": self.callback_failures,
            "failing": self.callback_failures > 0 or (stored is not None and stored["status"] != "ok"),
            "now": self.now,
        }
        return values, None if stored is None else Answered.of(self.ref, stored, self.now, self.decision)


@dataclasses.dataclass(frozen=True, slots=True)
class Answered:
    """An answered attempt's history row (``AlarmAttempt``): what a transition that records it writes."""

    ref: AttemptRef
    status: str
    error: str
    decision: str
    now: dt.datetime

    @classmethod
    def of(cls, ref: AttemptRef, stored: dict[str, Any], now: dt.datetime, decision: str) -> Answered:
        """From the response as stored (``Response.to_json``)."""
        return cls(ref, stored["status"], stored["error"] or "", decision[:50], now)


def compact(value: Any, where: str) -> str:
    """``value`` as compact JSON text, checked as every stored value is."""
    return compact_json(to_json_value(value, where))


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


def leased(
    rows: Iterable[dict[str, Any]], lease_until: dt.datetime, kept: dict[int, Response]
) -> list[tuple[AttemptRef, Message]]:
    """Leased attempts (``LEASE_TIMEOUT``) as beat answers them: the ref with its new deadline, and the message
    carrying the response the attempt kept when its ``service_responded`` failed (``kept``, by pk), else none
    (a timeout)."""
    return [
        (
            dataclasses.replace(AttemptRef.of_row(row), deadline=lease_until),
            message_from_row(row).with_response(kept.get(row["pk"])),
        )
        for row in rows
    ]


def decoded(found: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    """Claimed rows (``ROW_FIELDS`` values, JSON possibly as text) as dicts, earliest due first. A row whose
    JSON does not decode is marked ``unreadable``: beat fails it alone, its batch goes on."""
    rows = [dict(zip(ROW_FIELDS, values, strict=True)) for values in found]
    for row in rows:
        try:
            for field in ("raw_request", "assigns"):
                if isinstance(row[field], str):
                    row[field] = json.loads(row[field])
        except (ValueError, RecursionError) as exc:
            row["unreadable"] = f"{field}: {type(exc).__name__}: {exc}"
    rows.sort(key=lambda row: row["dispatch_at"])
    return rows
