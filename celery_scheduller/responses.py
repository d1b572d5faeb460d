"""Turning a response into the alarm's next state, shared by the worker hook and beat's timeouts."""

from __future__ import annotations

import datetime as dt
import logging

from . import registry, signals, store
from .conf import settings
from .message import Message, Response
from .scheduller import Retry, validate_decision

logger = logging.getLogger("celery_scheduller")


def respond(ref: store.AttemptRef, message: Message, response: Response, now: dt.datetime) -> str:
    """Call the owner's ``service_responded`` and store its decision for attempt ``ref``.

    Returns the action taken: ``"finished"``, ``"retried"``, ``"error_backoff"`` or ``"ignored"``
    (the attempt was answered, timed out or cancelled meanwhile). Never raises for a user error:
    a failing or invalid ``service_responded`` is logged and the alarm tried again after a back-off.
    """
    answered = message.with_response(response)
    log_extra = {"alarm_id": message.id, "attempt": ref.attempt, "status": response.status}
    if response.status == "timeout":
        signals.send(signals.alarm_timed_out, ref.scheduller, message=answered, attempt=ref.attempt)
    try:
        scheduller = registry.get(ref.scheduller)
        decision = validate_decision(scheduller.service_responded(answered), message)
    except Exception:
        backoff = settings.positive_ms("ERROR_BACKOFF")
        logger.exception(
            "service_responded failed for alarm %s; retrying in %s ms",
            message.id,
            backoff,
            extra={**log_extra, "action": "error_backoff"},
        )
        due = now + dt.timedelta(milliseconds=backoff)
        again = message.assign("dispatch_at", due)
        applied = store.retry(ref, again, due, _timeout_or_default(ref, again), response, now, "error back-off")
        if applied:
            _after_retry(ref, answered, again, due)
        return _logged(applied, "error_backoff", message, log_extra)

    if not isinstance(decision, Retry):  # validate_decision let only OK through besides Retry
        applied = store.finish(ref, response, now, settings.keeps_history())
        if applied:
            signals.send(signals.alarm_responded, ref.scheduller, message=answered, attempt=ref.attempt)
            signals.send(signals.alarm_finished, ref.scheduller, message=answered, attempt=ref.attempt)
        return _logged(applied, "finished", message, log_extra)

    due = now + dt.timedelta(milliseconds=decision.in_ms)
    again = (decision.message or message).with_response(None).assign("dispatch_at", due)
    timeout = _timeout_or_default(ref, again)
    applied = store.retry(ref, again, due, timeout, response, now, f"retry in {decision.in_ms} ms")
    if applied:
        _after_retry(ref, answered, again, due)
    return _logged(applied, "retried", message, log_extra)


def _after_retry(ref: store.AttemptRef, answered: Message, again: Message, due: dt.datetime) -> None:
    signals.send(signals.alarm_responded, ref.scheduller, message=answered, attempt=ref.attempt)
    signals.send(signals.alarm_retried, ref.scheduller, message=again, attempt=ref.attempt, dispatch_at=due)


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
