"""The transitions as PostgreSQL statements, rendered once at import from ``transitions``.

Each statement runs on a psycopg 3 cursor that binds parameters on the server (``bound_cursor``): a
statement run again and again on one connection is prepared once instead of quoted and planned per call.
Many rows go in one statement as arrays (``unnest``), guarded in the join by the same columns as one row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from .. import compat, db
from ..models import Alarm, AlarmAttempt
from ..wire import AttemptRef
from . import transitions as t
from .rows import BEGINNING, ROW_FIELDS, Answered, NewAlarm, decoded

ALARM = Alarm._meta.db_table
ATTEMPT = AlarmAttempt._meta.db_table

#: the guard columns of a published attempt: name, PostgreSQL type, value of an ``AttemptRef``
_REF_COLUMNS: dict[str, tuple[str, Callable[[AttemptRef], Any]]] = {
    "id": ("bigint", lambda ref: ref.pk),
    "attempt": ("int", lambda ref: ref.attempt),
    "deadline": ("timestamptz", lambda ref: ref.deadline),
}
#: an answered attempt's history columns: name, PostgreSQL type, value of an ``Answered``
_ANSWERED_COLUMNS: tuple[tuple[str, str, Callable[[Answered], Any]], ...] = (
    ("published_at", "timestamptz", lambda a: a.ref.published_at),
    ("status", "text", lambda a: a.status),
    ("error", "text", lambda a: a.error),
    ("decision", "text", lambda a: a.decision),
)
_HISTORY_INSERT = f"INSERT INTO {ATTEMPT} (message_id, attempt, published_at, responded_at, status, error, decision)"


def bound_cursor(*, binary: bool = False) -> Any:
    """A Django cursor (logged and counted like any other) over psycopg's server-binding cursor on the
    package's database; ``binary``: results in binary (no text parsing of timestamps)."""
    import psycopg

    connection = db.connection()
    connection.ensure_connection()
    cursor = psycopg.Cursor(connection.connection)
    if binary:
        cursor.format = psycopg.pq.Format.BINARY
    return compat.prepare_cursor(connection, cursor)


def pipeline_supported() -> bool:
    """psycopg's pipeline mode needs libpq 14 or later (its binary wheels bundle one)."""
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


# -- one row ------------------------------------------------------------------------------------------------


def _given(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda values: values[key]


def _fixed(value: Any) -> Callable[[Any], Any]:
    return lambda _ignored: value


def _set_one(transition: t.Transition) -> tuple[str, list[Callable[[dict[str, Any]], Any]]]:
    """The SET list of ``transition`` for one row, and a getter per parameter (from the call's values)."""
    parts: list[str] = []
    getters: list[Callable[[dict[str, Any]], Any]] = []
    for column, value in transition.columns():
        if isinstance(value, t.Given):
            parts.append(f"{column} = %s::jsonb" if value.sql_type == "jsonb" else f"{column} = %s")
            getters.append(_given(value.key))
        elif isinstance(value, t.Fixed) and value.value is None:
            parts.append(f"{column} = NULL")
        elif isinstance(value, t.Fixed):
            parts.append(f"{column} = %s")
            getters.append(_fixed(value.value))
        elif isinstance(value, t.Now):
            parts.append(f"{column} = %s")
            getters.append(lambda values: values["now"])
        elif isinstance(value, t.NextAttempt):
            parts.append(f"{column} = {column} + 1")
        else:  # DeadlineFromDue
            parts.append(f"{column} = GREATEST(%s, dispatch_at) + timeout_ms * interval '1 millisecond'")
            getters.append(lambda values: values["now"])
    return ", ".join(parts), getters


def _state_condition(transition: t.Transition, alias: str = "") -> tuple[str, Any]:
    source = transition.source
    if len(source) == 1:
        return f"{alias}state = %s", source[0]
    return f"{alias}state = ANY(%s)", list(source)


class GuardedUpdate:
    """``transition`` on one published attempt, with its history row where it records one: one statement."""

    def __init__(self, transition: t.Transition, *, record: bool = True) -> None:
        assert transition.guard == t.CURRENT_ATTEMPT and transition.target is not None
        self.transition = transition
        self.record = record and transition.records_attempt
        sets, self._getters = _set_one(transition)
        state, self._state = _state_condition(transition)
        where = " AND ".join([state, *(f"{column} = %s" for column in transition.guard)])
        update = f"UPDATE {ALARM} SET {sets} WHERE {where}"
        if self.record:
            self.sql = (
                f"WITH changed AS ({update} RETURNING message_id) {_HISTORY_INSERT} "
                "SELECT message_id, %s, %s, %s, %s, %s, %s FROM changed"
            )
        else:
            self.sql = update

    def params(self, ref: AttemptRef, values: dict[str, Any], answered: Answered | None) -> list[Any]:
        found = [getter(values) for getter in self._getters]
        found.append(self._state)
        found.extend(_REF_COLUMNS[column][1](ref) for column in self.transition.guard)
        if self.record:
            assert answered is not None
            found.extend((ref.attempt, ref.published_at, answered.now, answered.status, answered.error))
            found.append(answered.decision)
        return found

    def run(self, ref: AttemptRef, values: dict[str, Any], answered: Answered | None = None) -> bool:
        with bound_cursor() as cursor:
            cursor.execute(self.sql, self.params(ref, values, answered))
            return bool(cursor.rowcount > 0)


# -- many rows ----------------------------------------------------------------------------------------------


def _guard_arrays(transition: t.Transition) -> list[tuple[str, str, Callable[[AttemptRef], Any]]]:
    """The array columns of a guarded statement over many attempts: pk, state and the guard's columns."""
    state = transition.source[0]
    assert len(transition.source) == 1
    columns: list[tuple[str, str, Callable[[AttemptRef], Any]]] = [
        ("pk", "bigint", lambda ref: ref.pk),
        ("state", "text", _fixed(state)),
    ]
    columns.extend((column, *_REF_COLUMNS[column]) for column in transition.guard if column != "id")
    return columns


def _guard_join(transition: t.Transition) -> str:
    """The guard of many rows: found by pk alone (``id = ANY``), every other condition compared in the join.
    With ``a.state = 'published'`` as a filter of the table, the planner (trusting statistics taken while
    nearly every row was pending) hashed every published row on every call."""
    others = [f"a.{column} = r.{column}" for column in ("state", *transition.guard) if column != "id"]
    return " AND ".join(["a.id = ANY(%s::bigint[])", "a.id = r.pk", *others])


class GuardedMany:
    """``transition`` for many published attempts (of distinct alarms) in one statement; a removing
    transition deletes the rows (and the history of those with earlier attempts). ``run`` returns the pks
    of the alarms changed: the others were answered, timed out or cancelled meanwhile."""

    def __init__(self, transition: t.Transition, *, remove: bool = False) -> None:
        self.transition, self.remove = transition, remove
        self._guards = _guard_arrays(transition)
        self._given = list(transition.given())
        arrays = [(name, sql_type) for name, sql_type, _ in self._guards]
        if not remove:
            arrays += [(given.key, "text" if given.sql_type == "jsonb" else given.sql_type) for given in self._given]
            arrays.append(("now", "timestamptz"))
        if transition.records_attempt and not remove:
            arrays += [(name, sql_type) for name, sql_type, _ in _ANSWERED_COLUMNS]
        unnest = ", ".join(f"%s::{sql_type}[]" for _, sql_type in arrays)
        names = ", ".join(name for name, _ in arrays)
        join = _guard_join(transition)
        if remove:
            self.sql = (
                f"WITH gone AS (DELETE FROM {ALARM} a USING unnest({unnest}) AS r({names}) WHERE {join} "
                "RETURNING a.id, a.message_id, a.attempt, a.callback_failures), "
                f"history AS (DELETE FROM {ATTEMPT} "
                "WHERE message_id IN (SELECT message_id FROM gone WHERE attempt > 1 OR callback_failures > 0)) "
                "SELECT id FROM gone"
            )
            return
        sets = []
        self._fixed: list[Any] = []
        for column, value in transition.columns():
            if isinstance(value, t.Given):
                sets.append(f"{column} = r.{value.key}" + ("::jsonb" if value.sql_type == "jsonb" else ""))
            elif isinstance(value, t.Fixed) and value.value is None:
                sets.append(f"{column} = NULL")
            elif isinstance(value, t.Fixed):
                sets.append(f"{column} = %s")
                self._fixed.append(value.value)
            elif isinstance(value, t.Now):
                sets.append(f"{column} = r.now")
            else:
                raise NotImplementedError(f"{transition.name}: {value!r} in a statement over many rows")
        returning = "a.id"
        if transition.records_attempt:
            returning = "a.id, a.message_id, r.attempt, r.published_at, r.now, r.status, r.error, r.decision"
        update = f"UPDATE {ALARM} a SET {', '.join(sets)} FROM r WHERE {join} RETURNING {returning}"
        steps = [f"r AS (SELECT * FROM unnest({unnest}) AS r({names}))", f"changed AS ({update})"]
        if transition.records_attempt:
            steps.append(
                f"history AS ({_HISTORY_INSERT} SELECT message_id, attempt, published_at, now, status, error, "
                "decision FROM changed WHERE status IS NOT NULL)"
            )
        self.sql = f"WITH {', '.join(steps)} SELECT id FROM changed"

    def params(
        self,
        refs: Sequence[AttemptRef],
        values: Sequence[dict[str, Any]] = (),
        answered: Sequence[Answered | None] = (),
    ) -> list[Any]:
        found: list[Any] = [[get(ref) for ref in refs] for _, _, get in self._guards]
        if not self.remove:
            found += [[row[given.key] for row in values] for given in self._given]
            found.append([row["now"] for row in values])
            if self.transition.records_attempt:
                found += [[None if a is None else get(a) for a in answered] for _, _, get in _ANSWERED_COLUMNS]
            found += self._fixed
        found.append([ref.pk for ref in refs])
        return found

    def run(
        self,
        refs: Sequence[AttemptRef],
        values: Sequence[dict[str, Any]] = (),
        answered: Sequence[Answered | None] = (),
    ) -> set[int]:
        with bound_cursor() as cursor:
            cursor.execute(self.sql, self.params(refs, values, answered))
            return {pk for (pk,) in cursor.fetchall()}


FINISH_KEPT = GuardedUpdate(t.FINISH)
FAIL = GuardedUpdate(t.FAIL)
#: the one-row statement of each transition that ends an alarm with its response (history kept)
ENDING = {t.FINISH.name: FINISH_KEPT, t.FAIL.name: FAIL}
RETRY = GuardedUpdate(t.RETRY)
#: a retry that answers no response (nothing to record)
RETRY_UNANSWERED = GuardedUpdate(t.RETRY, record=False)
RETRY_MANY = GuardedMany(t.RETRY)
REDECIDE = GuardedUpdate(t.REDECIDE)
FINISH_REMOVED_MANY = GuardedMany(t.FINISH, remove=True)


# -- claim ----------------------------------------------------------------------------------------------------

# the published attempts of the Schedullers ``ANY(%s)`` due by ``%s``, at most ``LIMIT %s`` of them (one range
# of the (scheduller, state, dispatch_at) index per Scheduller)
IN_FLIGHT = f"SELECT 1 FROM {ALARM} WHERE state = %s AND scheduller = ANY(%s) AND dispatch_at <= %s LIMIT %s"
COUNT_IN_FLIGHT = f"SELECT count(*) FROM ({IN_FLIGHT}) f"


def _claim_sql(limit: str) -> str:
    """``transitions.CLAIM`` of at most ``limit`` (SQL) rows; parameters from ``claim_params``.

    The claimed ids are collected first (``ARRAY(…)``, evaluated once) and the rows updated by pk: as
    ``id IN (SELECT …)`` the planner joined them with a scan of the whole table. The due rows are read per
    Scheduller (``LATERAL``), each as one ordered range of the (scheduller, state, dispatch_at) index, so a
    claim reads about as many rows as it takes. The range starts at ``since`` (beat's floor): each claimed
    row leaves its pending index entry behind until VACUUM, and a claim from the beginning would walk them.
    Rows locked beyond the outer ``LIMIT`` stay pending and are let go when the statement ends.
    """
    sets, _getters = _set_one(t.CLAIM)
    # the JSON columns as text, decoded row by row (``rows.decoded``): one undecodable row fails alone
    as_text = {"pk": "id", "raw_request": "raw_request::text", "assigns": "assigns::text"}
    columns = ", ".join(as_text.get(field, field) for field in ROW_FIELDS)
    return (
        f"UPDATE {ALARM} SET {sets} "
        "WHERE id = ANY(ARRAY(SELECT due.id FROM unnest(%s::text[]) AS served(name), "
        f"LATERAL (SELECT id, dispatch_at FROM {ALARM} "
        "WHERE scheduller = served.name AND state = %s AND dispatch_at BETWEEN %s AND %s "
        f"ORDER BY dispatch_at LIMIT {limit} FOR UPDATE SKIP LOCKED) due "
        f"ORDER BY due.dispatch_at LIMIT {limit})) "
        f"RETURNING {columns}"
    )


_CLAIM_SET_GETTERS = _set_one(t.CLAIM)[1]
#: ``claim_due``'s statement, and ``claim_due_within``'s (the room under the cap, and a claim of that many)
CLAIM = _claim_sql("%s")
CLAIM_WITHIN = (
    f"WITH room AS (SELECT %s - count(*) AS n FROM ({IN_FLIGHT}) f), "
    f"claimed AS ({_claim_sql('LEAST(%s, GREATEST((SELECT n FROM room), 0))')}) "
    "SELECT room.n, claimed.* FROM room LEFT JOIN claimed ON true"
)


def claim_params(
    schedullers: Sequence[str],
    now: dt.datetime,
    limit: int,
    until: dt.datetime | None = None,
    since: dt.datetime | None = None,
) -> list[Any]:
    (source,) = t.CLAIM.source
    set_params = [getter({"now": now}) for getter in _CLAIM_SET_GETTERS]
    until = now if until is None else until
    since = BEGINNING if since is None else since
    return [*set_params, list(schedullers), source, since, until, limit, limit]


def claim_within_params(
    schedullers: Sequence[str],
    now: dt.datetime,
    limit: int,
    cap: int,
    until: dt.datetime | None = None,
    since: dt.datetime | None = None,
) -> list[Any]:
    return [cap, t.CLAIM.target, list(schedullers), now, cap, *claim_params(schedullers, now, limit, until, since)]


def claim(
    schedullers: Sequence[str], now: dt.datetime, limit: int, until: dt.datetime | None, since: dt.datetime | None
) -> list[dict[str, Any]]:
    with bound_cursor(binary=True) as cursor:
        cursor.execute(CLAIM, claim_params(schedullers, now, limit, until, since))
        return decoded(cursor.fetchall())


def claim_within(
    schedullers: Sequence[str],
    now: dt.datetime,
    limit: int,
    cap: int,
    until: dt.datetime | None,
    since: dt.datetime | None,
) -> tuple[int, list[dict[str, Any]]]:
    with bound_cursor(binary=True) as cursor:
        cursor.execute(CLAIM_WITHIN, claim_within_params(schedullers, now, limit, cap, until, since))
        found = cursor.fetchall()
    # one row per claimed alarm, each with the room; one of NULLs beside it when none was claimed
    return int(found[0][0]), decoded([values[1:] for values in found if values[1] is not None])


def count_in_flight(schedullers: Sequence[str], up_to: int, now: dt.datetime) -> int:
    with bound_cursor() as cursor:
        cursor.execute(COUNT_IN_FLIGHT, [t.CLAIM.target, list(schedullers), now, up_to])
        return int(cursor.fetchone()[0])


# -- insert ---------------------------------------------------------------------------------------------------

_INSERT_HEAD = (
    f"INSERT INTO {ALARM} (state, {', '.join(column for column, _ in t.INSERT_COLUMNS)}, attempt, created_at, "
    "updated_at) "
)
#: one row (``dispatch``: costs less to send than ten one-element arrays)
INSERT_ONE = (
    _INSERT_HEAD
    + "VALUES (%s, "
    + ", ".join("%s::jsonb" if sql_type == "jsonb" else "%s" for _, sql_type in t.INSERT_COLUMNS)
    + ", 0, now(), now()) ON CONFLICT (message_id) DO NOTHING"
)
#: one row, answering whether it was inserted (``dispatch``): a row comes back only for a new alarm
INSERT_ONE_RETURNING = INSERT_ONE + " RETURNING id"
#: a batch: one ``INSERT … SELECT FROM unnest(…)``, column arrays bound on the server in binary (``%b``)
INSERT_MANY = (
    _INSERT_HEAD
    + "SELECT %s, "
    + ", ".join(f"{column}::jsonb" if sql_type == "jsonb" else column for column, sql_type in t.INSERT_COLUMNS)
    + ", 0, now(), now() FROM unnest("
    + ", ".join(f"%b::{'text' if sql_type == 'jsonb' else sql_type}[]" for _, sql_type in t.INSERT_COLUMNS)
    + f") AS x({', '.join(column for column, _ in t.INSERT_COLUMNS)}) ON CONFLICT (message_id) DO NOTHING"
)


def insert_params(batch: Sequence[NewAlarm]) -> list[Any]:
    rows = [new.values() for new in batch]
    if len(batch) == 1:
        return [t.INSERTED_STATE, *rows[0]]
    return [t.INSERTED_STATE, *(list(column) for column in zip(*rows, strict=True))]


def insert(batch: Sequence[NewAlarm], cursor: Any) -> None:
    cursor.execute(INSERT_ONE if len(batch) == 1 else INSERT_MANY, insert_params(batch))


def insert_one(new: NewAlarm) -> bool:
    """Insert one alarm unless its id is stored; True when it was inserted."""
    with bound_cursor() as cursor:
        cursor.execute(INSERT_ONE_RETURNING, insert_params([new]))
        return cursor.fetchone() is not None


# -- prune ----------------------------------------------------------------------------------------------------

#: ``transitions.PRUNE`` of the oldest ended alarms (``LIMIT %s``) that ended before ``%s``, with their
#: history, in one statement. Rows another beat's pruner holds are skipped, not waited for; only ended rows
#: are read (the (finished_at, state) index, oldest first), so claims and answers never meet its locks.
PRUNE = (
    f"WITH doomed AS (SELECT id, message_id FROM {ALARM} WHERE finished_at < %s AND state = ANY(%s) "
    "ORDER BY finished_at LIMIT %s FOR UPDATE SKIP LOCKED), "
    f"gone AS (DELETE FROM {ALARM} a USING doomed d WHERE a.id = d.id RETURNING a.message_id), "
    f"history AS (DELETE FROM {ATTEMPT} h WHERE h.message_id IN (SELECT message_id FROM gone)) "
    "SELECT count(*) FROM gone"
)


def prune(before: dt.datetime, limit: int) -> int:
    with bound_cursor() as cursor:
        cursor.execute(PRUNE, [before, list(t.PRUNE.source), limit])
        return int(cursor.fetchone()[0])


# -- the worker's look at the alarms it holds (``prefetch.Guard``) --------------------------------------------

#: Per pk: the row's state, attempt and deadline where it is not locked by another transaction (a cancel or
#: reschedule not yet committed), and whether the row exists at all (locked rows are seen by the plain read).
#: One statement, in autocommit its own transaction: its row locks end with it.
HELD = (
    "SELECT wanted.id, mine.state, mine.attempt, mine.deadline, "
    f"EXISTS (SELECT 1 FROM {ALARM} seen WHERE seen.id = wanted.id) "
    "FROM unnest(%s::bigint[]) AS wanted(id) "
    f"LEFT JOIN LATERAL (SELECT state, attempt, deadline FROM {ALARM} held WHERE held.id = wanted.id "
    "FOR UPDATE SKIP LOCKED) mine ON true"
)


def held_rows(pks: Sequence[int]) -> dict[int, tuple[str, int, dt.datetime | None] | None]:
    """For each pk: its (state, attempt, deadline) when this statement could lock it, None while another
    transaction holds it; pks of rows that are gone are left out."""
    with bound_cursor(binary=True) as cursor:
        cursor.execute(HELD, [list(pks)])
        found = cursor.fetchall()
    return {
        pk: (state, attempt, deadline) if state is not None else None
        for pk, state, attempt, deadline, exists in found
        if exists or state is not None
    }
