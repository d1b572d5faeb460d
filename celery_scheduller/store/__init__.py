"""Alarm state: the transitions (``transitions``), their database forms (``postgres``, ``orm``) behind
``DatabaseStore``, and an in-memory ``MemoryStore`` for tests of beat's decisions.

``Store`` is what beat's engine needs of a store; ``default`` is the project database's, and the module's
functions (``store.claim_due(…)``) are its methods.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..exceptions import ClaimConflict
from ..message import Message, Response
from ..wire import AttemptRef
from .database import DatabaseStore
from .rows import BEGINNING, ROW_FIELDS, NewAlarm, NewAttempt, message_from_row

__all__ = [
    "BEGINNING",
    "ROW_FIELDS",
    "AttemptRef",
    "ClaimConflict",
    "DatabaseStore",
    "NewAlarm",
    "NewAttempt",
    "Store",
    "default",
    "message_from_row",
]


class Store(Protocol):
    """What beat's engine reads and changes: due times, claims, releases, failures, timeouts, its record."""

    def message_from_row(self, row: dict[str, Any]) -> Message: ...

    def due_times_between(
        self, scheduller: str, load_from: dt.datetime | None, load_until: dt.datetime
    ) -> Iterable[tuple[str, dt.datetime]]: ...

    def claim_due(
        self,
        schedullers: Sequence[str],
        now: dt.datetime,
        limit: int,
        until: dt.datetime | None = None,
        since: dt.datetime | None = None,
    ) -> list[dict[str, Any]]: ...

    def claim_due_within(
        self,
        schedullers: Sequence[str],
        now: dt.datetime,
        limit: int,
        cap: int,
        until: dt.datetime | None = None,
        since: dt.datetime | None = None,
    ) -> tuple[int, list[dict[str, Any]]]: ...

    def release(self, refs: Iterable[AttemptRef], now: dt.datetime) -> int: ...

    def fail(self, ref: AttemptRef, reason: str, now: dt.datetime, response: Response | None = None) -> bool: ...

    def lease_timeouts(
        self, schedullers: Sequence[str], now: dt.datetime, lease_until: dt.datetime, limit: int
    ) -> list[tuple[AttemptRef, Message]]: ...

    def redecide(
        self, ref: AttemptRef, response: Response, deadline: dt.datetime, failures: int, note: str, now: dt.datetime
    ) -> bool: ...

    def record_beat(
        self,
        name: str,
        started_at: dt.datetime,
        now: dt.datetime,
        windows: dict[str, str],
        published: int,
        timeouts: int,
    ) -> None: ...

    def prune(self, before: dt.datetime, limit: int) -> int: ...

    def prune_task_records(self, now: dt.datetime, limit: int) -> int: ...

    def prune_backlog(self, before: dt.datetime, up_to: int) -> tuple[int, dt.datetime | None]: ...


#: The store on the project's database.
default = DatabaseStore()

insert = default.insert
insert_one = default.insert_one
stored = default.stored
pending_between = default.pending_between
due_times_between = default.due_times_between
on_schedule = default.on_schedule
count_in_flight = default.count_in_flight
claim_due = default.claim_due
claim_due_within = default.claim_due_within
release = default.release
lease_timeouts = default.lease_timeouts
record_beat = default.record_beat
prune = default.prune
prune_task_records = default.prune_task_records
prune_backlog = default.prune_backlog
finish = default.finish
finishes_in_one_statement = default.finishes_in_one_statement
finish_many = default.finish_many
fail = default.fail
redecide = default.redecide
retry = default.retry
retries_in_one_statement = default.retries_in_one_statement
retry_many = default.retry_many
is_current = default.is_current
held_verdicts = default.held_verdicts
cancel = default.cancel
reschedule = default.reschedule
restart = default.restart
