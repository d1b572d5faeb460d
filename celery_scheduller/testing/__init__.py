"""Test your project's use of celery_scheduller in the test's own process, in milliseconds.

``AlarmKit`` puts the package on a clock the test controls and delivers the alarms due by it in the test's
process, through the real store and the real decision path: the Celery task body runs eagerly with its
alarm's header (so ``current_message()`` works), its return value or exception becomes the response as on
a worker, ``service_responded`` decides, a ``Retry`` is stored and becomes due by the clock, ``OK`` or
``Fail`` ends the alarm. No broker, beat or worker is needed.

- pytest: the ``alarm_kit`` fixture (this package's pytest plugin, registered on install);
- ``unittest`` / Django's ``TestCase``: ``AlarmKitMixin`` (``self.alarm_kit``), or ``with AlarmKit() as kit:``;
- without a database: ``decide(SchedullerClass, message, value=…)`` returns what ``service_responded`` decides.

What it does not simulate: the broker, several beats racing, real timing (an alarm runs when the test asks,
not on its own), worker processes (time limits, lost workers: answer them with ``will_answer(lost=True)``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["AlarmKit", "AlarmKitMixin", "AlarmView", "Delivery", "KitClock", "decide"]

#: What ``run_due`` delivers in one call at most, and ``drain`` in all (a loop that never ends is a bug).
MAX_DELIVERIES = 10_000

_UNSET: Any = object()


class KitClock:
    """The time the package reads while a kit runs. Frozen (the default): the time the kit started, moved
    only by ``advance`` and ``travel_to``. Not frozen: this host's time plus what the test advanced it by, so
    a test that already moves time with ``time-machine`` or ``freezegun`` moves the kit's clock with it."""

    def __init__(self, frozen: bool = True) -> None:
        self.offset = 0.0
        self.frozen_at = time.time() if frozen else None

    def now(self) -> float:
        """Epoch seconds."""
        return (time.time() if self.frozen_at is None else self.frozen_at) + self.offset

    def now_datetime(self) -> dt.datetime:
        """An aware UTC datetime."""
        return dt.datetime.fromtimestamp(self.now(), dt.UTC)

    def advance(
        self, ms: float = 0, *, seconds: float = 0, minutes: float = 0, hours: float = 0, days: float = 0
    ) -> dt.datetime:
        """Move the clock forward; returns the new time."""
        step = ms / 1000 + seconds + 60 * minutes + 3600 * hours + 86400 * days
        if step < 0:
            raise ValueError(f"the kit's clock only moves forward: advance({step * 1000:g} ms)")
        self.offset += step
        return self.now_datetime()

    def travel_to(self, at: dt.datetime) -> dt.datetime:
        """Move the clock to ``at`` (an aware datetime); returns it."""
        if at.tzinfo is None:
            raise ValueError(f"travel_to needs an aware datetime, not {at!r}")
        self.offset = at.timestamp() - (time.time() if self.frozen_at is None else self.frozen_at)
        return self.now_datetime()


@dataclasses.dataclass(frozen=True)
class AlarmView:
    """One alarm as stored, for assertions."""

    message_id: str
    scheduller: str
    aggregate_id: str
    task: str
    kwargs: dict[str, Any]
    assigns: dict[str, Any]
    due: dt.datetime
    state: str
    attempt: int
    last_response: dict[str, Any] | None
    #: the answered attempts on record, oldest first: ``{"attempt", "status", "error", "decision"}``
    attempts: tuple[dict[str, Any], ...]

    def describe(self, now: dt.datetime | None = None) -> str:
        """One line: what a failing assertion lists."""
        when = self.due.isoformat()
        if now is not None:
            delta = (self.due - now).total_seconds()
            when += f" ({_span(delta)} {'from now' if delta >= 0 else 'ago'} by the kit's clock)"
        return (
            f"{self.message_id}: task={self.task} aggregate={self.aggregate_id!r} due={when} state={self.state} "
            f"attempt={self.attempt} scheduller={self.scheduller} kwargs={self.kwargs!r}"
        )


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One attempt delivered (or answered) by the kit, and what came of it."""

    message_id: str
    scheduller: str
    task: str
    attempt: int
    #: when it was due, and when the kit delivered it (its clock)
    due: dt.datetime
    delivered_at: dt.datetime
    #: what came back: the task's (``ok`` / ``error``), or a simulated one, or ``timeout``
    response: Any
    #: ``"finished"`` (OK), ``"retried"`` (Retry), ``"failed"`` (Fail, or given up), ``"error_backoff"``
    #: (``service_responded`` failed: decided again later with the same response), ``"ignored"``
    action: str
    #: the Retry's next due time; the reason of a ``failed`` alarm or of a failed ``service_responded``
    retry_at: dt.datetime | None = None
    reason: str = ""
    #: the task ran (False: a simulated answer, a timeout, or a decision taken again)
    ran: bool = True


class AlarmKit:
    """Alarms due by a clock the test controls, delivered in the test's process. Start it (``with``, the
    pytest fixture or the mixin) inside a test that may use the database; everything it changes is undone
    when it stops."""

    def __init__(self, *, frozen: bool = True) -> None:
        self.clock = KitClock(frozen)
        self._started = False
        self._callback_errors: dict[str, str] = {}
        self._handler = _CallbackErrors(self._callback_errors)
        self._saved: dict[str, Any] = {}
        self._answers: dict[str, list[Any]] = {}
        self._events: list[tuple[str, dict[str, Any]]] = []

    # -- starting and stopping ---------------------------------------------------------------------------

    def start(self) -> AlarmKit:
        from celery_scheduller import clock, registry, signals

        if self._started:
            return self
        self._saved = {
            "clock": clock.default,
            "states": dict(registry._states),
            "instances": dict(registry._instances),
        }
        clock.default = self.clock  # type: ignore[assignment]
        logging.getLogger("celery_scheduller").addHandler(self._handler)
        registry._states.clear()  # each test gives its Schedullers' states afresh
        registry._instances.clear()
        for name in ("alarm_responded", "alarm_finished", "alarm_retried", "alarm_failed"):
            getattr(signals, name).connect(self._record, weak=False, dispatch_uid=f"celery_scheduller.testing.{name}")
        self._started = True
        return self

    def stop(self) -> None:
        from celery_scheduller import clock, registry, signals

        if not self._started:
            return
        for name in ("alarm_responded", "alarm_finished", "alarm_retried", "alarm_failed"):
            getattr(signals, name).disconnect(dispatch_uid=f"celery_scheduller.testing.{name}")
        clock.default = self._saved["clock"]
        logging.getLogger("celery_scheduller").removeHandler(self._handler)
        registry._states.clear()
        registry._states.update(self._saved["states"])
        registry._instances.clear()
        registry._instances.update(self._saved["instances"])
        self._started = False

    def __enter__(self) -> AlarmKit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the clock -------------------------------------------------------------------------------------------

    @property
    def now(self) -> dt.datetime:
        """The kit's time."""
        return self.clock.now_datetime()

    def advance(
        self, ms: float = 0, *, seconds: float = 0, minutes: float = 0, hours: float = 0, days: float = 0
    ) -> dt.datetime:
        """Move the kit's clock forward (nothing is delivered until ``run_due`` or ``drain``)."""
        return self.clock.advance(ms, seconds=seconds, minutes=minutes, hours=hours, days=days)

    def travel_to(self, at: dt.datetime) -> dt.datetime:
        """Move the kit's clock to ``at``."""
        return self.clock.travel_to(at)

    # -- the Schedullers' state --------------------------------------------------------------------------------

    def serve(self, cls: type, state: Any) -> None:
        """Run ``cls``'s callbacks on ``state`` in this test (as ``cls.use_state(state)``)."""
        cls.use_state(state)  # type: ignore[attr-defined]

    # -- inspection ----------------------------------------------------------------------------------------

    def dispatched(
        self,
        task: str | None = None,
        *,
        scheduller: Any = None,
        aggregate_id: str | None = None,
        message_id: str | None = None,
        state: str | Iterable[str] | None = None,
        kwargs: dict[str, Any] | None = None,
        at: dt.datetime | None = None,
        within: dt.timedelta | None = None,
    ) -> list[AlarmView]:
        """The alarms stored, earliest due first, that match every filter given: ``kwargs`` by the items
        given (others may be there too), ``at`` the exact due time, ``within`` due by the kit's time plus it,
        ``scheduller`` a class, an instance or a name."""
        from celery_scheduller.models import Alarm, AlarmAttempt

        rows = Alarm.objects.all().order_by("dispatch_at", "pk")
        if task is not None:
            rows = rows.filter(task_name=task)
        if scheduller is not None:
            rows = rows.filter(scheduller=_scheduller_name(scheduller))
        if aggregate_id is not None:
            rows = rows.filter(aggregate_id=aggregate_id)
        if message_id is not None:
            rows = rows.filter(message_id=message_id)
        if state is not None:
            rows = rows.filter(state__in=[state] if isinstance(state, str) else list(state))
        if at is not None:
            rows = rows.filter(dispatch_at=at)
        if within is not None:
            rows = rows.filter(dispatch_at__lte=self.now + within)
        found = list(rows)
        if kwargs is not None:
            found = [row for row in found if all(row.raw_request.get(k, _UNSET) == v for k, v in kwargs.items())]
        history: dict[str, list[dict[str, Any]]] = {}
        for attempt in AlarmAttempt.objects.filter(message_id__in=[row.message_id for row in found]).order_by(
            "attempt", "pk"
        ):
            history.setdefault(attempt.message_id, []).append(
                {
                    "attempt": attempt.attempt,
                    "status": attempt.status,
                    "error": attempt.error,
                    "decision": attempt.decision,
                }
            )
        return [
            AlarmView(
                message_id=row.message_id,
                scheduller=row.scheduller,
                aggregate_id=row.aggregate_id,
                task=row.task_name,
                kwargs=dict(row.raw_request),
                assigns=dict(row.assigns),
                due=row.dispatch_at,
                state=row.state,
                attempt=row.attempt,
                last_response=row.last_response,
                attempts=tuple(history.get(row.message_id, ())),
            )
            for row in found
        ]

    def assert_dispatched(
        self, task: str | None = None, *, count: int | None = None, **filters: Any
    ) -> list[AlarmView]:
        """The alarms matching (``dispatched``'s filters); fails, listing every alarm stored, when there is
        none (or not ``count``)."""
        found = self.dispatched(task, **filters)
        if (count is None and not found) or (count is not None and len(found) != count):
            wanted = _describe_filters(task, filters)
            expected = "no alarm" if count is None else f"{len(found)} alarms, not {count},"
            raise AssertionError(f"{expected} dispatched matching {wanted}\n{self._listing()}")
        return found

    def assert_not_dispatched(self, task: str | None = None, **filters: Any) -> None:
        """Fails, listing what matched, when an alarm matches ``dispatched``'s filters."""
        found = self.dispatched(task, **filters)
        if found:
            lines = "\n".join(f"  - {view.describe(self.now)}" for view in found)
            raise AssertionError(
                f"{len(found)} alarm(s) dispatched matching {_describe_filters(task, filters)}:\n{lines}"
            )

    def _listing(self) -> str:
        stored = self.dispatched()
        if not stored:
            return "nothing was dispatched"
        lines = "\n".join(f"  - {view.describe(self.now)}" for view in stored)
        return f"dispatched ({len(stored)}):\n{lines}"

    # -- delivering --------------------------------------------------------------------------------------

    def will_answer(
        self,
        message_id: str,
        *,
        value: Any = _UNSET,
        error: Any = None,
        timeout: bool = False,
        lost: bool = False,
        times: int = 1,
    ) -> None:
        """The next ``times`` deliveries of ``message_id`` get this answer instead of running the task: a
        return ``value``, an ``error`` (an exception or its text), a ``timeout`` (no answer within
        ``dispatch_timeout``), or a ``lost`` worker (the error a worker killed under the task answers)."""
        response = _response(value=value, error=error, timeout=timeout, lost=lost)
        self._answers.setdefault(message_id, []).extend([response] * times)

    def answer(
        self, message_id: str, *, value: Any = _UNSET, error: Any = None, timeout: bool = False, lost: bool = False
    ) -> Delivery:
        """Deliver ``message_id``, due by the kit's clock, with this answer instead of running its task (the
        other alarms due run as ``run_due`` runs them); returns its delivery."""
        self._check_due(message_id)
        self.will_answer(message_id, value=value, error=error, timeout=timeout, lost=lost)
        deliveries = self.run_due()
        mine = [delivery for delivery in deliveries if delivery.message_id == message_id]
        self._answers.pop(message_id, None)
        if not mine:
            raise AssertionError(f"alarm {message_id} was not delivered\n{self._listing()}")
        return mine[0]

    def run_due(self) -> list[Delivery]:
        """Deliver every alarm due by the kit's clock, and decide every attempt whose deadline passed (a
        ``service_responded`` that failed is called again with its response once its back-off is over), as
        beat and a worker would; returns what happened, in order."""
        from celery_scheduller import registry, store
        from celery_scheduller.conf import settings

        self._require_started()
        names = registry.names()
        deliveries: list[Delivery] = []
        limit = settings.integer("BATCH_SIZE")
        while len(deliveries) < MAX_DELIVERIES:
            now = self.now
            rows = store.claim_due(names, now, limit)
            for row in rows:
                deliveries.append(self._deliver(row, now))
            lease_until = now + dt.timedelta(milliseconds=settings.integer("TIMEOUT_LEASE"))
            leased = store.lease_timeouts(names, now, lease_until, limit)
            for ref, message in leased:
                deliveries.append(self._decide_again(ref, message, now))
            if not rows and not leased:
                return deliveries
        raise AssertionError(f"run_due delivered {MAX_DELIVERIES} attempts without running out: a loop?")

    def drain(self, until: dt.datetime | dt.timedelta | None = None) -> list[Delivery]:
        """``run_due``, then move the clock to the next due time (an alarm's, or a deadline's) and again,
        until nothing is on the schedule or the next time is after ``until`` (a time, or a span from now; the
        clock then stops at ``until``). Returns every delivery, in order."""
        if isinstance(until, dt.timedelta):
            until = self.now + until
        deliveries: list[Delivery] = []
        while len(deliveries) < MAX_DELIVERIES:
            deliveries.extend(self.run_due())
            upcoming = self._next_time()
            if upcoming is None or (until is not None and upcoming > until):
                if until is not None and until > self.now:
                    self.travel_to(until)
                return deliveries
            if upcoming > self.now:
                self.travel_to(upcoming)
        raise AssertionError(f"drain delivered {MAX_DELIVERIES} attempts and the schedule is not empty: a loop?")

    # -- inside ------------------------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("the AlarmKit is not started: use it in a with block, the fixture or the mixin")

    def _check_due(self, message_id: str) -> None:
        found = self.dispatched(message_id=message_id)
        if not found:
            raise AssertionError(f"no alarm {message_id!r} is stored\n{self._listing()}")
        view = found[0]
        if view.state != "pending":
            raise AssertionError(f"alarm {message_id} is {view.state}, not pending: it cannot be delivered")
        if view.due > self.now:
            raise AssertionError(
                f"alarm {message_id} is due {view.due.isoformat()}, {_span((view.due - self.now).total_seconds())} "
                "after the kit's clock: advance the clock first"
            )

    def _deliver(self, row: dict[str, Any], now: dt.datetime) -> Delivery:
        """Deliver one claimed attempt: its simulated answer, else its task run eagerly with its header."""
        from celery_scheduller import signals, store
        from celery_scheduller.conf import settings
        from celery_scheduller.wire import AttemptRef

        ref = AttemptRef.of_row(row)
        message = store.default.message_from_row(row)
        if row["dispatch_at"] < now - dt.timedelta(milliseconds=settings.LATE_AFTER):
            message = message.assign("late", True)
        signals.send(signals.alarm_published, ref.scheduller, message=message, attempt=ref.attempt)
        simulated = self._answers.get(message.id)
        self._events.clear()
        if simulated:
            from celery_scheduller import responses

            response = simulated.pop(0)
            responses.respond(ref, message, response, now)
            ran = False
        else:
            response = _run_task(ref, message)
            ran = True
        return self._delivery(ref, message, row["dispatch_at"], now, response, ran)

    def _decide_again(self, ref: Any, message: Any, now: dt.datetime) -> Delivery:
        """An attempt whose deadline passed: decided again with the response it kept (its
        ``service_responded`` had failed), else answered ``timeout``, as beat does."""
        from celery_scheduller import responses
        from celery_scheduller.message import Response

        response = message.response or Response("timeout")
        self._events.clear()
        responses.respond(ref, message, response, now)
        return self._delivery(ref, message, message.assigns.get("dispatch_at"), now, response, False)

    def _delivery(self, ref: Any, message: Any, due: Any, now: dt.datetime, response: Any, ran: bool) -> Delivery:
        kinds = {name: kwargs for name, kwargs in self._events if _same_alarm(kwargs, message.id)}
        retry_at, reason = None, ""
        if "alarm_failed" in kinds:
            action, reason = "failed", str(kinds["alarm_failed"].get("reason") or "")
        elif "alarm_finished" in kinds:
            action = "finished"
        elif "alarm_retried" in kinds:
            action, retry_at = "retried", kinds["alarm_retried"].get("dispatch_at")
        elif "alarm_responded" in kinds:
            action, reason = "error_backoff", self._callback_failure(message.id)
        else:
            action = "ignored"
        if isinstance(due, str):
            due = dt.datetime.fromisoformat(due)
        return Delivery(
            message_id=message.id,
            scheduller=ref.scheduller,
            task=message.service_name,
            attempt=ref.attempt,
            due=due if isinstance(due, dt.datetime) else now,
            delivered_at=now,
            response=response,
            action=action,
            retry_at=retry_at,
            reason=reason,
            ran=ran,
        )

    def _callback_failure(self, message_id: str) -> str:
        return self._callback_errors.pop(message_id, "service_responded failed")

    def _record(self, signal: Any = None, sender: Any = None, **kwargs: Any) -> None:
        from celery_scheduller import signals

        for name in ("alarm_responded", "alarm_finished", "alarm_retried", "alarm_failed"):
            if signal is getattr(signals, name):
                self._events.append((name, kwargs))

    def _next_time(self) -> dt.datetime | None:
        """The earliest due time of a pending alarm, or deadline of a published attempt, of a served Scheduller."""
        from django.db.models import Min

        from celery_scheduller import registry, states
        from celery_scheduller.models import Alarm

        names = registry.names()
        due = Alarm.objects.filter(scheduller__in=names, state=states.PENDING).aggregate(m=Min("dispatch_at"))["m"]
        deadline = Alarm.objects.filter(scheduller__in=names, state=states.PUBLISHED).aggregate(m=Min("deadline"))["m"]
        found = [moment for moment in (due, deadline) if moment is not None]
        return min(found) if found else None


class _CallbackErrors(logging.Handler):
    """Keeps, per alarm, what its ``service_responded`` raised (the package logs it with ``callback_error``)."""

    def __init__(self, found: dict[str, str]) -> None:
        super().__init__(logging.ERROR)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        from celery_scheduller.message import describe

        if getattr(record, "action", None) == "callback_error" and record.exc_info:
            self.found[str(getattr(record, "alarm_id", ""))] = describe(record.exc_info[1])


class AlarmKitMixin:
    """For ``unittest`` and Django's ``TestCase``: ``self.alarm_kit``, started in ``setUp`` and stopped
    when the test ends. Put it before ``TestCase`` in the bases."""

    alarm_kit: AlarmKit

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.alarm_kit = AlarmKit().start()
        self.addCleanup(self.alarm_kit.stop)  # type: ignore[attr-defined]


def decide(
    scheduller: Any,
    message: Any,
    *,
    value: Any = _UNSET,
    error: Any = None,
    timeout: bool = False,
    lost: bool = False,
    state: Any = None,
) -> Any:
    """What ``scheduller`` (a Scheduller class, with ``state``, or an instance) decides for ``message``
    answered with this response: ``OK``, a ``Retry`` or a ``Fail``, as checked by beat and the worker (an
    invalid answer raises ``InvalidResponse``). No database, no registry: for unit tests of
    ``service_responded``."""
    from celery_scheduller.scheduller import validate_decision

    if isinstance(scheduller, type):
        instance: Any = object.__new__(scheduller)
        instance.state = state
    else:
        instance = scheduller
    response = _response(value=value, error=error, timeout=timeout, lost=lost)
    return validate_decision(instance.service_responded(message.with_response(response)), message)


def _run_task(ref: Any, message: Any) -> Any:
    """Run the alarm's Celery task in this process with its header, as a worker runs it: the hooks answer
    it (``service_responded`` decides, the decision is stored). Returns the response it made."""
    from celery_scheduller.hooks import _answer_if_current
    from celery_scheduller.message import Response, describe
    from celery_scheduller.wire import header_of, task_id_of

    task = _find_task(message.service_name)
    if task is None:  # as a worker that does not know the task answers
        response = Response("error", error=f"NotRegistered: no task named {message.service_name!r} on this worker")
        _answer_if_current(ref, message, response)
        return response
    result = task.apply(
        kwargs=dict(message.raw_request),
        task_id=task_id_of(message.id, ref.attempt, ref.pk),
        headers=header_of(ref, message),
        throw=False,
    )  # the hooks stored the decision (task_postrun), as on a worker
    if result.successful():
        return Response("ok", value=result.result)
    return Response("error", error=describe(result.result))


def _find_task(name: str) -> Any:
    """The Celery task named ``name`` in this process: registered already, or once the app's task modules
    are imported (what a worker does at start: ``autodiscover_tasks``), or in the module its name says."""
    import importlib

    from celery import current_app

    task = current_app.tasks.get(name)
    if task is None:
        current_app.loader.import_default_modules()
        task = current_app.tasks.get(name)
    if task is None and "." in name:
        try:
            importlib.import_module(name.rsplit(".", 1)[0])
        except ImportError:
            return None
        task = current_app.tasks.get(name)
    return task


def _response(*, value: Any, error: Any, timeout: bool, lost: bool) -> Any:
    from celery_scheduller.message import Response, describe

    given = sum((value is not _UNSET, error is not None, timeout, lost))
    if given != 1:
        raise ValueError("give exactly one of value=, error=, timeout=True or lost=True")
    if timeout:
        return Response("timeout")
    if lost:
        from billiard.exceptions import WorkerLostError

        return Response("error", error=describe(WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL).")))
    if error is not None:
        return Response("error", error=describe(error) if isinstance(error, BaseException) else str(error))
    return Response("ok", value=value)


def _scheduller_name(scheduller: Any) -> str:
    if isinstance(scheduller, str):
        return scheduller
    cls: Any = scheduller if isinstance(scheduller, type) else type(scheduller)
    return str(cls.scheduller_name())


def _same_alarm(kwargs: dict[str, Any], message_id: str) -> bool:
    message = kwargs.get("message")
    return getattr(message, "id", None) == message_id


def _describe_filters(task: str | None, filters: dict[str, Any]) -> str:
    given = {"task": task, **filters} if task is not None else dict(filters)
    if "scheduller" in given and not isinstance(given["scheduller"], str):
        given["scheduller"] = _scheduller_name(given["scheduller"])
    return ", ".join(f"{key}={value!r}" for key, value in given.items()) or "anything"


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds * 1000:g} ms"
