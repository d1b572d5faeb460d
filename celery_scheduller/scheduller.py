"""The Scheduller behaviour: the seed's callbacks as methods, and the calls that schedule alarms."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, Final, final

from asgiref.sync import sync_to_async

from . import db, registry, tracing
from .checking import (  # noqa: F401  (part of this module's API)
    EARLIEST_DUE,
    LATEST_DUE,
    _check_task,
    broker_header_limit,
    due_time,
    encode_for_storage,
    known_tasks,
)
from .conf import settings
from .exceptions import InvalidAlarm
from .message import Message, refuse_nul


@final
class OkAnswer:
    """The type of the one value ``OK``: what ``service_responded`` returns when the alarm is done. It ends
    ``finished`` (kept as history for ``KEEP_FINISHED``, else removed at once). Compare with ``is OK``."""

    _instance: ClassVar[OkAnswer | None] = None

    def __new__(cls) -> OkAnswer:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "OK"


#: ``service_responded`` returns this when the alarm is done: it is removed from the schedule.
OK: Final = OkAnswer()


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """``service_responded``'s answer to deliver again ``in_ms`` from now, as ``message`` if given."""

    in_ms: int
    message: Message | None = None

    def __post_init__(self) -> None:
        if isinstance(self.in_ms, bool) or not isinstance(self.in_ms, int) or self.in_ms < 0:
            raise InvalidAlarm(f"Retry.in_ms must be a non-negative integer of milliseconds, got {self.in_ms!r}")
        if self.message is not None and not isinstance(self.message, Message):
            raise InvalidAlarm(f"Retry.message must be a Message, got {type(self.message).__name__}")


@dataclasses.dataclass(frozen=True, slots=True)
class Fail:
    """``service_responded``'s answer to give up: the alarm ends ``failed`` with ``reason``, its last response
    kept. It shows in the admin's failed view and ``scheduller_status``, ``alarm_failed`` is sent, and it can be
    restarted like any failed alarm; kept whatever ``KEEP_FINISHED`` says."""

    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise InvalidAlarm(f"Fail.reason must be a non-empty string, got {self.reason!r}")
        refuse_nul(self.reason, "Fail.reason")


#: What ``service_responded`` may return: ``OK``, a ``Retry`` or a ``Fail``.
Decision = OkAnswer | Retry | Fail

_DEFAULT_INTERVAL_MS = 60_000
#: the longest dispatch_timeout: what the timeout_ms column holds on PostgreSQL and MariaDB (2**31 - 1)
MAX_TIMEOUT_MS: Final = 2_147_483_647
# dispatch_many checks and stores alarms this many at a time (on PostgreSQL one stored while the next is checked)
_DISPATCH_BATCH = 2_000

logger = logging.getLogger("celery_scheduller")


def _revoke(attempts: Sequence[tuple[str, int, int]]) -> None:
    """Tell the workers to drop these attempts, published ahead of their time (``PUBLISH_AHEAD``) and
    cancelled or rescheduled before it: Celery's revoke, which frees a worker holding a task until its ``eta``.

    One try to reach the broker: where it fails, or a worker does not hear it (it was restarted, the task was
    delivered again to another), the worker's guard (``prefetch.GuardHeldAlarms``) drops the task when it
    comes due, having read that the attempt is no longer the alarm's.
    """
    from celery import current_app

    from .wire import task_id_of

    task_ids = [task_id_of(message_id, attempt, pk) for message_id, attempt, pk in attempts]
    try:
        with current_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            current_app.control.revoke(task_ids, connection=connection)
    except Exception as exc:  # the cancel stands; only the early drop is lost
        logger.warning(
            "could not revoke %s alarms published ahead (%s); their workers drop them when they come due",
            len(task_ids),
            exc,
            extra={"action": "revoke_failed", "count": len(task_ids)},
        )


def _now() -> dt.datetime:
    from . import clock

    return clock.default.now_datetime()


class Scheduller:
    """Subclass this, list it in ``CELERY_SCHEDULLER_CLASSES`` and implement ``service_responded``.

    Every method that reads the time takes ``now=`` (an aware datetime, default the current time): tests and
    replays pass their own.

    ``state`` is kept as ``self.state``. Callbacks run on one instance per class and process, built with
    the state the class was first constructed with (``use_state`` replaces it); constructing more
    instances (in views, in threads) does not change what callbacks see.
    """

    #: The name alarms are stored under (a column of each alarm row); default: the dotted path of the class.
    #: Renaming a class (or moving it to another module) without setting ``name`` strands its stored alarms
    #: under the old name: nobody serves them (``scheduller_status`` lists them as not served). Set ``name``
    #: once and keep it.
    name: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        registry.known(cls)

    def __init__(self, state: Any = None) -> None:
        self.state = state
        registry.serve(type(self), state)

    @classmethod
    def use_state(cls, state: Any) -> None:
        """Replace the state this class's callbacks run on in this process (a construction with a
        different state is refused instead)."""
        registry.serve(cls, state, replace=True)

    @classmethod
    def scheduller_name(cls) -> str:
        """The name alarms of this class are stored under."""
        return cls.name or f"{cls.__module__}.{cls.__qualname__}"

    # -- the seed's callbacks --------------------------------------------------------------------

    def service_responded(self, message: Message) -> Decision:
        """Called with ``message.response`` set; return ``OK`` (done), ``Retry(in_ms, message)`` (deliver again)
        or ``Fail(reason)`` (give up, visibly)."""
        raise NotImplementedError(f"{type(self).__name__} must implement service_responded")

    def in_memory_interval(self) -> int:
        """How often (ms) beat loads alarms; each load covers the next 2 × this. Default: 60,000 (a minute)."""
        return _DEFAULT_INTERVAL_MS

    def dispatch_timeout(self, message: Message) -> int:
        """How long (ms, counted from publish, or from the due time for an attempt published ahead) a response
        is waited for before a ``timeout``: the setting ``DISPATCH_TIMEOUT``, 5,000 by default (the seed's)."""
        from .conf import settings

        return settings.integer("DISPATCH_TIMEOUT")

    def save_alarm(self, message: Message, aggregate_id: str) -> None:
        """Persist ``message`` as a pending alarm; ``message.assigns["dispatch_at"]`` says when.

        Overrides must call ``super().save_alarm``: beat claims and publishes from the package's table.
        """
        self._insert([self._new_alarms([(message, aggregate_id, None, None)])])

    def _insert(self, batches: Iterable[list[Any]], *, pipelined: bool = False) -> None:
        """Store batches of new alarms, each made when the previous one is sent; announce the earliest to
        listening beats when it may be in a loaded window."""
        from . import store
        from .conf import settings

        due_times: list[dt.datetime] = []

        def noting_due_times() -> Iterator[list[Any]]:
            for batch in batches:
                due_times.extend(alarm.message.assigns["dispatch_at"] for alarm in batch)
                yield batch

        store.insert(noting_due_times(), settings.keeps_history(), pipelined=pipelined)
        if due_times:
            self._announce(min(due_times), max(due_times))

    def _announce(self, earliest: dt.datetime, latest: dt.datetime) -> None:
        """Tell listening beats of alarms now due in ``[earliest, latest]`` if they may be in a loaded window."""
        from . import notify

        if not notify.supported():
            return
        try:
            interval = int(self.in_memory_interval())
        except Exception:
            interval = 60_000  # beat reports the broken callback; the announcement is only an accelerator
        if earliest <= _now() + dt.timedelta(milliseconds=2 * interval):
            notify.announce(self.scheduller_name(), earliest, latest)

    def load_alarms(self, load_from: dt.datetime | None, load_until: dt.datetime) -> list[Message]:
        """Pending alarms due in ``(load_from, load_until]``; ``load_from`` is None on start."""
        from . import store

        rows = store.pending_between(self.scheduller_name(), load_from, load_until)
        return [store.message_from_row(row) for row in rows]

    # -- scheduling --------------------------------------------------------------------------------

    def dispatch(
        self,
        message: Message,
        aggregate_id: str,
        *,
        at: dt.datetime | None = None,
        in_ms: int | None = None,
        now: dt.datetime | None = None,
    ) -> Message:
        """Schedule ``message`` at ``at`` (aware) or ``in_ms`` from ``now``; return the Message stored under its
        id: this one (with ``assigns["dispatch_at"]``), or the one already scheduled, which is left unchanged.
        ``dispatch_or_get`` also says which. Inside ``transaction.atomic()`` the alarm commits or rolls back
        with the caller's data."""
        return self.dispatch_or_get(message, aggregate_id, at=at, in_ms=in_ms, now=now)[0]

    def dispatch_or_get(
        self,
        message: Message,
        aggregate_id: str,
        *,
        at: dt.datetime | None = None,
        in_ms: int | None = None,
        now: dt.datetime | None = None,
    ) -> tuple[Message, bool]:
        """``dispatch``, returning ``(stored message, created)``: ``created`` is False when the id was
        already on the schedule and this call was ignored (the stored message, with its own time, is returned).
        A new alarm costs one statement, a duplicate one more to read what is stored."""
        from . import store

        registry.check_served(type(self))
        prepared = self._prepare_encoded(message, aggregate_id, at, in_ms, now or _now())
        scheduled = prepared[0]
        if type(self).save_alarm is Scheduller.save_alarm:
            from .conf import settings

            [new] = self._new_prepared([(prepared, aggregate_id)])
            if store.insert_one(new, settings.keeps_history()):
                due = scheduled.assigns["dispatch_at"]
                self._announce(due, due)
                return scheduled, True
            existing = store.stored(scheduled.id)
            return (existing, False) if existing is not None else (scheduled, True)
        self.save_alarm(scheduled, aggregate_id)  # an override: what it stored is read back
        existing = store.stored(scheduled.id)
        if existing is None:
            return scheduled, True
        created = existing.raw_request == scheduled.raw_request and existing.assigns == scheduled.assigns
        return existing, created

    def dispatch_many(
        self,
        alarms: Iterable[tuple[Message, str, dt.datetime]],
        *,
        now: dt.datetime | None = None,
    ) -> list[Message]:
        """Schedule many ``(message, aggregate_id, at)`` at once, in one transaction: all, or none when one
        is refused (``InvalidAlarm`` naming it) or saving fails.

        Checked and stored in batches of 2,000: on PostgreSQL the database stores one batch
        while the next is checked. With ``save_alarm`` overridden, every alarm is checked before the first
        call of it (an override may do more than write to this database)."""
        registry.check_served(type(self))
        now = now or _now()
        alarms = list(alarms)
        for name in {message.service_name for message, _aggregate, _at in alarms if isinstance(message, Message)}:
            _check_task(name)  # each task name once, not once per alarm
        limit = settings.integer("MAX_PAYLOAD")
        header_limit = broker_header_limit()

        def checked(some: list[tuple[Message, str, dt.datetime]]) -> list[tuple[tuple[Message, str, str], str]]:
            return [
                (
                    self._prepare_encoded(message, aggregate_id, at, None, now, limit, header_limit, check_task=False),
                    aggregate_id,
                )
                for message, aggregate_id, at in some
            ]

        if type(self).save_alarm is not Scheduller.save_alarm:
            prepared = checked(alarms)
            with db.atomic():
                self._save(prepared)
            return [message for (message, _raw, _assigns), _aggregate in prepared]
        scheduled: list[Message] = []

        def batches() -> Iterator[list[Any]]:
            for start in range(0, len(alarms), _DISPATCH_BATCH):
                prepared = checked(alarms[start : start + _DISPATCH_BATCH])
                scheduled.extend(message for (message, _raw, _assigns), _aggregate in prepared)
                yield self._new_prepared(prepared)

        with db.atomic():
            self._insert(batches(), pipelined=len(alarms) > _DISPATCH_BATCH)
        return scheduled

    def pending(self, aggregate_id: str) -> list[Message]:
        """This Scheduller's alarms of ``aggregate_id`` still on the schedule (pending, or published and not
        yet answered), soonest first, each as the Message beat delivers (``assigns["dispatch_at"]`` is its
        time). Another Scheduller's alarms of the same aggregate are not among them."""
        from . import store

        return [store.message_from_row(row) for row in store.on_schedule(self.scheduller_name(), aggregate_id)]

    def cancel(self, message_id: str, *, now: dt.datetime | None = None) -> bool:
        """Take the alarm with this message id off the schedule; True if it was on it."""
        return len(self._cancel(now, message_ids=[message_id])) > 0

    def cancel_aggregate(self, aggregate_id: str, *, now: dt.datetime | None = None) -> int:
        """Take every alarm of ``aggregate_id`` that belongs to this Scheduller off the schedule (another
        Scheduller's alarms of the same aggregate stay); return how many there were."""
        return len(self._cancel(now, aggregate_id=aggregate_id))

    def reschedule(
        self,
        message_id: str,
        *,
        at: dt.datetime | None = None,
        in_ms: int | None = None,
        now: dt.datetime | None = None,
    ) -> bool:
        """Move an alarm that has not started to ``at`` or ``in_ms`` from now; False when it is not on the
        schedule or its task may be starting.

        A pending alarm moves. One published ahead of its time (``PUBLISH_AHEAD``: a worker holds it until
        then) moves while it is due more than ``states.HANDOVER_MS`` later: it is pending again, and the held
        task is revoked and, wherever the revoke does not reach, dropped by the worker when it comes due. An
        alarm due sooner, or published at its time, runs as it is: False."""
        from . import store

        registry.check_served(type(self))
        now = now or _now()
        due = due_time(at, in_ms, now)
        moved, held = store.reschedule(self.scheduller_name(), message_id, due, now)
        if held is not None:
            db.on_commit(lambda: _revoke([held]))
        if moved:
            self._announce(due, due)
        return moved

    def dispatch_now(self, message_id: str, *, now: dt.datetime | None = None) -> bool:
        """Make an alarm that has not started due at once (``reschedule`` with ``in_ms=0``)."""
        return self.reschedule(message_id, in_ms=0, now=now)

    def restart(self, message_id: str, *, in_ms: int = 0, now: dt.datetime | None = None) -> bool:
        """Put an ended (finished, failed or cancelled, kept as history) alarm back on the schedule."""
        from . import store

        registry.check_served(type(self))
        now = now or _now()
        due = due_time(None, in_ms, now)
        restarted = store.restart(self.scheduller_name(), message_id, due, now)
        if restarted:
            self._announce(due, due)
        return restarted

    def _cancel(self, now: dt.datetime | None, *, message_ids: Sequence[str] = (), aggregate_id: str = "") -> list[str]:
        from . import observe, signals, store
        from .conf import settings

        registry.check_served(type(self))
        name = self.scheduller_name()
        cancelled, ahead = store.cancel(
            name,
            now or _now(),
            settings.keeps_history(),
            message_ids=message_ids,
            aggregate_id=aggregate_id,
        )
        if ahead:
            db.on_commit(lambda: _revoke(ahead))
        if cancelled:
            observe.cancelled(name, len(cancelled))
            signals.send(signals.alarm_cancelled, name, message_ids=cancelled)
        return cancelled

    # -- the same calls for async views ----------------------------------------------------------------
    # Each runs its synchronous twin in Django's thread for sync code (``sync_to_async``, thread-sensitive):
    # the same checks, the same database connection, and so the same transaction as the caller's other
    # database work done through ``sync_to_async``.

    async def adispatch_or_get(
        self,
        message: Message,
        aggregate_id: str,
        *,
        at: dt.datetime | None = None,
        in_ms: int | None = None,
        now: dt.datetime | None = None,
    ) -> tuple[Message, bool]:
        """``dispatch_or_get`` for async code."""
        return await sync_to_async(self.dispatch_or_get)(message, aggregate_id, at=at, in_ms=in_ms, now=now)

    async def adispatch(
        self,
        message: Message,
        aggregate_id: str,
        *,
        at: dt.datetime | None = None,
        in_ms: int | None = None,
        now: dt.datetime | None = None,
    ) -> Message:
        """``dispatch`` for async code."""
        return await sync_to_async(self.dispatch)(message, aggregate_id, at=at, in_ms=in_ms, now=now)

    async def adispatch_many(
        self, alarms: Iterable[tuple[Message, str, dt.datetime]], *, now: dt.datetime | None = None
    ) -> list[Message]:
        """``dispatch_many`` for async code."""
        return await sync_to_async(self.dispatch_many)(list(alarms), now=now)

    async def acancel(self, message_id: str, *, now: dt.datetime | None = None) -> bool:
        """``cancel`` for async code."""
        return await sync_to_async(self.cancel)(message_id, now=now)

    async def apending(self, aggregate_id: str) -> list[Message]:
        """``pending`` for async code."""
        return await sync_to_async(self.pending)(aggregate_id)

    async def acancel_aggregate(self, aggregate_id: str, *, now: dt.datetime | None = None) -> int:
        """``cancel_aggregate`` for async code."""
        return await sync_to_async(self.cancel_aggregate)(aggregate_id, now=now)

    async def areschedule(
        self,
        message_id: str,
        *,
        at: dt.datetime | None = None,
        in_ms: int | None = None,
        now: dt.datetime | None = None,
    ) -> bool:
        """``reschedule`` for async code."""
        return await sync_to_async(self.reschedule)(message_id, at=at, in_ms=in_ms, now=now)

    # -- internals ---------------------------------------------------------------------------------

    def _prepare_encoded(
        self,
        message: Message,
        aggregate_id: str,
        at: dt.datetime | None,
        in_ms: int | None,
        now: dt.datetime,
        limit: int | None = None,
        header_limit: int | None = None,
        *,
        check_task: bool = True,
    ) -> tuple[Message, str, str]:
        """The message to store (``dispatch_at`` and ``late`` assigned), with its raw_request and assigns
        as JSON; raises ``InvalidAlarm`` for anything that cannot be stored."""
        if not isinstance(message, Message):
            raise InvalidAlarm(f"dispatch needs a Message (Message.new(...)), got {type(message).__name__}")
        if not isinstance(aggregate_id, str) or not aggregate_id or len(aggregate_id) > 255:
            raise InvalidAlarm(
                f"aggregate_id must be a non-empty string of at most 255 characters, got {aggregate_id!r}"
            )
        refuse_nul(aggregate_id, "aggregate_id")
        dispatch_at = due_time(at, in_ms, now)
        if check_task:
            _check_task(message.service_name)
        assigns = {**message.assigns, "dispatch_at": dispatch_at}
        if dispatch_at < now:
            assigns["late"] = True
        tracing.carry(assigns)
        scheduled = message._with_assigns(assigns)
        if limit is None:
            limit, header_limit = settings.integer("MAX_PAYLOAD"), broker_header_limit()
        raw_json, assigns_json = encode_for_storage(scheduled, limit, "message", header_limit)
        return scheduled, raw_json, assigns_json

    def _save(self, prepared: list[tuple[tuple[Message, str, str], str]]) -> None:
        """Store ``((message, raw_json, assigns_json), aggregate_id)`` as ``_prepare_encoded`` made them:
        with the JSON already encoded, unless ``save_alarm`` is overridden (then through it, one by one)."""
        if type(self).save_alarm is Scheduller.save_alarm:
            self._insert([self._new_prepared(prepared)])
        else:
            for (message, _raw, _assigns), aggregate_id in prepared:
                self.save_alarm(message, aggregate_id)

    def _new_prepared(self, prepared: list[tuple[tuple[Message, str, str], str]]) -> list[Any]:
        """``_new_alarms`` of ``((message, raw_json, assigns_json), aggregate_id)`` as ``_prepare_encoded``
        made them."""
        return self._new_alarms(
            (message, aggregate_id, raw_json, assigns_json)
            for (message, raw_json, assigns_json), aggregate_id in prepared
        )

    def _new_alarms(self, prepared: Iterable[tuple[Message, str, str | None, str | None]]) -> list[Any]:
        """``store.NewAlarm`` of each ``(message, aggregate_id, raw_json, assigns_json)``."""
        from . import store

        name = self.scheduller_name()
        return [
            store.NewAlarm(name, message, aggregate_id, self._timeout_of(message), raw_json, assigns_json)
            for message, aggregate_id, raw_json, assigns_json in prepared
        ]

    def _timeout_of(self, message: Message) -> int:
        timeout = self.dispatch_timeout(message)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= MAX_TIMEOUT_MS:
            raise InvalidAlarm(
                f"dispatch_timeout must return a positive integer (ms) of at most {MAX_TIMEOUT_MS:,} (24.8 days), "
                f"got {timeout!r}"
            )
        return timeout


def validate_decision(decision: object, message: Message) -> Decision:
    """Check what ``service_responded`` returned; raise ``InvalidResponse`` for anything else."""
    from .exceptions import InvalidResponse

    if decision is OK:
        return OK
    if isinstance(decision, Fail):
        return decision
    if isinstance(decision, Retry):
        if decision.message is not None:
            if decision.message.id != message.id:
                raise InvalidResponse(f"Retry carries message id {decision.message.id!r}, expected {message.id!r}")
            try:
                refuse_nul(decision.message.service_name, "the task name of Retry's message")
                encode_for_storage(
                    decision.message.with_response(None),
                    settings.integer("MAX_PAYLOAD"),
                    "Retry's message",
                    broker_header_limit(),
                )
            except InvalidAlarm as exc:
                raise InvalidResponse(str(exc)) from None
        return decision
    raise InvalidResponse(
        f"service_responded returned {decision!r}; expected OK, Retry(in_ms, message) or Fail(reason)"
    )


__all__: Sequence[str] = ["OK", "Fail", "Retry", "Scheduller", "due_time", "validate_decision"]
