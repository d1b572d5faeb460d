"""Every use of Celery, kombu or Django internals, each behind a check of what it relies on.

Nothing outside this module reaches into another library's private attributes. Each helper checks the
attribute it needs and, where it is missing (a release that moved it), logs once and falls back to the
behaviour without the optimisation or the extra safety it gave.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("celery_scheduller")


@functools.cache
def _warn_once(what: str) -> None:
    logger.warning("celery_scheduller: %s; running without it", what, extra={"action": "compat"})


def ended_requests(requests: Iterable[Any], task_id: str) -> list[Any]:
    """Of the worker's ``requests`` with this task id, those that started and have ended (a hard time limit
    or a lost worker is reported after ``task_ready``): a running, reserved or held request with the same
    id (a forged copy's target) is not among them.

    Relies on ``celery.worker.state.active_requests`` / ``reserved_requests`` and ``Request.time_start``.
    """
    try:
        from celery.worker import state

        active, reserved = state.active_requests, state.reserved_requests
    except (ImportError, AttributeError):
        _warn_once("celery.worker.state has no active_requests/reserved_requests")
        return []
    return [
        request
        for request in requests
        if request.id == task_id
        and getattr(request, "time_start", None) is not None
        and request not in active
        and request not in reserved
    ]
