"""An in-memory store for fast tests of beat's decisions: the same transitions (``transitions``) applied to
dicts, with no database. JSON columns are kept as text, as the database returns them to a claim, and
decoded by the same code (``rows.decoded``). Not safe across processes; a test drives one engine with it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..message import Message, Response
from ..wire import AttemptRef
from . import transitions as t
from .rows import ROW_FIELDS, NewAlarm, decoded, leased, message_from_row


class MemoryStore:
    """``Store`` over a dict of rows. ``calls`` records each claim ``(until, since, limit)`` and each count of
    the attempts in flight, so a test can see what beat asked for."""

    message_from_row = staticmethod(message_from_row)

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.beats: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self._next_pk = 1

    # -- setting up -----------------------------------------------------------------------------------------

    def insert(self, batches: Iterable[Sequence[NewAlarm]], keep_history: bool = False, **_: Any) -> None:
        names = [column for column, _ in t.INSERT_COLUMNS]
        known = {row["message_id"] for row in self.rows.values()}
        for batch in batches:
            for new in batch:
                if new.message.id in known:
                    continue
                row = dict(zip(names, new.values(), strict=True))
                row.update(
                    pk=self._next_pk,
                    state=t.INSERTED_STATE,
                    attempt=0,
                    deadline=None,
                    published_at=None,
                    finished_at=None,
                    callback_failures=0,
                    last_response=None,
                )
                self.rows[self._next_pk] = row
                known.add(new.message.id)
                self._next_pk += 1

    def add(self, message_id: str, due: dt.datetime, scheduller: str = "tests", timeout_ms: int = 5_000) -> None:
        """A pending alarm of ``testapp.record`` due at ``due``."""
        message = Message.new("testapp.record", id=message_id, assigns={"dispatch_at": due})
        self.insert([[NewAlarm(scheduller, message, "agg", timeout_ms)]])

    def state_of(self, message_id: str) -> str:
        return str(next(row["state"] for row in self.rows.values() if row["message_id"] == message_id))

    # -- the transitions ------------------------------------------------------------------------------------

    def _apply(self, transition: t.Transition, row: dict[str, Any], values: dict[str, Any], now: dt.datetime) -> None:
        for column, value in transition.columns():
            if isinstance(value, t.Given):
                row[column] = values[value.key]
            elif isinstance(value, t.Fixed):
                row[column] = value.value
            elif isinstance(value, t.Now):
                row[column] = now
            elif isinstance(value, t.NextAttempt):
                row[column] += 1
            else:  # DeadlineFromDue
                row[column] = max(now, row["dispatch_at"]) + dt.timedelta(milliseconds=row["timeout_ms"])

    def _current(self, transition: t.Transition, ref: AttemptRef) -> dict[str, Any] | None:
        row = self.rows.get(ref.pk)
        if row is None or row["state"] not in transition.source:
            return None
        if any(row["pk" if c == "id" else c] != getattr(ref, "pk" if c == "id" else c) for c in transition.guard):
            return None
        return row

    def _answer(
        self, transition: t.Transition, ref: AttemptRef, values: dict[str, Any], now: dt.datetime, remove: bool
    ) -> bool:
        row = self._current(transition, ref)
        if row is None:
            return False
        if remove:
            del self.rows[ref.pk]
        else:
            self._apply(transition, row, values, now)
        return True

    # -- Store ----------------------------------------------------------------------------------------------

    def due_times_between(
        self, scheduller: str, load_from: dt.datetime | None, load_until: dt.datetime
    ) -> list[tuple[str, dt.datetime]]:
        return [
            (row["message_id"], row["dispatch_at"])
            for row in self._pending(scheduller)
            if row["dispatch_at"] <= load_until and (load_from is None or row["dispatch_at"] > load_from)
        ]

    def _pending(self, *schedullers: str) -> list[dict[str, Any]]:
        found = [row for row in self.rows.values() if row["state"] == "pending" and row["scheduller"] in schedullers]
        return sorted(found, key=lambda row: row["dispatch_at"])

    def count_in_flight(self, schedullers: Sequence[str], up_to: int, now: dt.datetime) -> int:
        self.calls.append(("count",))
        published = [row for row in self.rows.values() if row["state"] == t.CLAIM.target and row["dispatch_at"] <= now]
        return min(up_to, sum(row["scheduller"] in schedullers for row in published))

    def claim_due(
        self,
        schedullers: Sequence[str],
        now: dt.datetime,
        limit: int,
        until: dt.datetime | None = None,
        since: dt.datetime | None = None,
    ) -> list[dict[str, Any]]:
        until = now if until is None else until
        self.calls.append(("claim", until, since, limit))
        due = [
            row
            for row in self._pending(*schedullers)
            if row["dispatch_at"] <= until and (since is None or row["dispatch_at"] >= since)
        ][:limit]
        for row in due:
            self._apply(t.CLAIM, row, {}, now)
        return decoded([tuple(row[field] for field in ROW_FIELDS) for row in due])

    def claim_due_within(
        self,
        schedullers: Sequence[str],
        now: dt.datetime,
        limit: int,
        cap: int,
        until: dt.datetime | None = None,
        since: dt.datetime | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        room = cap - self.count_in_flight(schedullers, cap, now)
        return room, self.claim_due(schedullers, now, min(limit, room), until, since) if room > 0 else []

    def release(self, refs: Iterable[AttemptRef], now: dt.datetime) -> int:
        return sum(self._answer(t.RELEASE, ref, {}, now, remove=False) for ref in refs)

    def fail(self, ref: AttemptRef, reason: str, now: dt.datetime, response: Response | None = None) -> bool:
        stored = (
            Response("error", error=reason).to_json() if response is None else {**response.to_json(), "reason": reason}
        )
        return self._answer(t.FAIL, ref, {"last_response": json.dumps(stored)}, now, remove=False)

    def finish(self, ref: AttemptRef, response: Response, now: dt.datetime, keep_history: bool = False) -> bool:
        values = {"last_response": json.dumps(response.to_json())}
        return self._answer(t.FINISH, ref, values, now, remove=not keep_history)

    def lease_timeouts(
        self, schedullers: Sequence[str], now: dt.datetime, lease_until: dt.datetime, limit: int
    ) -> list[tuple[AttemptRef, Message]]:
        overdue = [
            row
            for row in self.rows.values()
            if row["state"] in t.LEASE_TIMEOUT.source
            and row["scheduller"] in schedullers
            and (row["deadline"] is None or row["deadline"] <= now)
        ][:limit]
        kept = {}
        for row in overdue:
            self._apply(t.LEASE_TIMEOUT, row, {"lease_until": lease_until}, now)
            if row["callback_failures"] and row.get("last_response"):
                kept[row["pk"]] = Response.from_json(json.loads(row["last_response"]))
        return leased(decoded([tuple(row[field] for field in ROW_FIELDS) for row in overdue]), lease_until, kept)

    def redecide(
        self, ref: AttemptRef, response: Response, deadline: dt.datetime, failures: int, note: str, now: dt.datetime
    ) -> bool:
        values = {"deadline": deadline, "last_response": json.dumps(response.to_json()), "callback_failures": failures}
        return self._answer(t.REDECIDE, ref, values, now, remove=False)

    def record_beat(
        self,
        name: str,
        started_at: dt.datetime,
        now: dt.datetime,
        windows: dict[str, str],
        published: int,
        timeouts: int,
    ) -> None:
        self.beats[name] = {"started_at": started_at, "last_seen": now, "windows": windows, "published": published}

    def prune_task_records(self, now: dt.datetime, limit: int) -> int:
        return 0

    def _ended_before(self, before: dt.datetime) -> list[tuple[dt.datetime, int]]:
        return sorted(
            (row["finished_at"], pk)
            for pk, row in self.rows.items()
            if row["state"] in t.PRUNE.source and row["finished_at"] is not None and row["finished_at"] < before
        )

    def prune(self, before: dt.datetime, limit: int) -> int:
        ended = self._ended_before(before)[:limit]
        for _, pk in ended:
            del self.rows[pk]
        return len(ended)

    def prune_backlog(self, before: dt.datetime, up_to: int) -> tuple[int, dt.datetime | None]:
        ended = self._ended_before(before)
        return min(len(ended), up_to), ended[0][0] if ended else None
