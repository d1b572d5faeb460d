"""Turning a response into the alarm's next state, shared by the worker hook and beat's timeouts."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import random
import time
from collections.abc import Iterator, Sequence

from . import db, observe, registry, signals, store, tracing
from .conf import settings
from .message import Message, Response, describe
from .scheduller import Fail, Retry, due_time, validate_decision
from .wire import AttemptRef

logger = logging.getLogger("celery_scheduller")

#: The actions of stored decisions, each also the ``action`` of its log line (``_logged``).
DECIDED_ACTIONS = ("finished", "retried", "error_backoff", "failed")


@dataclasses.dataclass(frozen=True, slots=True)
class Decided:
    """What ``service_responded`` decided for one attempt, not yet stored (``decide`` → ``store_decided``).

    ``again`` is the next attempt's Message for a retry, None to finish (or, with ``action == "failed"``, to
    fail the alarm with ``note`` as its reason; with ``action == "error_backoff"``, to decide the same response
    again at ``due``: ``service_responded`` failed).
    """

    ref: AttemptRef
    answered: Message
    now: dt.datetime
    action: str  # "finished", "retried", "error_backoff" or "failed"
    again: Message | None = None
    due: dt.datetime | None = None
    timeout_ms: int = 0
    note: str = ""
    #: ``service_responded`` failures in a row, this one included (0 after a valid answer)
    failures: int = 0
    #: a ``failed`` decision that keeps the attempt's response as the last one (``Fail``), rather than
    #: recording ``note`` as an error in its place
    keep_response: bool = False

    @property
    def response(self) -> Response:
        assert self.answered.response is not None
        return self.answered.response


def respond(ref: AttemptRef, message: Message, response: Response, now: dt.datetime) -> str:
    """Call the owner's ``service_responded`` and store its decision for attempt ``ref``.

    Returns the action taken: ``"finished"``, ``"retried"``, ``"error_backoff"`` or ``"ignored"``
    (the attempt was answered, timed out or cancelled meanwhile). Never raises for a user error:
    a failing or invalid ``service_responded`` is logged and the alarm tried again after a back-off.
    """
    return store_decided(decide(ref, message, response, now))


def decide(ref: AttemptRef, message: Message, response: Response, now: dt.datetime) -> Decided:
    """Call the owner's ``service_responded`` for attempt ``ref``; store nothing."""
    answered = message.with_response(response)
    if not ref.callback_failures:  # once per attempt, not again when it is decided again
        observe.answered(ref.scheduller, response.status, response.error)
        if response.status == "timeout":
            signals.send(signals.alarm_timed_out, ref.scheduller, message=answered, attempt=ref.attempt)
    started = time.perf_counter()
    try:
        with tracing.responding(ref.scheduller, ref.attempt, message):
            scheduller = registry.get(ref.scheduller)
            decision = validate_decision(scheduller.service_responded(answered), message)
            due = due_time(None, decision.in_ms, now) if isinstance(decision, Retry) else None
    except Exception as exc:
        observe.callback(ref.scheduller, time.perf_counter() - started, failed=True)
        logger.exception(
            "service_responded failed for alarm %s",
            message.id,
            extra={**_log_extra(ref, answered), "action": "callback_error"},
        )
        return callback_failed(ref, answered, now, describe(exc))
    observe.callback(ref.scheduller, time.perf_counter() - started, failed=False)
    if isinstance(decision, Fail):  # given up: ends failed with the reason, the task's response kept
        return Decided(ref, answered, now, "failed", note=decision.reason, keep_response=True)
    if not isinstance(decision, Retry) or due is None:  # validate_decision let only OK through besides these
        return Decided(ref, answered, now, "finished")
    again = (decision.message or message).with_response(None).assign("dispatch_at", due)
    return Decided(
        ref, answered, now, "retried", again, due, _timeout_or_default(ref, again), f"retry in {decision.in_ms} ms"
    )


def callback_failed(ref: AttemptRef, answered: Message, now: dt.datetime, reason: str) -> Decided:
    """The decision for an attempt whose ``service_responded`` failed (``reason``): call it again with the same
    response after a back-off growing with each failure in a row (the task does not run again), or fail the
    alarm at CALLBACK_MAX_FAILURES."""
    failures = ref.callback_failures + 1
    message = answered
    if failures >= settings.integer("CALLBACK_MAX_FAILURES"):
        note = f"service_responded failed {failures} times in a row; last: {reason}"
        return Decided(ref, answered, now, "failed", note=note, failures=failures, keep_response=True)
    backoff = backoff_ms(failures)
    due = now + dt.timedelta(milliseconds=backoff)
    logger.warning(
        "alarm %s: service_responded failed (%s in a row); deciding the same response again in %s ms: %s",
        message.id,
        failures,
        backoff,
        reason,
        extra={**_log_extra(ref, answered), "action": "error_backoff"},
    )
    note = f"service_responded failed ({failures}): {reason}"
    return Decided(ref, answered, now, "error_backoff", None, due, 0, note, failures)


def backoff_ms(failures: int) -> int:
    """The back-off after ``failures`` failures in a row: ERROR_BACKOFF doubled per failure after the first,
    at most ERROR_BACKOFF_MAX, less a random part of up to a half, so alarms that fail together spread out."""
    first, cap = settings.integer("ERROR_BACKOFF"), settings.integer("ERROR_BACKOFF_MAX")
    full = min(cap, first * 2 ** min(failures - 1, 40))
    return max(1, int(full * random.uniform(0.5, 1.0)))


def store_decided(decided: Decided) -> str:
    """Store one decision if its attempt is still current, then signal and log it; returns the action."""
    ref, response = decided.ref, decided.response
    if decided.action == "failed":
        applied = store.fail(ref, decided.note, decided.now, response if decided.keep_response else None)
    elif decided.action == "error_backoff":
        assert decided.due is not None
        applied = store.redecide(ref, response, decided.due, decided.failures, decided.note, decided.now)
    elif decided.again is None:
        applied = store.finish(ref, response, decided.now, settings.keeps_history())
    else:
        assert decided.due is not None
        applied = store.retry(
            ref,
            decided.again,
            decided.due,
            decided.timeout_ms,
            response,
            decided.now,
            decided.note,
            decided.failures,
        )
    return _stored(decided, applied)


def store_many(decisions: Sequence[Decided]) -> list[str]:
    """``store_decided`` for many, in order; returns the actions. On PostgreSQL every retry (and error
    back-off) goes in one statement and, without history, every ``finished`` in another: the worker's
    response writer and beat's timeouts store what was decided this way. The rest one by one, as is a
    second decision for an alarm the batch already holds (it is ignored, as one after the other would be)."""
    first: dict[int, int] = {}
    for index, decided in enumerate(decisions):
        first.setdefault(decided.ref.pk, index)
    finishing, retrying = [], []
    batchable = [d.action not in ("failed", "error_backoff") and first[d.ref.pk] == i for i, d in enumerate(decisions)]
    if store.finishes_in_one_statement(settings.keeps_history()):
        finishing = [i for i, d in enumerate(decisions) if d.again is None and batchable[i]]
    if store.retries_in_one_statement():
        retrying = [i for i, d in enumerate(decisions) if d.again is not None and batchable[i]]
    applied: dict[int, bool] = {}
    # a batch that fails leaves its decisions out of ``applied``: they are stored one by one below
    if finishing:
        with _or_one_by_one(len(finishing)):
            finished = store.finish_many([decisions[i].ref for i in finishing])
            applied.update((i, decisions[i].ref.pk in finished) for i in finishing)
    if retrying:
        with _or_one_by_one(len(retrying)):
            retried = store.retry_many([_new_attempt(decisions[i]) for i in retrying])
            applied.update((i, decisions[i].ref.pk in retried) for i in retrying)
    return [_stored(d, applied[i]) if i in applied else _store_alone(d) for i, d in enumerate(decisions)]


@contextlib.contextmanager
def _or_one_by_one(count: int) -> Iterator[None]:
    """Run a statement storing several decisions; when it fails on a usable connection (one row's value,
    not the database going away), swallow the error so the caller stores them one by one."""
    try:
        with _savepoint():
            yield
    except Exception:
        if not _connection_usable():
            raise
        logger.warning(
            "storing %s decisions together failed; storing them one by one",
            count,
            exc_info=True,
            extra={"action": "batch_fallback", "count": count},
        )


def _store_alone(decided: Decided) -> str:
    """``store_decided`` in a savepoint of its own; a decision the database refuses fails its alarm alone,
    with the reason recorded (the connection going away is raised: nothing is wrong with the alarm)."""
    try:
        with _savepoint():
            return store_decided(decided)
    except Exception as exc:
        if not _connection_usable():
            raise
        reason = f"storing the answer failed ({describe(exc)}); the decision was {decided.action}"
        failing = dataclasses.replace(decided, action="failed", again=None, due=None, note=reason)
        with _savepoint():
            return store_decided(failing)


def _savepoint() -> contextlib.AbstractContextManager[object]:
    """A savepoint when the caller holds a transaction (a failed statement would spoil it), else nothing:
    in autocommit every statement is its own transaction already."""
    return db.atomic() if db.connection().in_atomic_block else contextlib.nullcontext()


def _connection_usable() -> bool:
    connection = db.connection()
    return connection.connection is not None and connection.is_usable()


def _new_attempt(decided: Decided) -> store.NewAttempt:
    assert decided.again is not None and decided.due is not None
    return store.NewAttempt(
        decided.ref,
        decided.again,
        decided.due,
        decided.timeout_ms,
        decided.response,
        decided.now,
        decided.note,
        decided.failures,
    )


def _stored(decided: Decided, applied: bool) -> str:
    ref, answered = decided.ref, decided.answered
    if applied:
        observe.decided(ref.scheduller, decided.action)
        signals.send(signals.alarm_responded, ref.scheduller, message=answered, attempt=ref.attempt)
        if decided.action == "failed":
            logger.error(
                "alarm %s failed: %s",
                answered.id,
                decided.note,
                extra={**_log_extra(ref, answered), "action": "failed"},
            )
            signals.send(
                signals.alarm_failed, ref.scheduller, message=answered, attempt=ref.attempt, reason=decided.note
            )
        elif decided.action == "error_backoff":
            pass  # decided again later: neither finished nor a new attempt
        elif decided.again is None:
            signals.send(signals.alarm_finished, ref.scheduller, message=answered, attempt=ref.attempt)
        else:
            again, due = decided.again, decided.due
            signals.send(signals.alarm_retried, ref.scheduller, message=again, attempt=ref.attempt, dispatch_at=due)
    return _logged(applied, decided.action, answered, _log_extra(ref, answered))


def _log_extra(ref: AttemptRef, answered: Message) -> dict[str, object]:
    status = answered.response.status if answered.response is not None else None
    return {"alarm_id": answered.id, "attempt": ref.attempt, "status": status}


def _timeout_or_default(ref: AttemptRef, message: Message) -> int:
    # a dispatch_timeout that raises or returns garbage must not leave the attempt unanswerable
    try:
        return registry.get(ref.scheduller)._timeout_of(message)
    except Exception:
        logger.exception("dispatch_timeout failed for alarm %s", message.id, extra={"alarm_id": message.id})
        return 5_000


def _logged(applied: bool, action: str, message: Message, log_extra: dict[str, object]) -> str:
    if not applied:
        logger.info(
            "response for alarm %s ignored: the attempt was already answered, timed out or cancelled",
            message.id,
            extra={**log_extra, "action": "ignored"},
        )
        return "ignored"
    logger.info("alarm %s %s", message.id, action, extra={**log_extra, "action": action})
    return action
