"""Turning a response into the alarm's next state, shared by the worker hook and beat's timeouts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence

from . import registry, signals, store
from .conf import settings
from .message import Message, Response
from .scheduller import Retry, due_time, validate_decision

logger = logging.getLogger("celery_scheduller")


@dataclasses.dataclass(frozen=True, slots=True)
class Decided:
    """What ``service_responded`` decided for one attempt, not yet stored (``decide`` → ``store_decided``).

    ``again`` is the next attempt's Message for a retry or an error back-off, None to finish.
    """

    ref: store.AttemptRef
    answered: Message
    now: dt.datetime
    action: str  # "finished", "retried" or "error_backoff"
    again: Message | None = None
    due: dt.datetime | None = None
    timeout_ms: int = 0
    note: str = ""

    @property
    def response(self) -> Response:
        assert self.answered.response is not None
        return self.answered.response


def respond(ref: store.AttemptRef, message: Message, response: Response, now: dt.datetime) -> str:
    """Call the owner's ``service_responded`` and store its decision for attempt ``ref``.

    Returns the action taken: ``"finished"``, ``"retried"``, ``"error_backoff"`` or ``"ignored"``
    (the attempt was answered, timed out or cancelled meanwhile). Never raises for a user error:
    a failing or invalid ``service_responded`` is logged and the alarm tried again after a back-off.
    """
    return store_decided(decide(ref, message, response, now))


def decide(ref: store.AttemptRef, message: Message, response: Response, now: dt.datetime) -> Decided:
    """Call the owner's ``service_responded`` for attempt ``ref``; store nothing."""
    answered = message.with_response(response)
    if response.status == "timeout":
        signals.send(signals.alarm_timed_out, ref.scheduller, message=answered, attempt=ref.attempt)
    try:
        scheduller = registry.get(ref.scheduller)
        decision = validate_decision(scheduller.service_responded(answered), message)
        due = due_time(None, decision.in_ms, now) if isinstance(decision, Retry) else None
    except Exception:
        backoff = settings.positive_ms("ERROR_BACKOFF")
        logger.exception(
            "service_responded failed for alarm %s; retrying in %s ms",
            message.id,
            backoff,
            extra={**_log_extra(ref, answered), "action": "error_backoff"},
        )
        due = now + dt.timedelta(milliseconds=backoff)
        again = message.assign("dispatch_at", due)
        timeout = _timeout_or_default(ref, again)
        return Decided(ref, answered, now, "error_backoff", again, due, timeout, "error back-off")
    if not isinstance(decision, Retry) or due is None:  # validate_decision let only OK through besides Retry
        return Decided(ref, answered, now, "finished")
    again = (decision.message or message).with_response(None).assign("dispatch_at", due)
    return Decided(
        ref, answered, now, "retried", again, due, _timeout_or_default(ref, again), f"retry in {decision.in_ms} ms"
    )


def store_decided(decided: Decided) -> str:
    """Store one decision if its attempt is still current, then signal and log it; returns the action."""
    ref, response = decided.ref, decided.response
    if decided.again is None:
        applied = store.finish(ref, response, decided.now, settings.keeps_history())
    else:
        assert decided.due is not None
        applied = store.retry(ref, decided.again, decided.due, decided.timeout_ms, response, decided.now, decided.note)
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
    if store.finishes_in_one_statement(settings.keeps_history()):
        finishing = [i for i, d in enumerate(decisions) if d.again is None and first[d.ref.pk] == i]
    if store.retries_in_one_statement():
        retrying = [i for i, d in enumerate(decisions) if d.again is not None and first[d.ref.pk] == i]
    applied: dict[int, bool] = {}
    if finishing:
        finished = store.finish_many([decisions[i].ref for i in finishing])
        applied.update((i, decisions[i].ref.pk in finished) for i in finishing)
    if retrying:
        retried = store.retry_many([_new_attempt(decisions[i]) for i in retrying])
        applied.update((i, decisions[i].ref.pk in retried) for i in retrying)
    return [_stored(d, applied[i]) if i in applied else store_decided(d) for i, d in enumerate(decisions)]


def _new_attempt(decided: Decided) -> store.NewAttempt:
    assert decided.again is not None and decided.due is not None
    return store.NewAttempt(
        decided.ref, decided.again, decided.due, decided.timeout_ms, decided.response, decided.now, decided.note
    )


def _stored(decided: Decided, applied: bool) -> str:
    ref, answered = decided.ref, decided.answered
    if applied:
        signals.send(signals.alarm_responded, ref.scheduller, message=answered, attempt=ref.attempt)
        if decided.again is None:
            signals.send(signals.alarm_finished, ref.scheduller, message=answered, attempt=ref.attempt)
        else:
            again, due = decided.again, decided.due
            signals.send(signals.alarm_retried, ref.scheduller, message=again, attempt=ref.attempt, dispatch_at=due)
    return _logged(applied, decided.action, answered, _log_extra(ref, answered))


def _log_extra(ref: store.AttemptRef, answered: Message) -> dict[str, object]:
    status = answered.response.status if answered.response is not None else None
    return {"alarm_id": answered.id, "attempt": ref.attempt, "status": status}


def _timeout_or_default(ref: store.AttemptRef, message: Message) -> int:
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
