"""Django signals sent as alarms move. ``sender`` is the owning Scheduller's name.

Every receiver is called with ``send_robust``: a failing receiver is logged with the alarm id and never
breaks beat or the worker.

- ``alarm_published(message, attempt)``: beat published an attempt.
- ``alarm_responded(message, attempt)``: a response (``message.response``) was stored for an attempt.
- ``alarm_timed_out(message, attempt)``: no response within ``dispatch_timeout``; sent before
  ``alarm_responded`` for the same timeout.
- ``alarm_retried(message, attempt, dispatch_at)``: ``Retry`` stored the next attempt.
- ``alarm_finished(message, attempt)``: ``OK``: the alarm ended.
- ``alarm_failed(message, attempt, reason)``: the alarm ended ``failed``: ``service_responded`` answered
  ``Fail(reason)``, or failed CALLBACK_MAX_FAILURES times in a row, or the stored message cannot be read or
  published, or its answer cannot be stored. ``message`` is None where the stored message could not be read.
- ``alarm_cancelled(message_ids)``: alarms were cancelled.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger("celery_scheduller")

alarm_published = Signal()
alarm_responded = Signal()
alarm_timed_out = Signal()
alarm_retried = Signal()
alarm_finished = Signal()
alarm_failed = Signal()
alarm_cancelled = Signal()


def send(signal: Signal, sender: str, **kwargs: Any) -> None:
    """Send ``signal`` to its receivers, logging (never raising) what they raise."""
    if not signal.receivers:
        return
    for receiver, result in signal.send_robust(sender=sender, **kwargs):
        if isinstance(result, Exception):
            message = kwargs.get("message")
            alarm_id = getattr(message, "id", None)
            logger.error(
                "signal receiver %r failed for alarm %s",
                receiver,
                alarm_id,
                exc_info=result,
                extra={"alarm_id": alarm_id, "action": "signal_error"},
            )
