"""The alarm state machine, each transition defined once.

A transition names the states it starts from (``states.TRANSITIONS``) and ends in (``states.TARGETS``),
the guard the row must still pass (for a published alarm: still the attempt the caller read, by attempt
and deadline) and its effect (the columns it writes and where each value comes from). Every form of a
transition is rendered from its definition here: ``postgres`` (one row, or many from arrays in one
statement), ``orm`` (SQLite and MariaDB) and ``memory`` (the unit tests' store). A change to a guard or an
effect is made once and reaches every database.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import states


@dataclasses.dataclass(frozen=True, slots=True)
class Given:
    """A value the caller passes under ``key``; ``sql_type`` is its PostgreSQL type (``jsonb`` is sent as
    compact JSON text and cast)."""

    key: str
    sql_type: str


@dataclasses.dataclass(frozen=True, slots=True)
class Fixed:
    """A constant."""

    value: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Now:
    """The time of the call."""


@dataclasses.dataclass(frozen=True, slots=True)
class NextAttempt:
    """``attempt + 1``."""


@dataclasses.dataclass(frozen=True, slots=True)
class DeadlineFromDue:
    """``timeout_ms`` after the later of now and the due time: an alarm published ahead of its time has
    its whole response time from that time on."""


Value = Given | Fixed | Now | NextAttempt | DeadlineFromDue

NULL = Fixed(None)
NOW = Now()

#: The guard of a published alarm's transitions: the row is still the attempt the caller read. A later
#: claim, a timeout's lease or a cancel changed one of these, and the transition changes nothing.
CURRENT_ATTEMPT: tuple[str, ...] = ("id", "attempt", "deadline")


@dataclasses.dataclass(frozen=True, slots=True)
class Transition:
    """One state change: ``guard`` columns compared with the caller's values, ``effect`` written."""

    name: str
    guard: tuple[str, ...]
    effect: tuple[tuple[str, Value], ...]
    #: writes the answered attempt's history row (``AlarmAttempt``) with the change
    records_attempt: bool = False
    #: without history kept (``KEEP_FINISHED`` None) the row is deleted instead
    removes_without_history: bool = False
    #: which rows it takes, where that is a range rather than the caller's values (for the docs' table)
    takes: str = ""

    @property
    def source(self) -> tuple[str, ...]:
        return states.TRANSITIONS[self.name]

    @property
    def target(self) -> str | None:
        return states.TARGETS[self.name]

    def columns(self) -> tuple[tuple[str, Value], ...]:
        """The effect with the target state first (a removing transition writes no state)."""
        target = self.target
        return self.effect if target is None else (("state", Fixed(target)), *self.effect)

    def given(self) -> tuple[Given, ...]:
        """The values the caller passes, in the effect's order."""
        return tuple(value for _column, value in self.effect if isinstance(value, Given))


RESPONSE = Given("last_response", "jsonb")

CLAIM = Transition(
    "claim",
    guard=(),
    effect=(("attempt", NextAttempt()), ("published_at", NOW), ("deadline", DeadlineFromDue()), ("updated_at", NOW)),
    takes="due in the claim's range, earliest first, skipping rows another beat has locked",
)
RELEASE = Transition("release", CURRENT_ATTEMPT, (("deadline", NULL), ("published_at", NULL), ("updated_at", NOW)))
FINISH = Transition(
    "finish",
    CURRENT_ATTEMPT,
    (("deadline", NULL), ("finished_at", NOW), ("last_response", RESPONSE), ("updated_at", NOW)),
    records_attempt=True,
    removes_without_history=True,
)
FAIL = Transition("fail", CURRENT_ATTEMPT, FINISH.effect, records_attempt=True)
RETRY = Transition(
    "retry",
    CURRENT_ATTEMPT,
    (
        ("task_name", Given("task_name", "text")),
        ("raw_request", Given("raw_request", "jsonb")),
        ("assigns", Given("assigns", "jsonb")),
        ("dispatch_at", Given("dispatch_at", "timestamptz")),
        ("timeout_ms", Given("timeout_ms", "int")),
        ("deadline", NULL),
        ("last_response", RESPONSE),
        ("callback_failures", Given("callback_failures", "int")),
        ("failing", Given("failing", "bool")),
        ("updated_at", NOW),
    ),
    records_attempt=True,
)
#: a published attempt whose deadline passed (or that has none: edited by hand) is leased to one beat
LEASE_TIMEOUT = Transition(
    "lease_timeout",
    (),
    (("deadline", Given("lease_until", "timestamptz")), ("updated_at", NOW)),
    takes="deadline passed (or none), skipping rows another beat has locked",
)
#: ``service_responded`` failed (raised, answered garbage, overran its budget): the attempt stays published with
#: its response, to be decided again when the new deadline (now + the back-off) passes, as beat answers a
#: timeout; the task does not run again. The history row keeps the task's outcome beside the failure.
REDECIDE = Transition(
    "redecide",
    CURRENT_ATTEMPT,
    (
        ("deadline", Given("deadline", "timestamptz")),
        ("last_response", RESPONSE),
        ("callback_failures", Given("callback_failures", "int")),
        ("failing", Fixed(True)),
        ("updated_at", NOW),
    ),
    records_attempt=True,
)
CANCEL = Transition(
    "cancel", ("id",), (("deadline", NULL), ("finished_at", NOW), ("updated_at", NOW)), removes_without_history=True
)
#: a published alarm is moved only while a worker holds it ahead of its time (more than ``states.HANDOVER_MS``
#: before it): back to pending, its next claim a new attempt; the held one is dropped by the worker (``guard``)
RESCHEDULE = Transition(
    "reschedule",
    (),
    (
        ("dispatch_at", Given("dispatch_at", "timestamptz")),
        ("deadline", NULL),
        ("published_at", NULL),
        ("updated_at", NOW),
    ),
    takes="the Scheduller's alarm of that message id; published: due more than HANDOVER_MS later",
)
RESTART = Transition(
    "restart",
    ("id",),
    (
        ("dispatch_at", Given("dispatch_at", "timestamptz")),
        ("assigns", Given("assigns", "jsonb")),
        ("deadline", NULL),
        ("finished_at", NULL),
        ("callback_failures", Fixed(0)),
        ("failing", Fixed(False)),
        ("updated_at", NOW),
    ),
)
PRUNE = Transition("prune", ("id",), (), takes="ended before KEEP_FINISHED ago, oldest first")

ALL: dict[str, Transition] = {
    t.name: t
    for t in (CLAIM, RELEASE, FINISH, FAIL, RETRY, LEASE_TIMEOUT, REDECIDE, CANCEL, RESCHEDULE, RESTART, PRUNE)
}
assert set(ALL) == set(states.TRANSITIONS) == set(states.TARGETS), "states and transitions disagree"

#: What a new alarm row holds: column, PostgreSQL type (a value of ``rows.NewAlarm``), in insert order.
INSERT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("message_id", "text"),
    ("scheduller", "text"),
    ("task_name", "text"),
    ("raw_request", "jsonb"),
    ("assigns", "jsonb"),
    ("correlation_id", "text"),
    ("causation_id", "text"),
    ("aggregate_id", "text"),
    ("dispatch_at", "timestamptz"),
    ("timeout_ms", "int"),
)
#: the state a new alarm starts in, as ``dispatch`` (not a transition: the row did not exist)
INSERTED_STATE = states.PENDING
